"""MustDrop's vision-encoding stage against a slow re-derivation of LightCompress's merge (loops over windows)."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from criteria_helpers import inputs576
from prunekit.errors import RecipeError
from prunekit.flops import DecoderDims, recipe_estimate


def official_merge(features: torch.Tensor, retained: int) -> torch.Tensor:
    """One image's tokens after MustDrop's spatial merge, written out window by window.

    features: [576, dim] (CLS left out). 2x2 windows, row-major; each window's similarity is the mean cosine of
    its distinct pairs; the r = (N - retained) // 3 most alike windows (topk order) become the mean of their four
    patches and lead, the other patches follow in grid order.
    """
    n, _ = features.shape
    side = math.isqrt(n)
    windows, members = [], []
    for gh in range(side // 2):
        for gw in range(side // 2):
            idx = [(2 * gh + dy) * side + 2 * gw + dx for dy in (0, 1) for dx in (0, 1)]
            total = 0.0
            for a in idx:
                for b in idx:
                    if a != b:
                        total += float(torch.nn.functional.cosine_similarity(features[a], features[b], dim=0))
            windows.append(total / 12)
            members.append(idx)
    r = (n - retained) // 3
    top = torch.tensor(windows, dtype=torch.float64).topk(r).indices.tolist()
    merged = [features[members[w]].mean(dim=0) for w in top]
    gone = {p for w in top for p in members[w]}
    return torch.stack(merged + [features[p] for p in range(n) if p not in gone])


def _projector_inputs(model, inputs, recipe):
    seen = []
    with prunekit.apply(model, recipe) as pruner:
        handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        try:
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        finally:
            handle.remove()
    return seen[0], pruner.last_report, out


def test_mustdrop_merges_what_the_official_formula_merges(llava576):
    inputs = inputs576(batch=2, seed=3)
    projected_input, report, out = _projector_inputs(llava576, inputs, "mustdrop-192")
    with torch.no_grad():
        states = llava576.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
    features = states[-2][:, 1:]  # [images, 576, dim]: what the projector receives unpruned
    for image in range(2):
        expected = official_merge(features[image], 192)
        assert projected_input[image].shape == expected.shape == (192, features.shape[-1])
        torch.testing.assert_close(projected_input[image], expected, rtol=0, atol=1e-12)
    assert report.visual_tokens_per_layer[:, 0].tolist() == [192, 192]
    predicted = recipe_estimate(prunekit.load_recipe("mustdrop-192"), DecoderDims.from_config(llava576.config),
                                576).visual_tokens
    assert report.visual_tokens_per_layer[0].tolist() == predicted
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2  # generate returns the prompt as given


def test_mustdrop_needs_whole_windows_and_an_even_square_grid(llava576):
    partial = {"name": "partial", "vision": {"criteria": {"l2": {"type": "visionzip", "layer": -2}}, "count": 63,
                                              "merge": {"type": "mustdrop_merge"}}}
    with prunekit.apply(llava576, partial), pytest.raises(RecipeError, match="merges whole 2x2 windows"):
        llava576(**inputs576(seed=1))
    from prunekit.criteria.mustdrop import window_similarity

    with pytest.raises(RecipeError, match="square patch grid of even side; an image has 575 patches"):
        window_similarity(torch.zeros(1, 575, 4))
