"""MustDrop's prefill and decode stages (`mustdrop`) against the official algorithm written out by hand, in float64.

The reference follows liuting20/MustDrop: the key set from the vision tower's own attention maps (the model reloaded
with eager attention, ``output_attentions``: the CLS row of the last vision layer, mean over heads, top
``ceil(0.08 P)``, as ``clip_encoder.py``), then the decoder layer by layer (tests/reference.py's hand-written LLaVA):
after each pruning layer its full causal attention, the rows of the text after the image over the visual columns,
mean over heads, and ``dual_attention_filter``'s rule (sum over rows < total * global_thr and max over rows <
individual_thr: dropped), the key set put back (``torch.unique(cat(kept, keys))``), positions renumbered 0..n-1 (the
official ``position_ids.narrow``). Decode steps go without a cache: the stages keep what the prefill kept, and the
decoded rows of the cut layers read only the visual tokens the last stage kept.
"""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from conftest import SHAPE
from prunekit.errors import LayoutError, RecipeError
from prunekit.testing import llava_inputs, tiny_family_model, tiny_llava
from reference import RefModel, rms_norm
from test_decode_selection import reference_cut

# thresholds and a key set that bite on a 36-patch random model (the recipe's 8 % is 3 of 36 patches here)
THRESHOLDS = ["criteria.mustdrop.global_thr=0.026", "criteria.mustdrop.individual_thr=0.05",
              "criteria.mustdrop.key_fraction=0.3"]
STEPS = 5


def stage_layers(num_layers: int) -> list[int]:
    """The recipe's stages (before 3, 7, 11, 15 of 32 layers) on ``num_layers`` layers, as reference_depth maps them."""
    return [math.ceil(layer * num_layers / 32) for layer in (3, 7, 11, 15)]


@pytest.fixture(scope="module")
def eager64():
    """The same weights as conftest's llava64, with eager attention: the tower returns its attention maps."""
    return tiny_llava(SHAPE, seed=0, dtype=torch.float64, attn_implementation="eager")


def official_keys(eager, pixel_values, fraction=0.08) -> torch.Tensor:
    """Patch indices of the key set: the last vision layer's CLS row, mean over heads, top ceil(fraction * P)."""
    out = eager.model.vision_tower(pixel_values.to(torch.float64), output_attentions=True)
    cls = out.attentions[-1][0, :, 0, 1:].mean(dim=0)  # [P]
    return torch.topk(cls, math.ceil(fraction * cls.shape[0])).indices


@torch.no_grad()
def official_prefill(ref: RefModel, embeds, visual, key_positions, pruning_layers, global_thr, individual_thr):
    """The official prefill on the language model's input ``embeds`` [seq, dim] (``visual`` [seq] bool, one image
    run; ``key_positions``: the key set's indices in this sequence): the kept indices after each pruning layer, and
    the last token's logits."""
    h = embeds
    start, img_seq = int(visual.nonzero()[0]), int(visual.sum())
    original = torch.arange(h.shape[0])
    kept_per_stage = []
    for index, layer in enumerate(ref.layers):
        positions = torch.arange(h.shape[0])  # renumbered after every prune
        x = rms_norm(h, layer.input_layernorm)
        probs = ref.attention_probs(layer, x, positions)  # [heads, seq, seq]
        h2 = h + ref.attention(layer, x, positions)
        h = h2 + ref.mlp(layer, rms_norm(h2, layer.post_attention_layernorm))
        if index in pruning_layers:
            attn = probs[:, start + img_seq:, start:start + img_seq].mean(dim=0)  # [text_seq, img_seq]
            attn_sum = attn.sum(dim=0)
            candidate = (attn_sum < attn_sum.sum() * global_thr) & (attn.max(dim=0).values < individual_thr)
            vis = torch.arange(img_seq)[~candidate]
            vis = torch.unique(torch.cat([vis, torch.nonzero(torch.isin(original[start:start + img_seq],
                                                                          key_positions)).flatten()]))
            merged = torch.cat([torch.arange(start), vis + start, torch.arange(start + img_seq, h.shape[0])])
            h, original = h[merged], original[merged]
            img_seq = len(vis)
            kept_per_stage.append(original[start:start + img_seq])
    return kept_per_stage, ref.lm_head(rms_norm(h, ref.final_norm))[-1]


def test_mustdrop_prefill_and_decode_equal_the_official_algorithm(llava64, eager64, single_inputs64):
    assert torch.equal(eager64.lm_head.weight, llava64.lm_head.weight)
    ids, pixels = single_inputs64["input_ids"][0], single_inputs64["pixel_values"]
    stages = stage_layers(SHAPE.num_layers)
    keys = official_keys(eager64, pixels, 0.3)
    ref = RefModel(llava64)
    visual = ids == ref.image_token_id
    start = int(visual.nonzero()[0])
    kept, expected_logits = official_prefill(ref, ref.embeddings(ids, pixels), visual, start + keys,
                                             [s - 1 for s in stages], 0.026, 0.05)
    with prunekit.apply(llava64, "mustdrop", THRESHOLDS) as pruner, torch.no_grad():
        logits = llava64(**single_inputs64).logits[0, -1]
        report = pruner.last_report
    assert [stage.layer for stage in report.stages] == stages
    got = [stage.kept[0] for stage in report.stages]
    for ours, theirs in zip(got, kept):
        assert ours.tolist() == theirs.tolist()
    counts = [len(k) for k in kept]
    assert counts[0] < int((ids == llava64.config.image_token_id).sum()) and counts[-1] < counts[0], counts
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-10)
    assert set((start + keys).tolist()) <= set(kept[-1].tolist())  # the key set is never dropped
    # without the key set some of its tokens go: the key set is what keeps them
    with prunekit.apply(llava64, "mustdrop", [*THRESHOLDS, "criteria.mustdrop.key_fraction=0"]) as pruner:
        with torch.no_grad():
            llava64(**single_inputs64)
        assert not set((start + keys).tolist()) <= set(pruner.last_report.stages[-1].kept[0].tolist())

    with prunekit.apply(llava64, "mustdrop", THRESHOLDS) as pruner, torch.no_grad():
        out = llava64.generate(**single_inputs64, max_new_tokens=STEPS, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
    new = out.sequences[0, ids.shape[0]:]
    assert [s.kept[0].tolist() for s in pruner.last_report.stages] == [k.tolist() for k in kept]
    expected_ids, expected_steps = reference_cut(RefModel(llava64), ids, pixels, kept, STEPS, stages,
                                                 cut_from=math.ceil(2 * SHAPE.num_layers / 32), compact=True)
    assert new.tolist() == expected_ids.tolist()
    torch.testing.assert_close(torch.stack([s[0] for s in out.logits]), expected_steps.float(), rtol=0, atol=1e-5)


def test_mustdrop_3stage_maps_the_key_set_through_the_vision_stage(llava64, eager64, single_inputs64):
    """The three stages in one recipe: the window merge before the projector (8 patches kept, 7 merged windows
    leading the image), then the filter on the language model's input as it receives it, the key set being the
    kept patches among the official key set (merged windows are not key tokens)."""
    ids, pixels = single_inputs64["input_ids"][0], single_inputs64["pixel_values"]
    keys = official_keys(eager64, pixels, 0.3)  # patch indices of the whole image
    lm = llava64.model.language_model
    seen = {}
    hook = lm.register_forward_pre_hook(lambda m, a, kw: seen.update(embeds=kw["inputs_embeds"][0].clone()),
                                        with_kwargs=True)
    try:
        with prunekit.apply(llava64, "mustdrop-3stage", ["vision.count=8", *THRESHOLDS]) as pruner, torch.no_grad():
            logits = llava64(**single_inputs64).logits[0, -1]
            report = pruner.last_report
    finally:
        hook.remove()
    start = int((ids == llava64.config.image_token_id).nonzero()[0])
    kept_patches = report.stages[0].kept[0] - start  # the patches the vision stage kept, ascending
    lead = 7  # 28 dropped patches are 7 merged 2x2 windows, leading the image
    visual = torch.zeros(seen["embeds"].shape[0], dtype=torch.bool)
    visual[start:start + lead + len(kept_patches)] = True
    key_slots = start + lead + torch.nonzero(torch.isin(kept_patches, keys)).flatten()
    assert 0 < len(key_slots) < len(keys)  # some keys were merged away, some kept
    stages = stage_layers(SHAPE.num_layers)
    kept, expected_logits = official_prefill(RefModel(llava64), seen["embeds"], visual, key_slots,
                                             [s - 1 for s in stages], 0.026, 0.05)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-10)
    got = report.visual_tokens_per_layer[0].tolist()
    assert [got[s] for s in stages] == [len(k) for k in kept]
    assert set(key_slots.tolist()) <= set(kept[-1].tolist())


def test_mustdrop_batch_rows_equal_each_sample_alone(llava32):
    """Each row of a left-padded batch keeps what it keeps alone: its own key set, text rows and thresholds."""
    batch = llava_inputs(SHAPE, batch=2, seed=5)
    with prunekit.apply(llava32, "mustdrop", THRESHOLDS) as pruner, torch.no_grad():
        llava32(**batch)
        together = [[stage.kept[row] for stage in pruner.last_report.stages] for row in range(2)]
        for row in range(2):
            mask = batch["attention_mask"][row].bool()
            pad = int((~mask).sum())
            llava32(input_ids=batch["input_ids"][row][mask][None], attention_mask=batch["attention_mask"][row][mask][None],
                    pixel_values=batch["pixel_values"][row:row + 1])
            alone = [stage.kept[0] for stage in pruner.last_report.stages]
            for a, b in zip(alone, together[row]):
                assert (b[b >= 0] - pad).tolist() == a.tolist()


def test_mustdrop_refusals(llava32):
    with pytest.raises(RecipeError, match="no prune before layer 0"):
        prunekit.apply(llava32, "mustdrop", ["schedule.stages.0.layer=0"])
    with pytest.raises(RecipeError, match="global_thr must be a number in \\[0, 1\\]"):
        prunekit.apply(llava32, "mustdrop", ["criteria.mustdrop.global_thr=2"])
    with pytest.raises(RecipeError, match="reads vision layer -9, past the depth: valid layers -2..1"):
        prunekit.apply(llava32, "mustdrop", ["criteria.mustdrop.key_layer=-9"])
    qwen = tiny_family_model("qwen2_5_vl")
    with pytest.raises(RecipeError, match="reads the vision tower from a decoder stage"):
        prunekit.apply(qwen, "mustdrop")
    # no key set: the filter alone runs on any family
    prunekit.apply(qwen, "mustdrop", ["criteria.mustdrop.key_fraction=0"]).remove()


def test_mustdrop_key_set_refuses_copies_it_cannot_map(llava32):
    inputs = llava_inputs(SHAPE, batch=1, seed=3)
    with prunekit.apply(llava32, "mustdrop", THRESHOLDS), pytest.raises(LayoutError, match="the key set maps"):
        llava32.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2)


def test_mustdrop_flops_are_a_bound_and_the_measured_counts_give_the_real_ones(llava32):
    """The FLOPs model cannot know a threshold's counts: `prunekit flops` marks its figure an upper bound (no
    pruning), and the FLOPs of a run's per-layer counts are the sum of the layers' FLOPs written out here."""
    from prunekit.flops import DecoderDims, estimate, measured_estimate, recipe_estimate

    dims = DecoderDims.from_config(llava32.config)
    analytic = recipe_estimate(prunekit.load_recipe("mustdrop"), dims, SHAPE.visual_tokens)
    assert analytic.bound and analytic.visual_ratio == 1.0
    assert not recipe_estimate(prunekit.load_recipe("fastv"), dims, SHAPE.visual_tokens).bound
    with prunekit.apply(llava32, "mustdrop", THRESHOLDS) as pruner, torch.no_grad():
        llava32(**llava_inputs(SHAPE, batch=1, seed=3))
    counts = pruner.last_report.visual_tokens_per_layer[0].tolist()
    d, m = dims.hidden_size, dims.intermediate_size

    def by_hand(tokens):
        return sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in tokens)

    measured = measured_estimate(counts, dims, SHAPE.visual_tokens)
    assert measured.visual_ratio == pytest.approx(by_hand(counts) / by_hand([SHAPE.visual_tokens] * len(counts)))
    assert measured.visual_ratio < 1.0 and not measured.bound
    assert estimate([], dims, SHAPE.visual_tokens).visual_tokens == [SHAPE.visual_tokens] * len(counts)
