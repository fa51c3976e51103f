"""Analytic prefill FLOPs of a decoder, in the convention of the token-pruning papers and over the whole sequence.

Per decoder layer running on ``n`` tokens with hidden size ``d`` and MLP width ``m``::

    FLOPs(n) = 4 n d^2 + 2 n^2 d + 3 n d m

(FastV's formula with three MLP matrices, as PyramidDrop and TransPrune count for LLaMA). The
papers' convention counts the visual tokens only (``n`` = visual tokens of the layer); the
whole-sequence figure counts every token the layer runs on. On LLaVA-1.5-7B (d=4096, m=11008,
32 layers, 576 visual tokens) the unpruned prefill is 3.82 TFLOPs in the papers' convention.

A mixture-of-experts layer counts the experts a token actually runs, in the same units::

    MLP(n) = 3 n d (k m_e + m_s) + n d E

with ``k`` experts per token of width ``m_e``, shared experts of total width ``m_s`` and a router
over ``E`` experts; dense layers of an MoE model keep ``3 n d m`` with their own width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prunekit.api import Stage
from prunekit.errors import LayoutError


@dataclass(frozen=True)
class MoeDims:
    """The mixture-of-experts layers of a decoder: what one token runs in each of them."""

    experts_per_token: int  # k: routed experts each token runs
    expert_size: int  # m_e: width of one routed expert's FFN
    num_experts: int  # E: the router's outputs
    shared_size: int  # m_s: total width of the shared experts every token runs (0: none)
    layers: tuple[int, ...]  # the MoE layers; the others are dense with DecoderDims.intermediate_size

    def mlp_width(self) -> float:
        """The dense MLP width that costs as much per token: ``k m_e + m_s + E / 3`` (the router is one matrix)."""
        return self.experts_per_token * self.expert_size + self.shared_size + self.num_experts / 3


@dataclass(frozen=True)
class DecoderDims:
    """The sizes the FLOPs formula needs (``moe`` for mixture-of-experts decoders)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int  # the dense layers' MLP width
    moe: MoeDims | None = None
    layer_widths: tuple[int, ...] | None = None  # a config giving each layer its own MLP width (Gemma 3n)

    @classmethod
    def from_config(cls, config: Any) -> DecoderDims:
        text = getattr(config, "text_config", None) or config
        layers = int(text.num_hidden_layers)
        moe = moe_dims(text, layers)
        dense = getattr(text, "intermediate_size_mlp", None) if moe is not None else None  # Llama 4
        width = dense or text.intermediate_size
        if isinstance(width, (list, tuple)):  # one width per layer
            widths = tuple(int(w) for w in width)
            return cls(layers, int(text.hidden_size), widths[0], moe, widths)
        return cls(layers, int(text.hidden_size), int(width), moe)

    def mlp_width(self, layer: int) -> float:
        """The MLP width layer ``layer`` costs (active experts, shared experts and router for an MoE layer)."""
        if self.moe is not None and layer in self.moe.layers:
            return self.moe.mlp_width()
        return self.layer_widths[layer] if self.layer_widths is not None else self.intermediate_size


def moe_dims(text: Any, num_layers: int) -> MoeDims | None:
    """The MoE sizes of a decoder config (None for a dense decoder).

    Reads the names transformers' MoE configs use: experts per token ``num_experts_per_tok``; experts
    ``num_experts`` / ``num_local_experts`` / ``n_routed_experts``; expert width ``moe_intermediate_size``
    (else ``intermediate_size``); shared experts ``shared_expert_intermediate_size`` or
    ``n_shared_experts`` x the expert width (Llama 4: one of ``intermediate_size``); MoE layers from
    ``moe_layers``, ``mlp_only_layers`` + ``decoder_sparse_step`` or ``first_k_dense_replace``.
    """
    k = getattr(text, "num_experts_per_tok", None)
    experts = next((getattr(text, key) for key in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(text, key, None)), None)
    if not k or not experts:
        return None
    expert = int(getattr(text, "moe_intermediate_size", None) or text.intermediate_size)
    shared = int(getattr(text, "shared_expert_intermediate_size", None) or 0)
    shared = shared or int(getattr(text, "n_shared_experts", None) or 0) * expert
    if getattr(text, "moe_layers", None) is not None:  # Llama 4: every MoE layer has one shared expert
        layers = tuple(int(i) for i in text.moe_layers)
        shared = shared or (int(text.intermediate_size) if getattr(text, "model_type", "") == "llama4_text" else 0)
    elif getattr(text, "first_k_dense_replace", None) is not None:
        layers = tuple(range(int(text.first_k_dense_replace), num_layers))
    else:
        step = int(getattr(text, "decoder_sparse_step", None) or 1)
        dense = set(getattr(text, "mlp_only_layers", None) or ())
        layers = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    return MoeDims(int(k), expert, int(experts), shared, layers)


def layer_flops(n: float, dims: DecoderDims, layer: int = 0) -> float:
    """FLOPs of decoder layer ``layer`` running on ``n`` tokens."""
    d, m = dims.hidden_size, dims.mlp_width(layer)
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


def prefill_flops(tokens_per_layer: Sequence[float], dims: DecoderDims) -> float:
    """FLOPs of a prefill whose layers run on ``tokens_per_layer`` tokens."""
    if len(tokens_per_layer) != dims.num_layers:
        raise ValueError(f"got token counts for {len(tokens_per_layer)} layers, the decoder has {dims.num_layers}")
    return float(sum(layer_flops(n, dims, layer) for layer, n in enumerate(tokens_per_layer)))


def visual_tokens_per_layer(stages: Sequence[Stage], num_layers: int, n_visual: int, merger: Any = None,
                            own_counts: dict[int, int] | None = None) -> list[int]:
    """Visual tokens each layer runs on under a schedule (counts relative to the original ``n_visual``).

    A ``merger`` with a ``count(n_dropped)`` method adds the summary tokens it makes at each stage (an
    ``in_place`` merger adds none: it merges into kept tokens). ``own_counts`` caps a stage's kept tokens
    (stage layer -> the count its criteria keep of their own, :meth:`prunekit.api.Criterion.clip_count`).
    """
    counts, current = [], n_visual
    boundaries = {stage.layer: stage for stage in stages}
    own_counts = own_counts or {}
    for layer in range(num_layers):
        if layer in boundaries:
            kept = min(current, int(boundaries[layer].keep_counts(torch.tensor([n_visual]))[0]),
                       own_counts.get(layer, current))
            adds = merger is not None and hasattr(merger, "count") and not getattr(merger, "in_place", False)
            merged = merger.count(current - kept) if adds else 0
            current = kept + merged
        counts.append(current)
    return counts


@dataclass(frozen=True)
class FlopsEstimate:
    """Prefill TFLOPs of a schedule and their ratio to no pruning, in both conventions."""

    visual_tflops: float  # papers' convention: visual tokens only
    visual_ratio: float
    sequence_tflops: float  # every token of the sequence
    sequence_ratio: float
    visual_tokens: list[float]  # per layer
    bound: bool = False  # a criterion's own count depends on the input: an upper bound (no pruning by it)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tflops": round(self.visual_tflops, 4), "ratio": round(self.visual_ratio, 4),
            "sequence_tflops": round(self.sequence_tflops, 4), "sequence_ratio": round(self.sequence_ratio, 4),
            "upper_bound": self.bound,
        }


def estimate(stages: Sequence[Stage], dims: DecoderDims, n_visual: int = 576, n_text: int = 0,
             merger: Any = None, entering: int | None = None, own_counts: dict[int, int] | None = None
             ) -> FlopsEstimate:
    """Analytic prefill FLOPs of a schedule for ``n_visual`` visual and ``n_text`` other tokens.

    ``entering`` is the visual token count the language model receives when a stage before it
    shortened the image (default ``n_visual``); the ratios compare with ``n_visual`` unpruned.
    ``own_counts``: see :func:`visual_tokens_per_layer`.
    """
    visual = visual_tokens_per_layer(stages, dims.num_layers, n_visual if entering is None else entering, merger,
                                     own_counts)
    return measured_estimate(visual, dims, n_visual, n_text)


def measured_estimate(visual: Sequence[float], dims: DecoderDims, n_visual: int = 576, n_text: int = 0
                      ) -> FlopsEstimate:
    """Prefill FLOPs of layers that ran on ``visual`` visual tokens each (a run's report: the mean of
    ``visual_tokens_per_layer`` over the prompts, for recipes whose counts depend on the input) and ``n_text``
    others, against ``n_visual`` unpruned."""
    visual = list(visual)
    base_visual = prefill_flops([n_visual] * dims.num_layers, dims)
    base_sequence = prefill_flops([n_visual + n_text] * dims.num_layers, dims)
    pruned_visual = prefill_flops(visual, dims)
    pruned_sequence = prefill_flops([v + n_text for v in visual], dims)
    return FlopsEstimate(pruned_visual / 1e12, pruned_visual / base_visual, pruned_sequence / 1e12,
                         pruned_sequence / base_sequence, visual)


def recipe_estimate(recipe: Any, dims: DecoderDims, n_visual: int = 576, n_text: int = 0,
                    frames: int | None = None) -> FlopsEstimate:
    """:func:`estimate` for a loaded :class:`~prunekit.recipe.Recipe`: its vision stage, schedule and merger.

    ``frames``: the ``n_visual`` tokens are one clip of that many equal frames; a vision stage shortens each
    frame (Video-LLaVA), and a stage whose criteria keep a count of their own on such a clip
    (:meth:`~prunekit.api.Criterion.clip_count`) keeps at most that. A criterion whose count depends on the input
    (``count_from_input``, a threshold) drops nothing here: the estimate is an upper bound (``bound``).
    """
    if frames is not None and n_visual % frames:
        raise LayoutError(f"{n_visual} visual tokens are not {frames} equal frames: give the visual tokens as "
                          "frames x tokens per frame")
    entering = n_visual
    if recipe.vision is not None:
        from prunekit.vision import vision_stage_tokens

        units = frames or 1  # one image, or each frame of the clip
        entering = units * sum(vision_stage_tokens(recipe.vision, n_visual // units))
    from prunekit.recipe import resolve_stages

    stages = resolve_stages(recipe, dims.num_layers)
    own_counts = {}
    if frames is not None and stages:
        counts = [c for c in (crit.clip_count(frames, n_visual // frames) for crit in recipe.criteria.values())
                  if c is not None]
        if counts:  # the criteria score on the stage's input: the first stage's
            own_counts[stages[0].layer] = min(counts)
    result = estimate(stages, dims, n_visual, n_text, recipe.merger, entering, own_counts)
    if any(getattr(criterion, "count_from_input", False) for criterion in recipe.criteria.values()):
        result = dataclasses.replace(result, bound=True)
    return result

