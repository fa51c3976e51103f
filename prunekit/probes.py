"""Captures a criterion can ask the engine for. The engine installs only the probes a recipe needs.

Each probe type says where it reads (``site``: the decoder, or the vision tower before the
projector); the table ``prunekit.capture.INSTALLERS`` maps each type to the function that installs
its hook, so a new kind of capture is one dataclass here and one installer there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

ModuleKind = Literal["attention", "mlp"]
QUERY_SETS = ("instruction", "last")


@dataclass(frozen=True)
class ModuleIO:
    """The input and output of one decoder layer's attention or MLP module during the prefill.

    The input is what the module receives (the normed hidden states of a pre-norm block); the
    output is what it returns, before the residual add. Delivered to ``Criterion.observe`` as two
    ``[batch, seq, hidden]`` tensors; nothing is stored.
    """

    site: ClassVar[str] = "decoder"
    layer: int
    module: ModuleKind


@dataclass(frozen=True)
class AttentionRows:
    """Attention of some query tokens over every key at one decoder layer, read as ``ctx.capture(probe)``.

    Computed from the layer's own queries and keys (after RoPE) with the causal and padding mask,
    softmax over keys. The sequence is the one layer ``layer`` receives before any pruning at that
    layer: at a prune layer the engine runs the layer's attention projections once on the
    unpruned input to get it. No full ``seq x seq`` matrix is built: memory grows with
    ``n_queries x seq``.

    queries: ``"instruction"`` (the prompt after the last visual token), ``"last"`` (the last
    real token of each sample, as FastV and PyramidDrop use), or the name of a custom query set:
    a ``[batch, seq]`` bool buffer a criterion put in ``ctx.buffers`` before the layer runs (in
    ``observe`` of an earlier probe, as SparseVLM's raters); padding is never a query.

    The capture's shape (keys first, so it follows the tokens through later prunes):

    ========================  ==========================  =========================================
    per_head / per_query      shape                       entry
    ========================  ==========================  =========================================
    False / False (default)   ``[batch, seq]``            mean over heads and over the queries
    True / False              ``[batch, seq, heads]``     mean over the queries, one per query head
    False / True              ``[batch, seq, n_q]``       mean over heads, one per query
    True / True               ``[batch, seq, n_q, heads]``  one softmax row per query and head
    ========================  ==========================  =========================================

    ``n_q`` is the largest number of queries of a sample; query ``j`` is the ``j``-th selected
    token of the sample in sequence order, and a sample with fewer queries has all-zero rows past
    its own count. Per-head and per-query rows let a criterion build its own statistics (the
    entropy of each head's row, the max over queries, ...).
    """

    site: ClassVar[str] = "decoder"
    layer: int
    queries: str = "instruction"
    per_head: bool = False
    per_query: bool = False


@dataclass(frozen=True)
class LayerInput:
    """The hidden states entering one decoder layer (before its norm): ``[batch, seq, hidden]``.

    Delivered to ``Criterion.observe`` as ``inputs`` (``output`` is None). As for attention rows,
    the sequence is the one the layer receives before any pruning at that layer: at a prune layer
    the capture arrives just before the criteria score. Layer 0's input is the embeddings with the
    projected visual features in place. ``final_norm``: passed through the decoder's final norm
    first (the norm before the LM head; DART compares tokens so).
    """

    site: ClassVar[str] = "decoder"
    layer: int
    final_norm: bool = False


@dataclass(frozen=True)
class DecoderKeys:
    """The keys of one decoder layer after RoPE, as the layer runs in the prefill, read as
    ``ctx.capture(probe)``: ``[batch, seq, kv_heads * head_dim]`` (heads side by side, before any
    repeat for grouped queries). The sequence is the one the layer runs on (at a prune layer: the
    pruned one); the capture follows the tokens through later prunes.
    """

    site: ClassVar[str] = "decoder"
    layer: int


@dataclass(frozen=True)
class VisionAttention:
    """Softmax attention of one vision-tower token (``query``, 0: CLS) over all tokens, mean over heads.

    ``layer`` indexes the vision encoder's layers (negative from the end: ``-2`` is the layer whose
    output LLaVA feeds the projector). Capture: ``[n_images, tokens]``, tokens including CLS.
    """

    site: ClassVar[str] = "vision"
    layer: int
    query: int = 0


@dataclass(frozen=True)
class VisionKeys:
    """The keys of one vision-encoder layer, mean over heads: ``[n_images, tokens, head_dim]`` (on Qwen2/2.5-VL
    after the tower's rotary embedding, one per merged token: the mean over its 2x2 patches)."""

    site: ClassVar[str] = "vision"
    layer: int


@dataclass(frozen=True)
class VisionHidden:
    """The output hidden states of one vision-encoder layer: ``[n_images, tokens, dim]``."""

    site: ClassVar[str] = "vision"
    layer: int


@dataclass(frozen=True)
class VisionAttentionReceived:
    """The attention each vision-tower token receives at one vision layer: softmax over keys, mean over heads,
    summed over the queries that see it (its image, or on Qwen2/2.5-VL its attention block: the image for a
    full-attention layer, a window otherwise). Capture: ``[n_images, tokens]``; on a LLaVA tower the CLS token
    first; on Qwen2/2.5-VL one value per merged token (the mean over its 2x2 patches, as LightCompress's VisionZip
    for Qwen2.5-VL reads it). Works on towers without a CLS token, where ``VisionAttention`` cannot."""

    site: ClassVar[str] = "vision"
    layer: int


@dataclass(frozen=True)
class VisionFeatures:
    """The image features a vision stage shortens: ``[n_images, tokens, dim]``, one row per image (or video
    frame) of the call. Before a projector (LLaVA-1.5, Video-LLaVA) they are what the projector receives;
    where the stage runs at the language model's input (every other family), the projected features as
    the first decoder layer would receive them. No hook: the stage hands them over itself.

    In a ``vision`` block a criterion asking for ``LayerInput(layer=0)`` (the hidden states entering the
    first decoder layer: DivPrune, the L2-norm and similarity baselines) gets these instead.
    """

    site: ClassVar[str] = "vision"
    layer: ClassVar[int] = -1  # no layer of its own: read where the stage runs


Probe = Union[ModuleIO, AttentionRows, LayerInput, DecoderKeys, VisionAttention, VisionAttentionReceived, VisionKeys,
              VisionHidden, VisionFeatures]
TOWER_PROBES = (VisionAttention, VisionAttentionReceived, VisionKeys, VisionHidden)  # the vision probes a hook inside the tower captures
