"""Captures a criterion can ask the engine for. The engine installs only the probes a recipe needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

ModuleKind = Literal["attention", "mlp"]
QuerySet = Literal["instruction", "last"]


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

    queries: ``"instruction"`` (the prompt after the last visual token) or ``"last"`` (the last
    token of each sample, as FastV and PyramidDrop use).
    """

    layer: int
    queries: QuerySet = "instruction"


Probe = Union[ModuleIO, AttentionRows]
