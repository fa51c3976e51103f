"""Capture the per-criterion scores a pruner computes at each stage (for comparison with references)."""

from __future__ import annotations

import torch

import prunekit


def capture_scores(model, recipe, inputs):
    """Run one prefill; return, per stage, {criterion key: [batch, seq] score} on that stage's sequence."""
    pruner = prunekit.apply(model, recipe)
    captured = []
    original = pruner.recipe.combiner.combine

    def spy(scores, visual):
        captured.append({k: v.detach().clone() for k, v in scores.items()})
        return original(scores, visual)

    object.__setattr__(pruner.recipe.combiner, "combine", spy)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        object.__delattr__(pruner.recipe.combiner, "combine")
        pruner.remove()
    return captured
