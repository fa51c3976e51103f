"""The oracle criterion: scores the toy question's ground-truth relevant patches highest.

It is the ceiling any criterion can reach at a keep ratio on the toy task: the tokens that hold the
answer's evidence are kept first, the rest at random. It needs the ground truth, so it runs only
inside :func:`ground_truth` (``prunekit eval`` opens it for every batch)::

    from prunekit.toy.oracle import ground_truth

    with prunekit.apply(model, "oracle"), ground_truth([q.relevant for q in questions]):
        model(**batch)

The ground truth is held in a context variable: each thread (and asyncio task) sees its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext
from prunekit.criteria.random import hash_uniform
from prunekit.errors import PrunekitError
from prunekit.hookspecs import hookimpl

_RELEVANT: ContextVar[Sequence[Sequence[int]] | None] = ContextVar("prunekit_toy_relevant", default=None)


@contextmanager
def ground_truth(relevant: Sequence[Sequence[int]]) -> Iterator[None]:
    """Make ``relevant[i]`` (patch indices of sample i's image, row-major) the oracle's truth for the next forwards."""
    token = _RELEVANT.set([list(r) for r in relevant])
    try:
        yield
    finally:
        _RELEVANT.reset(token)


@dataclass
class Oracle(Criterion):
    """Ground-truth relevance on the toy task: relevant patches score above 1, the others in [0, 0.5).

    A sample's visual tokens are numbered in order (the toy's single image: the patch index); ties
    among relevant and among irrelevant tokens break by a seeded hash, as in ``random``.

    Example::

        criteria: {oracle: {type: oracle}}
    """

    name: ClassVar[str] = "oracle"
    seed: int = 0

    def score(self, ctx: ForwardContext) -> Tensor:
        relevant = _RELEVANT.get()
        if relevant is None:
            raise PrunekitError("the oracle criterion needs the toy task's ground truth: run it through "
                                "`prunekit eval` or inside `prunekit.toy.oracle.ground_truth(relevant)`")
        layout = ctx.layout
        if len(relevant) != layout.batch_size:
            raise PrunekitError(f"oracle ground truth covers {len(relevant)} samples, the batch has "
                                f"{layout.batch_size}")
        ordinal_key = f"{self.key}/ordinal"
        if ordinal_key not in ctx.buffers:  # first stage: number each sample's visual tokens
            ctx.buffers[ordinal_key] = layout.visual.long().cumsum(dim=1) - 1
        ordinal = ctx.buffers[ordinal_key]  # [batch, seq] patch index of visual tokens
        width = int(ordinal.max()) + 2
        table = torch.zeros(layout.batch_size, width, dtype=torch.bool, device=ordinal.device)  # [batch, patches]
        for row, patches in enumerate(relevant):
            if patches:
                table[row, torch.as_tensor([p for p in patches if p < width - 1], dtype=torch.long)] = True
        is_relevant = table.gather(1, ordinal.clamp(min=0))  # [batch, seq]
        noise = 0.5 * hash_uniform(ordinal * 7919 + (self.seed % 100_003) * 104_729)  # [batch, seq] in [0, 0.5)
        return (is_relevant.double() + noise).masked_fill(~layout.visual, 0)


@hookimpl
def prunekit_add_criteria() -> list[type[Criterion]]:
    return [Oracle]


@hookimpl
def prunekit_add_recipe_dirs() -> list[Path]:
    return [Path(__file__).parent / "recipes"]
