"""The plugin module the ``prunekit`` entry point names: hook implementations only."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

import prunekit
from prunekit.normalize import get_normalization


@dataclass
class MLPOutputNorm(prunekit.Criterion):
    """How much the MLP of the layer before the prune writes into each token: ``||mlp(x)||``.

    Tokens the MLP barely changes are dropped first. ``power`` sharpens the score.

    Example::

        criteria: {mlp_norm: {type: mlp_output_norm, power: 2.0}}
    """

    name: ClassVar[str] = "mlp_output_norm"
    power: float = 1.0

    def validate(self) -> None:
        if self.power <= 0:
            raise ValueError(f"power must be > 0, got {self.power}")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[prunekit.ModuleIO]:
        return [prunekit.ModuleIO(layer=layer - 1, module="mlp") for layer in stage_layers]

    def observe(self, ctx, probe, inputs: Tensor, output: Tensor) -> None:
        # output: [batch, seq, hidden] -> one number per token, kept in a per-token buffer
        ctx.buffers[f"{self.key}/layer{probe.layer}"] = output.float().norm(dim=-1) ** self.power

    def score(self, ctx) -> Tensor:
        return ctx.buffers[f"{self.key}/layer{ctx.layer - 1}"]  # [batch, seq]


@dataclass
class GeometricMean(prunekit.Combiner):
    """Weighted geometric mean of the criteria's normalised scores (a token must do well on all).

    Example::

        combiner: {type: geometric_mean, normalize: minmax}
    """

    name: ClassVar[str] = "geometric_mean"
    normalize: str = "minmax"
    eps: float = 1e-6

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        norm = get_normalization(self.normalize)
        logs = [(norm(score.double(), visual) + self.eps).log() for score in scores.values()]
        return torch.stack(logs).mean(dim=0).exp().masked_fill(~visual, 0)


@prunekit.hookimpl
def prunekit_add_criteria():
    return [MLPOutputNorm]


@prunekit.hookimpl
def prunekit_add_combiners():
    return [GeometricMean]


@prunekit.hookimpl
def prunekit_add_recipe_dirs():
    return [Path(__file__).parent / "recipes"]
