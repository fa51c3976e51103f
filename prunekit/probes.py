"""Captures a criterion can ask the engine for. The engine installs only the probes a recipe needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

ModuleKind = Literal["attention", "mlp"]
QUERY_SETS = ("instruction", "last")


@dataclass(frozen=True)
class ModuleIO:
    """The input and output of one decoder layer's attention or MLP module during the prefill.

    The input is what the module receives (the normed hidden states of a pre-norm block); the
    output is what it returns, before the residual add. Delivered to ``Criterion.observe`` as two
    ``[batch, seq, hidden]`` tensors; nothing is stored.
    """

    layer: int
    module: ModuleKind


@dataclass(frozen=True)
class AttentionRows:
    """Attention of some query tokens over every key at one decoder layer: ``[batch, seq]``.

    Computed from the layer's own queries and keys (after RoPE) with the causal and padding mask,
    softmax over keys, then the mean over heads and over the selected queries. The sequence is the
    one layer ``layer`` receives before any pruning at that layer: at a prune layer the engine
    runs the layer's attention projections once on the unpruned input to get it. No full
    ``seq x seq`` matrix is built: memory grows with ``n_queries x seq``.

    queries: ``"instruction"`` (the prompt after the last visual token), ``"last"`` (the last
    token of each sample, as FastV and PyramidDrop use), or the name of a ``[batch, seq]`` bool
    buffer a criterion filled in ``ctx.buffers`` before the layer runs (SparseVLM's raters).
    """

    layer: int
    queries: str = "instruction"


@dataclass(frozen=True)
class LayerInput:
    """The hidden states entering one decoder layer (before its norm): ``[batch, seq, hidden]``.

    Delivered to ``Criterion.observe`` as ``inputs`` (``output`` is None). As for attention rows,
    the sequence is the one the layer receives before any pruning at that layer: at a prune layer
    the capture arrives just before the criteria score. Layer 0's input is the embeddings with the
    projected visual features in place.
    """

    layer: int


@dataclass(frozen=True)
class VisionAttention:
    """Softmax attention of one vision-tower token (``query``, 0: CLS) over all tokens, mean over heads.

    ``layer`` indexes the vision encoder's layers (negative from the end: ``-2`` is the layer whose
    output LLaVA feeds the projector). Capture: ``[n_images, tokens]``, tokens including CLS.
    """

    layer: int
    query: int = 0


@dataclass(frozen=True)
class VisionKeys:
    """The keys of one vision-encoder layer, mean over heads: ``[n_images, tokens, head_dim]``."""

    layer: int


@dataclass(frozen=True)
class VisionHidden:
    """The output hidden states of one vision-encoder layer: ``[n_images, tokens, dim]``."""

    layer: int


VisionProbe = Union[VisionAttention, VisionKeys, VisionHidden]
Probe = Union[ModuleIO, AttentionRows, LayerInput, VisionAttention, VisionKeys, VisionHidden]
