"""Qwen3-VL / Qwen3-VL-MoE deepstack under pruning: the deepstack features follow the kept tokens.

A tiny model whose vision tower feeds three deepstack layers (the decoder adds visual features after
its layers 0, 1 and 2, as in the released checkpoints), pruned before one of those layers, against
the hook-free layer-by-layer reference of ``family_reference`` (which adds each kept visual token's
own deepstack row after layers 0-2): prefill logits and every step of a cached greedy decode.
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from family_reference import run_family_reference
from prunekit.compat import cache_of, with_cache
from prunekit.testing import family_inputs, tiny_family_model

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3VLConfig"):
    pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL", allow_module_level=True)

LAYERS = 8
# reference_depth 28 maps transprune-high's stages (7, 9, 12) onto layers 2, 3, 4 and FastV's (2) onto
# layer 1 of these 8 layers: both prune before a deepstack layer (0, 1, 2).
SCALED = ["reference_depth=28"]
DECODE_STEPS = 3


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_vl_moe"])
def family(request):
    name = request.param
    if name == "qwen3_vl_moe" and not hasattr(transformers, "Qwen3VLMoeConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL-MoE")
    model = tiny_family_model(name, num_layers=LAYERS, seed=5, dtype=torch.float64)
    assert len(model.config.vision_config.deepstack_visual_indexes) == 3
    return name, model


def _visual_ids(model) -> list[int]:
    return [model.config.image_token_id, model.config.video_token_id]


def _pruned_run(model, recipe: str, sample: dict, positions: str):
    """Prefill logits [seq, vocab], the report, and the logits [vocab] of each cached greedy decode step."""
    with prunekit.apply(model, recipe, [*SCALED, f"positions={positions}"]) as pruner, torch.no_grad():
        logits = model(**sample).logits[0]
        report = pruner.last_report
        result = model(**sample, use_cache=True)
        step_logits, decoded = [], []
        for _ in range(DECODE_STEPS):
            step_logits.append(result.logits[0, -1])
            next_id = result.logits[:, -1].argmax(-1, keepdim=True)
            decoded.append(int(next_id))
            step = {"input_ids": next_id, "mm_token_type_ids": torch.zeros_like(next_id),
                    **with_cache(model, cache_of(result)), "use_cache": True}
            result = model(**step)  # M-RoPE: positions from the cache length and the rope deltas
    return logits, report, step_logits, decoded


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
@pytest.mark.parametrize("recipe,positions", [("fastv", "original"), ("transprune-high", "compact"),
                                              ("transprune-high", "original")])
def test_pruning_inside_the_deepstack_layers_matches_the_layer_by_layer_reference(family, recipe, positions, video):
    name, model = family
    sample = family_inputs(model, name, batch=1, seed=2, sizes=[(24, 32)], video=video, dtype=torch.float64)
    logits, report, step_logits, decoded = _pruned_run(model, recipe, sample, positions)
    stages = [s.layer for s in report]
    kept = [s.kept[0] for s in report]
    assert stages[0] < 3, f"the first stage (layer {stages[0]}) must prune before a deepstack layer"
    n_visual = int(torch.isin(sample["input_ids"], torch.tensor(_visual_ids(model))).sum())
    assert 0 < len(kept[0]) < n_visual
    ref = run_family_reference(model, name, sample, _visual_ids(model), stages, kept, positions)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-8)
    for t in range(DECODE_STEPS):
        ref_step = run_family_reference(model, name, sample, _visual_ids(model), stages, kept, positions,
                                        decoded=torch.tensor(decoded[:t], dtype=torch.long))
        torch.testing.assert_close(step_logits[t], ref_step[-1], rtol=0, atol=1e-8)


def test_the_reference_without_deepstack_differs(family):
    """The deepstack additions matter on this model: a reference that skips them gives other logits."""
    name, model = family
    sample = family_inputs(model, name, batch=1, seed=2, sizes=[(24, 32)], dtype=torch.float64)
    logits, report, _, _ = _pruned_run(model, "fastv", sample, "original")
    stages, kept = [s.layer for s in report], [s.kept[0] for s in report]
    saved = model.model.visual.deepstack_visual_indexes
    # a vision tower with no deepstack layers hands the decoder no deepstack features
    model.model.visual.deepstack_visual_indexes = []
    try:
        without = run_family_reference(model, name, sample, _visual_ids(model), stages, kept, "original")
    finally:
        model.model.visual.deepstack_visual_indexes = saved
    assert (logits - without).abs().max() > 1e-3


def test_a_padded_batch_generates_each_samples_lone_answer_and_the_model_is_restored(family):
    name, model = family
    inputs = family_inputs(model, name, batch=2, seed=6, sizes=[(32, 40), (24, 24)], dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with prunekit.apply(model, "fastv", SCALED) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert pruner.last_report[0].layer < 3
    for row in range(2):
        mask = inputs["attention_mask"][row].bool()
        counts = inputs["image_grid_thw"].prod(dim=1).tolist()
        start = sum(counts[:row])
        alone = {"input_ids": inputs["input_ids"][row][mask][None],
                 "attention_mask": inputs["attention_mask"][row][mask][None],
                 "mm_token_type_ids": inputs["mm_token_type_ids"][row][mask][None],
                 "pixel_values": inputs["pixel_values"][start:start + counts[row]],
                 "image_grid_thw": inputs["image_grid_thw"][row:row + 1]}
        with prunekit.apply(model, "fastv", SCALED), torch.no_grad():
            out = model.generate(**alone, max_new_tokens=3, do_sample=False)
        assert batch_out[row, inputs["input_ids"].shape[1]:].tolist() == out[0, alone["input_ids"].shape[1]:].tolist()
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
