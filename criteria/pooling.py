"""The downsampling baseline: 2-D average pooling of each image's patch grid before the language model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, Merger
from prunekit.sequence import merge_each_image


@dataclass
class Uniform(Criterion):
    """The same score for every visual token: a stage keeps the first ``k`` visual tokens in order.

    With ``count: 0`` nothing is kept by score and the merger makes every token of the image (the
    pooling baseline).

    Example::

        criteria: {none: {type: uniform}}
        merge: {type: grid_pool, size: 12}
        schedule: {type: stages, stages: [{layer: 0, count: 0}]}
    """

    name: ClassVar[str] = "uniform"

    def score(self, ctx: ForwardContext) -> Tensor:
        return ctx.layout.visual.to(torch.float32)  # [batch, seq]: 1 on visual tokens, 0 elsewhere


def grid_side(patches: int) -> int:
    """The side of a square patch grid of ``patches`` tokens; ``ValueError`` when it is not square."""
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"grid_pool needs a square patch grid, got {patches} tokens per image "
                         f"({side}x{side} = {side * side}); LLaVA-1.5 gives 24x24 = 576")
    return side


@dataclass
class GridPool(Merger):
    """2-D average pooling of each image's whole token grid to ``size x size`` tokens, in raster order.

    Before decoder layer 0 it pools the projected visual tokens, as the language model would receive
    them (the downsampling baseline); in a ``vision`` block, the features the projector receives.
    Each image's ``side x side`` grid (its visual tokens in order) is averaged over the windows
    ``torch.nn.functional.adaptive_avg_pool2d`` cuts (24 -> 12: 2x2 windows; 24 -> 8: 3x3). The
    grid is pooled whole, whatever the stage keeps by score: with ``count: 0`` each image becomes its
    pooled grid alone. ``count()`` (the FLOPs model) assumes one image per sample.

    Example::

        criteria: {none: {type: uniform}}
        merge: {type: grid_pool, size: 12}
        schedule: {type: stages, stages: [{layer: 0, count: 0}]}
    """

    name: ClassVar[str] = "grid_pool"
    size: int = 12

    def validate(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size (the side of the pooled grid) must be an int >= 1, got {self.size!r}")

    def count(self, dropped: int) -> int:
        return self.size * self.size if dropped > 0 else 0

    def pool(self, tokens: Tensor) -> Tensor:
        """One image's tokens in raster order ``[patches, dim]`` -> ``[size * size, dim]``."""
        patches, dim = tokens.shape
        side = grid_side(patches)
        if self.size > side:
            raise ValueError(f"grid_pool size {self.size} is larger than the {side}x{side} token grid")
        grid = tokens.T.reshape(1, dim, side, side)  # [1, dim, side, side]
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, self.size)  # [1, dim, size, size]
        return pooled.flatten(2)[0].T  # [size * size, dim]

    def merge(self, hidden: Tensor, dropped: Tensor, scores: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        return merge_each_image(hidden, ctx.layout, self.pool)  # [batch, pooled, dim], [batch, pooled]
