"""Attention criteria: how much some queries attend to each visual token (FastV, IGA, PyramidDrop)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor

from prunekit.api import Criterion, ForwardContext
from prunekit.probes import AttentionRows, Probe


@dataclass
class Attention(Criterion):
    """Attention that ``queries`` pay to each visual token, mean over heads and queries.

    Read at layer ``L - layer_offset`` for a prune before layer ``L``: offset 0 uses the prune
    layer's own queries and keys on its unpruned input (IGA, PyramidDrop); offset 1 uses the
    attention of the layer before, as it ran (FastV). Rows are softmax over all keys with the
    causal and padding mask; no full attention matrix is built and the model keeps its
    attention implementation.

    Example::

        criteria: {attn: {type: attention, queries: last, layer_offset: 1}}
    """

    name: ClassVar[str] = "attention"
    queries: Literal["instruction", "last"] = "instruction"
    layer_offset: int = 0

    def validate(self) -> None:
        if self.layer_offset < 0:
            raise ValueError(f"layer_offset must be >= 0, got {self.layer_offset}")

    def _probe(self, layer: int) -> AttentionRows:
        return AttentionRows(layer=layer - self.layer_offset, queries=self.queries)

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        for layer in stage_layers:
            if layer - self.layer_offset < 0:
                raise ValueError(
                    f"criterion {self.key or self.name!r} reads layer {layer} - {self.layer_offset} for the prune "
                    f"before layer {layer}; a prune before layer {layer} needs layer_offset <= {layer}"
                )
            yield self._probe(layer)

    def score(self, ctx: ForwardContext) -> Tensor:
        return ctx.capture(self._probe(ctx.layer))  # [batch, seq]


@dataclass
class IGA(Attention):
    """TransPrune's instruction-guided attention (IGA).

    For a prune before layer ``L``: the instruction tokens' queries (after the image, to the end
    of the prompt) against all keys, from layer ``L``'s own q/k projections of its normed input,
    with RoPE and the causal mask; softmax, mean over heads, the image columns, mean over queries.

    Example::

        criteria: {iga: {type: iga}}
    """

    name: ClassVar[str] = "iga"
    queries: Literal["instruction", "last"] = "instruction"
    layer_offset: int = 0


@dataclass
class FastVAttention(Attention):
    """FastV's criterion (Chen et al., ECCV 2024): attention of the last token at layer ``K - 1``.

    As the official code computes it: the softmax attention row of the last prompt token at the
    layer before the prune, mean over heads, read at the visual columns.

    Example::

        criteria: {fastv: {type: fastv_attention}}
    """

    name: ClassVar[str] = "fastv_attention"
    queries: Literal["instruction", "last"] = "last"
    layer_offset: int = 1


@dataclass
class PDropAttention(Attention):
    """PyramidDrop's criterion (Xing et al., CVPR 2025): the last instruction token's attention at the prune layer.

    As the official code: the prune layer's own q/k (after its norm and RoPE, on the sequence it
    would receive), the last prompt token's softmax row over all keys, mean over heads, read at the
    image columns.

    Example::

        criteria: {pdrop: {type: pdrop_attention}}
    """

    name: ClassVar[str] = "pdrop_attention"
    queries: Literal["instruction", "last"] = "last"
    layer_offset: int = 0
