"""A recipe's ``decode`` block (DyCoke's dynamic KV-cache pruning) against a cache-free reference, in float64.

The reference recomputes the whole sequence at every step (tests/reference.py's hand-written LLaVA forward): the
new token's attention row at layer L - 1 (softmax over what it sees, mean over heads) restricted to the visual
tokens, its cosine with the previous step's, the int(n * (1 - prune)) most attended visual tokens, and from layer L
on each decoded token's row masked to the visual tokens its own step selected. This is the official rule
(KD-TAO/DyCoke, modeling_qwen2.py: dycoke_pruning / update_cache) written as a loop over rows, not masks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import prunekit
from prunekit.errors import RecipeError
from reference import RefModel, rms_norm

FASTV = {"name": "fastv-decode", "positions": "original", "criteria": {"a": {"type": "fastv_attention"}},
         "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
READ_LAYER, STEPS = 5, 8  # decode.layer = 6


def _attend(ref: RefModel, layer, x, positions, hide):
    """Causal attention of one layer with the (query, key) pairs ``hide`` [seq, seq] removed: output and probs."""
    q, k, v = ref.qkv(layer, x, positions)
    seq = x.shape[0]
    logits = q @ k.transpose(-1, -2) / math.sqrt(ref.head_dim)
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril() & ~hide
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)  # [heads, seq, seq]
    out = (probs @ v).transpose(0, 1).reshape(seq, -1)
    return F.linear(out, layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias), probs


@torch.no_grad()
def reference_decode(ref: RefModel, input_ids, pixel_values, stage_layer, kept, prune, similar, steps):
    """Greedy decoding without a cache; returns the ids, each step's next-token logits and which steps selected."""
    prompt_length = input_ids.shape[0]
    decoded: list[int] = []
    selections: dict[int, torch.Tensor | None] = {}  # decoded token -> visual tokens (original index) it reads
    previous, logits, selected = None, [], []
    for step in range(steps):
        ids = torch.cat([input_ids, torch.tensor(decoded, dtype=torch.long)])
        h = torch.cat([ref.embeddings(input_ids, pixel_values), ref.embed(ids[prompt_length:])])
        original = torch.arange(h.shape[0])
        positions = original.clone()  # positions: original
        visual = torch.cat([input_ids == ref.image_token_id, torch.zeros(len(decoded), dtype=torch.bool)])
        for index, layer in enumerate(ref.layers):
            if index == stage_layer:
                keep = ~visual | torch.isin(original, kept)
                h, original, positions, visual = h[keep], original[keep], positions[keep], visual[keep]
            hide = torch.zeros(h.shape[0], h.shape[0], dtype=torch.bool)
            if index > READ_LAYER:
                for row in range(h.shape[0]):
                    chosen = selections.get(int(original[row]) - prompt_length)
                    if chosen is not None:
                        hide[row] = visual & ~torch.isin(original, chosen)
            x = rms_norm(h, layer.input_layernorm)
            attn_out, probs = _attend(ref, layer, x, positions, hide)
            if index == READ_LAYER and step > 0:  # the new token (decoded[step - 1]) chooses for layers after
                vector = probs.mean(0)[-1][visual]  # [n_visual]
                cosine = 0.0 if previous is None else float(F.cosine_similarity(vector, previous, dim=0))
                previous = vector
                chooses = similar is None or cosine < similar
                count = int(len(vector) * (1 - prune))
                selections[step - 1] = original[visual][vector.topk(count).indices] if chooses else None
                selected.append(chooses)
            h2 = h + attn_out
            h = h2 + ref.mlp(layer, rms_norm(h2, layer.post_attention_layernorm))
        logits.append(ref.lm_head(rms_norm(h, ref.final_norm))[-1])
        decoded.append(int(logits[-1].argmax()))
    return torch.tensor(decoded), torch.stack(logits), selected


def _run(model, inputs, recipe):
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:], torch.stack([s[0] for s in out.logits]), pruner


@pytest.mark.parametrize("similar", [None, 0.93])
def test_decode_selection_equals_the_cache_free_reference(llava64, single_inputs64, similar):
    recipe = dict(FASTV, decode={"layer": READ_LAYER + 1, "prune": 0.7, "similar": similar})
    ids, logits, pruner = _run(llava64, single_inputs64, recipe)
    kept = pruner.last_report.stages[0].kept[0]
    expected, expected_logits, selected = reference_decode(
        RefModel(llava64), single_inputs64["input_ids"][0], single_inputs64["pixel_values"], 2, kept, 0.7, similar,
        STEPS)
    assert ids.tolist() == expected.tolist()
    torch.testing.assert_close(logits, expected_logits.float(), rtol=0, atol=1e-5)
    if similar is None:
        assert all(selected)
    else:  # the threshold lets some steps read every visual token and makes others select
        assert any(selected[1:]) and not all(selected), selected
    # without the decode block the steps differ: the selection reaches the logits
    _, plain, _ = _run(llava64, single_inputs64, FASTV)
    assert not torch.allclose(plain[1:], logits[1:], atol=1e-4)
    torch.testing.assert_close(plain[0], logits[0], rtol=0, atol=0)  # the prefill is the same


def test_a_padded_batch_equals_the_lone_runs(llava32, shape):
    from prunekit.testing import llava_inputs

    recipe = dict(FASTV, decode={"layer": 4, "prune": 0.8, "similar": None})
    inputs = llava_inputs(shape, batch=2, seed=11, dtype=torch.float32)
    with prunekit.apply(llava32, recipe), torch.no_grad():
        both = llava32.generate(**inputs, max_new_tokens=5, do_sample=False)
        for row in range(2):
            mask = inputs["attention_mask"][row].bool()
            lone = {"input_ids": inputs["input_ids"][row][mask][None],
                    "attention_mask": torch.ones(1, int(mask.sum()), dtype=torch.long),
                    "pixel_values": inputs["pixel_values"][row:row + 1]}
            alone = llava32.generate(**lone, max_new_tokens=5, do_sample=False)
            assert both[row, -5:].tolist() == alone[0, -5:].tolist()


@pytest.mark.parametrize("decode,message", [
    ({"layer": 0}, r"layer=0 must be at least 1"),
    ({"layer": 3, "prune": 1.0}, r"prune=1.0 must lie in \[0, 1\)"),
    ({"layer": 3, "similar": 1.5}, r"similar=1.5 must be a cosine in \[-1, 1\]"),
    ({"layer": 40}, r"layer=40 does not fit: LlavaForConditionalGeneration has 16 decoder layers"),
    ({"layer": 2}, r"the selection reads layer 1, but its first stage prunes before layer 2"),
    ({"layer": 3, "keep": 0.2}, r"keep"),
])
def test_bad_decode_blocks_are_named(llava32, decode, message):
    hooks = sum(len(m._forward_pre_hooks) for m in llava32.modules())
    with pytest.raises(RecipeError, match=message):
        prunekit.apply(llava32, dict(FASTV, decode=decode))
    assert sum(len(m._forward_pre_hooks) for m in llava32.modules()) == hooks


# ---------------------------------------------------------------------------------------------
# a stage that cuts the earlier layers' caches to its selection (cut_earlier: PruneVid)
# ---------------------------------------------------------------------------------------------
CUT = {"name": "cut-earlier", "positions": "original", "criteria": {"n": {"type": "l2_norm"}},
       "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 0.75},
                                                 {"layer": 3, "keep": 0.4, "cut_earlier": True}]}}


@torch.no_grad()
def reference_cut(ref: RefModel, input_ids, pixel_values, kept: list[torch.Tensor], steps: int,
                  stage_layers=(0, 3), cut_from: int = 0, compact: bool = False):
    """Greedy decoding without a cache: the prompt's visual tokens dropped before each of ``stage_layers``
    (``kept``: what each keeps), and every decoded token's rows in layers ``cut_from``..(last stage - 1)
    reading only the visual tokens kept before the last stage. ``compact``: positions renumbered 0..n-1 from the
    first stage on (the decoded tokens continue each stage's count); else the original ones."""
    prompt_length = input_ids.shape[0]
    decoded: list[int] = []
    logits = []
    for _ in range(steps):
        ids = torch.cat([input_ids, torch.tensor(decoded, dtype=torch.long)])
        h = torch.cat([ref.embeddings(input_ids, pixel_values), ref.embed(ids[prompt_length:])])
        original = torch.arange(h.shape[0])
        visual = torch.cat([input_ids == ref.image_token_id, torch.zeros(len(decoded), dtype=torch.bool)])
        for index, layer in enumerate(ref.layers):
            if index in stage_layers:
                keep = ~visual | torch.isin(original, kept[stage_layers.index(index)])
                h, original, visual = h[keep], original[keep], visual[keep]
            hide = torch.zeros(h.shape[0], h.shape[0], dtype=torch.bool)
            if cut_from <= index < stage_layers[-1]:
                decoded_rows = original >= prompt_length
                hide[decoded_rows] = visual & ~torch.isin(original, kept[-1])
            positions = torch.arange(h.shape[0]) if compact and index >= stage_layers[0] else original
            attn_out, _ = _attend(ref, layer, rms_norm(h, layer.input_layernorm), positions, hide)
            h2 = h + attn_out
            h = h2 + ref.mlp(layer, rms_norm(h2, layer.post_attention_layernorm))
        logits.append(ref.lm_head(rms_norm(h, ref.final_norm))[-1])
        decoded.append(int(logits[-1].argmax()))
    return torch.tensor(decoded), torch.stack(logits)


def test_cut_earlier_equals_the_cache_free_reference(llava64, single_inputs64):
    ids, logits, pruner = _run(llava64, single_inputs64, CUT)
    kept = [stage.kept[0] for stage in pruner.last_report]
    expected, expected_logits = reference_cut(RefModel(llava64), single_inputs64["input_ids"][0],
                                              single_inputs64["pixel_values"], kept, STEPS)
    assert ids.tolist() == expected.tolist()
    torch.testing.assert_close(logits, expected_logits.float(), rtol=0, atol=1e-5)
    plain = dict(CUT, schedule={"type": "stages", "stages": [{"layer": 0, "keep": 0.75}, {"layer": 3, "keep": 0.4}]})
    _, uncut, _ = _run(llava64, single_inputs64, plain)
    assert not torch.allclose(uncut[1:], logits[1:], atol=1e-4)  # the cut reaches the decode steps
    torch.testing.assert_close(uncut[0], logits[0], rtol=0, atol=0)  # and not the prefill


def test_cut_from_a_layer_before_the_first_stage_equals_the_reference(llava64, single_inputs64):
    """MustDrop's cut: layers 1..3 (layer 1 runs before any stage, on the whole prompt) read the visual tokens
    the stage before layer 4 kept; layer 0 keeps its whole cache."""
    recipe = dict(CUT, schedule={"type": "stages", "stages": [
        {"layer": 2, "keep": 0.75}, {"layer": 4, "keep": 0.4, "cut_earlier": True, "cut_from": 1}]})
    ids, logits, pruner = _run(llava64, single_inputs64, recipe)
    kept = [stage.kept[0] for stage in pruner.last_report]
    expected, expected_logits = reference_cut(RefModel(llava64), single_inputs64["input_ids"][0],
                                              single_inputs64["pixel_values"], kept, STEPS, (2, 4), cut_from=1)
    assert ids.tolist() == expected.tolist()
    torch.testing.assert_close(logits, expected_logits.float(), rtol=0, atol=1e-5)
    _, from_two, _ = _run(llava64, single_inputs64, dict(recipe, schedule={"type": "stages", "stages": [
        {"layer": 2, "keep": 0.75}, {"layer": 4, "keep": 0.4, "cut_earlier": True, "cut_from": 2}]}))
    assert not torch.allclose(from_two[1:], logits[1:], atol=1e-4)  # layer 1's cut reaches the decode steps


@pytest.mark.parametrize("stages,message", [
    ([{"layer": 0, "keep": 0.5, "cut_earlier": True}], "cut_earlier on the stage before layer 0: no layer comes"),
    ([{"layer": 2, "keep": 0.75}, {"layer": 4, "keep": 0.5, "cut_from": 1}],
     "cut_from \\(1\\) names the first layer cut_earlier cuts; set cut_earlier: true"),
    ([{"layer": 4, "keep": 0.5, "cut_earlier": True, "cut_from": 4}], "cut_from must be an int in 0..3"),
])
def test_cut_earlier_without_earlier_pruned_layers_is_named(llava32, stages, message):
    with pytest.raises(RecipeError, match=message):
        prunekit.apply(llava32, dict(CUT, schedule={"type": "stages", "stages": stages}))
