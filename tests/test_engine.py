"""Engine behaviour on the tiny LLaVA: keep-all identity, padded batches, hook removal, decode bookkeeping."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import prunekit
from conftest import SHAPE, unpad
from prunekit.testing import llava_inputs, tiny_llava
from prunekit.compat import with_cache

KEEP_ALL = {
    "name": "keep-all",
    "criteria": {"ttv": {"type": "accumulated_ttv", "first_layer": 1, "last_layer": 4}, "iga": {}},
    "combiner": {"type": "weighted_sum", "weights": {"ttv": 0.5, "iga": 0.5}},
    "schedule": {"type": "stages", "stages": [{"layer": 3, "keep": 1.0}, {"layer": 5, "keep": 1.0}]},
}


def _generate(model, inputs, steps=5):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, do_sample=False)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("batch", [1, 3])
def test_keep_everything_is_identical_to_the_bare_model(llava32, positions, batch):
    inputs = llava_inputs(SHAPE, batch=batch, seed=11)
    with torch.no_grad():
        bare_logits = llava32(**inputs).logits
    bare_ids = _generate(llava32, inputs)
    with prunekit.apply(llava32, KEEP_ALL, [f"positions={positions}"]) as pruner:
        with torch.no_grad():
            logits = llava32(**inputs).logits
        ids = _generate(llava32, inputs)
    assert torch.equal(logits, bare_logits)
    assert torch.equal(ids, bare_ids)
    assert pruner.last_report.tokens_per_layer == [inputs["input_ids"].shape[1]] * SHAPE.num_layers


@pytest.mark.parametrize("recipe", ["transprune-high", "fastv", "random"])
def test_each_sample_of_a_padded_batch_gets_its_lone_answer(llava64, recipe):
    inputs = llava_inputs(SHAPE, batch=3, seed=5, dtype=torch.float64)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    with prunekit.apply(llava64, recipe) as pruner, torch.no_grad():
        batch_out = llava64.generate(**inputs, max_new_tokens=5, do_sample=False,
                                     return_dict_in_generate=True, output_logits=True)
        batch_report = pruner.last_report
        for row in range(3):
            alone = unpad(inputs, row)
            out = llava64.generate(**alone, max_new_tokens=5, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            for stage_batch, stage_alone in zip(batch_report, pruner.last_report):
                kept = stage_batch.kept[row]
                assert torch.equal(kept[kept >= 0] - pad, stage_alone.kept[0])
            assert out.sequences[0, alone["input_ids"].shape[1]:].tolist() == \
                batch_out.sequences[row, inputs["input_ids"].shape[1]:].tolist()
            for step_batch, step_alone in zip(batch_out.logits, out.logits):
                torch.testing.assert_close(step_batch[row], step_alone[0], rtol=1e-5, atol=1e-5)


def test_samples_with_different_visual_counts_share_a_batch(llava64):
    """A sample with two images and one with one image keep different counts in one batch."""
    two = llava_inputs(SHAPE, batch=1, images=2, seed=7, dtype=torch.float64)
    one = llava_inputs(SHAPE, batch=1, images=1, seed=8, dtype=torch.float64)
    width = max(two["input_ids"].shape[1], one["input_ids"].shape[1])

    def left_pad(t, value=0):
        return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

    batch = {
        "input_ids": torch.cat([left_pad(two["input_ids"]), left_pad(one["input_ids"])]),
        "attention_mask": torch.cat([left_pad(two["attention_mask"]), left_pad(one["attention_mask"])]),
        "pixel_values": torch.cat([two["pixel_values"], one["pixel_values"]]),
    }
    with prunekit.apply(llava64, "transprune-high") as pruner, torch.no_grad():
        out = llava64.generate(**batch, max_new_tokens=4, do_sample=False)
        report = pruner.last_report
        lone = [llava64.generate(**x, max_new_tokens=4, do_sample=False) for x in (two, one)]
    assert report.visual_tokens.tolist() == [72, 36]
    assert report[2].kept_counts.tolist() == [int(72 * 0.125), int(36 * 0.125)]
    assert report[2].kept[1, int(36 * 0.125):].eq(-1).all()  # the shorter row is padded with -1
    for row, alone in enumerate(lone):
        assert out[row, width:].tolist() == alone[0, -4:].tolist()


def _hook_snapshot(model):
    counts = {}
    for name, module in model.named_modules():
        counts[name] = (len(module._forward_hooks), len(module._forward_pre_hooks),
                        len(getattr(module, "_forward_hooks_with_kwargs", {})))
    configs = (model.config._attn_implementation, model.config.text_config._attn_implementation,
               model.model.language_model.config._attn_implementation)
    return counts, configs, sorted(ALL_ATTENTION_FUNCTIONS), sorted(ALL_MASK_ATTENTION_FUNCTIONS)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_remove_leaves_no_hook_and_no_changed_attribute(llava32, single_inputs64):
    before, params = _hook_snapshot(llava32), _state(llava32)
    inputs = llava_inputs(SHAPE, batch=2, seed=2)
    pruner = prunekit.apply(llava32, "transprune-high")
    assert _hook_snapshot(llava32) != before  # hooks and the attention tap are in place
    assert "prunekit" in llava32.model.language_model.config._attn_implementation
    _generate(llava32, inputs)
    pruner.remove()
    assert _hook_snapshot(llava32) == before
    pruner.remove()  # idempotent
    after = _state(llava32)
    assert all(torch.equal(params[k], after[k]) for k in params)


def test_hooks_are_removed_after_an_exception_in_the_with_body(llava32):
    before = _hook_snapshot(llava32)
    with pytest.raises(ZeroDivisionError):
        with prunekit.apply(llava32, "transprune-high"):
            _generate(llava32, llava_inputs(SHAPE, batch=1, seed=2), steps=2)
            1 / 0
    assert _hook_snapshot(llava32) == before


def test_hooks_are_removed_after_an_exception_inside_the_forward(llava32):
    before = _hook_snapshot(llava32)
    bad = llava_inputs(SHAPE, batch=1, seed=2)
    bad["pixel_values"] = bad["pixel_values"][:, :, :5]  # wrong image size: the vision tower raises
    with pytest.raises(Exception):
        with prunekit.apply(llava32, "fastv"):
            llava32(**bad)
    assert _hook_snapshot(llava32) == before
    # and the model still works normally afterwards
    inputs = llava_inputs(SHAPE, batch=1, seed=2)
    with torch.no_grad():
        assert llava32(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_second_apply_on_a_pruned_model_is_a_clear_error(llava32):
    with prunekit.apply(llava32, "fastv"):
        with pytest.raises(prunekit.PrunerStateError, match="already has an active pruner.*fastv"):
            prunekit.apply(llava32, "transprune-high")
    with prunekit.apply(llava32, "transprune-high"):  # fine once the first is gone
        pass


def test_a_removed_pruner_cannot_be_reinstalled(llava32):
    pruner = prunekit.apply(llava32, "fastv")
    pruner.remove()
    with pytest.raises(prunekit.PrunerStateError, match="removed"):
        pruner.install()


def test_two_models_are_pruned_at_once():
    a = tiny_llava(SHAPE, seed=3)
    b = tiny_llava(SHAPE, seed=4)
    inputs = llava_inputs(SHAPE, batch=1, seed=9)
    with prunekit.apply(a, "transprune-high") as pa, prunekit.apply(b, "fastv") as pb:
        with torch.no_grad():
            a(**inputs)
            b(**inputs)
    assert [s.layer for s in pa.last_report] == [7, 9, 12]
    assert [s.layer for s in pb.last_report] == [2]


def test_kv_cache_of_each_layer_holds_only_its_kept_tokens(llava32):
    inputs = llava_inputs(SHAPE, batch=2, seed=4)
    cache = DynamicCache(config=llava32.config.text_config)
    with prunekit.apply(llava32, "transprune-high") as pruner, torch.no_grad():
        llava32(**inputs, **with_cache(llava32, cache), use_cache=True)
    report = pruner.last_report
    lengths = [cache.layers[i].keys.shape[-2] for i in range(SHAPE.num_layers)]
    assert lengths == report.tokens_per_layer
    n = inputs["input_ids"].shape[1]
    assert lengths[:7] == [n] * 7
    assert lengths[7] == n - 36 + int(36 * 0.875) and lengths[12] == n - 36 + int(36 * 0.125)


def test_eager_attention_models_are_pruned_through_the_same_tap():
    eager = tiny_llava(SHAPE, seed=0, dtype=torch.float64, attn_implementation="eager")
    sdpa = tiny_llava(SHAPE, seed=0, dtype=torch.float64, attn_implementation="sdpa")
    # equal prompt lengths: transformers' own eager path turns padded float64 rows into NaN
    inputs = llava_inputs(SHAPE, prefix=[[5, 6, 7], [8, 9, 10]], question=[[11, 12, 13, 14], [15, 16, 17, 18]],
                          dtype=torch.float64)
    reports, logits = [], []
    for model in (eager, sdpa):
        with prunekit.apply(model, "transprune-high") as pruner, torch.no_grad():
            logits.append(model(**inputs).logits)
        reports.append(pruner.last_report)
        assert model.config.text_config._attn_implementation in ("eager", "sdpa")
    for a, b in zip(*reports):
        assert torch.equal(a.kept, b.kept)
    # eager takes its softmax in float32, so the two agree to float32 precision only
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def test_report_counts_tokens_per_layer(llava32):
    inputs = llava_inputs(SHAPE, batch=1, seed=1)
    n = inputs["input_ids"].shape[1]
    with prunekit.apply(llava32, "transprune-high") as pruner, torch.no_grad():
        llava32(**inputs)
    report = pruner.last_report
    expected = [n] * 7 + [n - 36 + 31] * 2 + [n - 36 + 22] * 3 + [n - 36 + 4] * 4
    assert report.tokens_per_layer == expected
    assert report.real_tokens_per_layer[0].tolist() == expected
    for stage in report:
        assert stage.kept.dtype == torch.long and torch.all(stage.kept[0, 1:] > stage.kept[0, :-1])
        assert torch.all(inputs["input_ids"][0, stage.kept[0]] == SHAPE.image_token_id)


def test_the_scoring_pass_puts_the_projections_back_also_after_an_exception(llava32, monkeypatch):
    """IGA's scoring pass projects only the query rows it reads; no hook stays on the model's modules afterwards."""
    attention = llava32.model.language_model.layers[7].self_attn
    originals = (attention.q_proj, attention.k_proj, attention.v_proj)
    seen = []

    def failing_rows(query, key, scaling, weights, valid):
        seen.append((attention.q_proj is originals[0], attention.v_proj is originals[2],
                     bool(attention.q_proj._forward_pre_hooks), bool(attention.v_proj._forward_hooks)))
        raise RuntimeError("boom")

    monkeypatch.setattr("prunekit.scoring.attention_rows", failing_rows)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        with prunekit.apply(llava32, "transprune-high"):
            llava32(**llava_inputs(SHAPE, batch=1, seed=2))
    assert seen == [(True, True, True, True)]  # hooked (never swapped: other threads use them) while the pass ran
    assert (attention.q_proj, attention.k_proj, attention.v_proj) == originals
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in originals)
