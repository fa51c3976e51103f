"""A random baseline that gives every sample the same choice alone or in any batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext

_MOD = 2**31


def hash_uniform(keys: Tensor) -> Tensor:
    """A deterministic pseudo-random number in [0, 1) per integer key (int64 arithmetic, no overflow)."""
    x = keys.remainder(_MOD)
    for _ in range(3):
        x = (x * 1103515245 + 12345).remainder(_MOD)
        x = x ^ (x >> 13)
    return x.to(torch.float64) / _MOD


@dataclass
class RandomScore(Criterion):
    """Random scores: keeps a uniformly random subset of the visual tokens (a baseline).

    The score of a token depends only on ``seed``, the stage and the token's rank among its
    sample's visual tokens, so a sample gets the same tokens alone or in a padded batch.

    Example::

        criteria: {random: {type: random, seed: 0}}
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, ctx: ForwardContext) -> Tensor:
        ordinal_key = f"{self.key}/ordinal"
        if ordinal_key not in ctx.buffers:  # first stage: number the visual tokens of each sample
            visual = ctx.layout.visual
            ctx.buffers[ordinal_key] = visual.long().cumsum(dim=1) - 1
        ordinal = ctx.buffers[ordinal_key]  # [batch, seq]
        keys = ordinal * 7919 + (self.seed % 100_003) * 104_729 + ctx.stage * 15_485_863
        return hash_uniform(keys).masked_fill(~ctx.layout.visual, 0)
