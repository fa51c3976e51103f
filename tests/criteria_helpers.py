"""Capture the per-criterion scores a pruner computes at each stage (for comparison with references)."""

from __future__ import annotations

import math

import torch
from conftest import SHAPE576

import prunekit
from prunekit.testing import llava_inputs


def inputs576(batch=1, seed=0):
    """Left-padded float64 inputs of the 576-visual-token tiny LLaVA (``llava576``)."""
    return llava_inputs(SHAPE576, batch=batch, seed=seed, dtype=torch.float64)


def embeddings_with_images(model, inputs):
    """The decoder's input embeddings [batch, seq, dim] with the projected image features in place (no hooks)."""
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids).clone()
    feats = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    embeds[ids == SHAPE576.image_token_id] = torch.cat(list(feats)).to(embeds.dtype)
    return embeds


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


# plain-Python vector helpers for the loop re-derivations of the official video methods (FastVID, PruneVid, HoliTom)
def loop_dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def loop_cos(a: list[float], b: list[float]) -> float:
    return loop_dot(a, b) / (math.sqrt(loop_dot(a, a)) * math.sqrt(loop_dot(b, b)))


def loop_mean(vectors: list[list[float]]) -> list[float]:
    return [sum(column) / len(vectors) for column in zip(*vectors)]
