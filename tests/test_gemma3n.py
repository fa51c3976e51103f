"""Gemma 3n: AltUp streams, per-layer inputs and KV-shared layers under pruning (tiny models; timm builds the
vision tower, so these tests run in CI's Gemma 3n job and skip where timm does not import).

The reference for a prune before layer 0 is the model's own decoder stack run on the kept tokens: the
embeddings and per-layer inputs the bare model feeds its language model, gathered at the kept columns and
passed as ``inputs_embeds`` / ``per_layer_inputs`` (compact positions: the stack numbers them itself).
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.errors import AdapterError
from prunekit.testing import family_inputs, gemma3n_config, missing_module

if missing_module("timm"):
    pytest.skip(missing_module("timm"), allow_module_level=True)

LAYER0 = {"name": "layer0-half", "positions": "compact", "criteria": {"n": {"type": "l2_norm"}},
          "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 0.5}]}}
LAYER2 = {"name": "layer2-half", "criteria": {"iga": {}, "ttv": {"type": "ttv"}},
          "combiner": {"type": "weighted_sum", "weights": {"iga": 0.5, "ttv": 0.5}},
          "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}, {"layer": 4, "keep": 0.25}]}}


def _tiny(kv_shared: int, seed: int = 1):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.Gemma3nForConditionalGeneration(gemma3n_config(8, kv_shared_layers=kv_shared)).to(torch.float64).eval()


@pytest.fixture(scope="module")
def model():
    return _tiny(kv_shared=2)  # layers 6 (sliding) and 7 (full) reuse the keys and values of layers 4 and 5


def _stack_inputs(model, inputs: dict) -> dict:
    """What the bare model feeds its language model: ``inputs_embeds`` and ``per_layer_inputs``."""
    seen = {}
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return seen


def _stack_logits(model, embeds, per_layer):
    """The language model on ``inputs_embeds`` / ``per_layer_inputs`` (compact positions), then the LM head with
    the final logit soft-capping, as Gemma3nForConditionalGeneration applies them."""
    ones = torch.ones(embeds.shape[:2], dtype=torch.long)
    hidden = model.model.language_model(inputs_embeds=embeds, per_layer_inputs=per_layer,
                                        attention_mask=ones).last_hidden_state
    logits = model.lm_head(hidden)
    cap = model.config.get_text_config().final_logit_softcapping
    return logits if cap is None else torch.tanh(logits / cap) * cap


def test_keep_all_is_bit_identical_with_kv_shared_layers(model):
    inputs = family_inputs(model, "gemma3n", batch=2, seed=3)
    keep_all = {"name": "keep-all", "criteria": {"iga": {}, "ttv": {"type": "ttv"}},
                "combiner": {"type": "weighted_sum", "weights": {"iga": 0.5, "ttv": 0.5}},
                "schedule": {"type": "stages", "stages": [{"layer": 1, "keep": 1.0}, {"layer": 4, "keep": 1.0}]}}
    with torch.no_grad():
        bare = model(**inputs).logits
        bare_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunekit.apply(model, keep_all) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert pruner.adapter.name == "gemma3n"
    mask = inputs["attention_mask"].bool()
    assert torch.equal(logits[mask], bare[mask]) and torch.equal(ids, bare_ids)


def test_a_prune_before_layer_0_equals_the_stack_on_the_kept_tokens(model):
    inputs = family_inputs(model, "gemma3n", batch=1, seed=4)
    fed = _stack_inputs(model, inputs)
    with prunekit.apply(model, LAYER0) as pruner, torch.no_grad():
        logits = model(**inputs).logits[0]
        run = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    visual = inputs["input_ids"][0] == model.config.image_token_id
    kept = pruner.last_report.stages[0].kept[0]
    assert len(kept) == int(visual.sum()) // 2
    columns = torch.tensor([i for i in range(len(visual)) if not visual[i] or i in kept.tolist()])
    embeds, per_layer = fed["inputs_embeds"][:, columns], fed["per_layer_inputs"][:, columns]
    with torch.no_grad():
        reference = _stack_logits(model, embeds, per_layer)[0]
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-10)
    # cached decode: each step of the pruned run against the stack on the kept prompt plus the tokens so far
    tokens = run.sequences[0, inputs["input_ids"].shape[1]:]
    for step in range(1, 4):
        ids = tokens[:step][None]
        with torch.no_grad():
            step_embeds = torch.cat([embeds, model.get_input_embeddings()(ids)], dim=1)
            step_per_layer = torch.cat([per_layer, model.model.language_model.get_per_layer_inputs(ids)], dim=1)
            expected = _stack_logits(model, step_embeds, step_per_layer)[0, -1]
        torch.testing.assert_close(run.logits[step][0], expected.float(), rtol=0, atol=1e-5)


def test_later_stages_prune_inside_generate_and_a_padded_batch_equals_the_lone_runs(model):
    inputs = family_inputs(model, "gemma3n", batch=2, seed=5)
    with prunekit.apply(model, LAYER2) as pruner, torch.no_grad():
        both = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        report = pruner.last_report
        assert report.tokens_per_layer[4] < report.tokens_per_layer[2] < report.tokens_per_layer[0]
        for row in range(2):
            mask = inputs["attention_mask"][row].bool()
            lone = {"input_ids": inputs["input_ids"][row][mask][None], "attention_mask": torch.ones(1, int(mask.sum()),
                    dtype=torch.long), "pixel_values": inputs["pixel_values"][row:row + 1]}
            alone = model.generate(**lone, max_new_tokens=4, do_sample=False)
            assert both[row, -4:].tolist() == alone[0, -4:].tolist()


def test_a_prune_after_a_kv_source_layer_is_refused_by_name(model):
    hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    late = {"name": "late", "criteria": {"n": {"type": "l2_norm"}},
            "schedule": {"type": "stages", "stages": [{"layer": 5, "keep": 0.5}]}}
    with pytest.raises(AdapterError, match=r"its last 2 decoder layers \(6\.\.7\) reuse the keys and values of "
                                           r"layers \[4, 5\]; a prune before layer 5"):
        prunekit.apply(model, late)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with prunekit.apply(model, dict(late, schedule={"type": "stages", "stages": [{"layer": 4, "keep": 0.5}]})):
        pass  # before the first source layer: allowed


def test_doctor_says_which_recipes_the_kv_shared_layers_allow(tmp_path, capsys):
    import json

    from prunekit.cli import main

    gemma3n_config(32, kv_shared_layers=10).save_pretrained(tmp_path)  # layers 22..31 reuse layers 20 and 21
    assert main(["doctor", str(tmp_path), "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)["recipes"]
    assert recipes["transprune-high"] == "runs" and recipes["fastv"] == "runs"  # layers 7, 9, 12; layer 2
    assert recipes["pdrop"].startswith("no: Gemma3nForConditionalGeneration: its last 10 decoder layers (22..31) "
                                       "reuse the keys and values of layers [20, 21]; a prune before layer 24")
