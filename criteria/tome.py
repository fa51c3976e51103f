"""ToMe-style bipartite soft matching (Bolya et al., ICLR 2023) as a merger of each image's tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import ForwardContext, Merger
from prunekit.sequence import merge_each_image


def bipartite_merge(x: Tensor, target: int) -> tuple[Tensor, Tensor]:
    """Merge the tokens ``x`` ``[n, dim]`` (in order) down to ``target`` by rounds of bipartite soft matching.

    One round on ``n`` tokens with ``size`` (tokens merged into each) merges ``r = min(n - target, n // 2)``:
    ``a`` = even places, ``b`` = odd places; each ``a`` finds its most cosine-similar ``b``; the ``r``
    ``a`` with the largest similarity (stable: earlier first on ties) are merged into their ``b`` as the
    size-weighted mean; the others stay. Survivors keep their order. Returns the merged tokens
    ``[target, dim]`` and, per merged token, the original index of its representative (its ``b``,
    or itself) ``[target]``.
    """
    n = x.shape[0]
    tokens = x.to(torch.float64)
    size = torch.ones(n, dtype=torch.float64, device=x.device)
    origin = torch.arange(n, device=x.device)
    while tokens.shape[0] > target:
        n = tokens.shape[0]
        r = min(n - target, n // 2)
        unit = tokens / tokens.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        a, b = unit[0::2], unit[1::2]  # [ceil(n/2), dim], [floor(n/2), dim]
        best, match = (a @ b.T).max(dim=1)  # [ceil(n/2)]
        edges = torch.sort(best, descending=True, stable=True).indices
        src, stay = edges[:r], edges[r:]
        a_index = torch.arange(0, n, 2, device=x.device)
        b_index = torch.arange(1, n, 2, device=x.device)
        weighted = tokens * size[:, None]
        dst = b_index[match[src]]  # [r] place of the b each merged a joins
        weighted = weighted.index_add(0, dst, weighted[a_index[src]])
        size = size.index_add(0, dst, size[a_index[src]])
        survivors = torch.cat([a_index[stay], b_index]).sort().values  # survivors in order
        tokens = weighted[survivors] / size[survivors, None]
        size, origin = size[survivors], origin[survivors]
    return tokens.to(x.dtype), origin


@dataclass
class ToMeMerge(Merger):
    """ToMe-style bipartite soft matching: each image's visual tokens merged down to ``tokens``.

    Rounds of :func:`bipartite_merge` on each image's tokens entering the stage (before layer 0: the
    projected visual tokens), size-weighted means, the matching metric the tokens' own cosine
    similarity. The merged tokens keep the order of their representatives. All of an image's tokens
    take part, whatever the stage keeps by score: with ``count: 0`` the image becomes its merged
    tokens alone. ``count()`` (the FLOPs model) assumes one image per sample.

    Example::

        criteria: {none: {type: uniform}}
        merge: {type: tome, tokens: 144}
        schedule: {type: stages, stages: [{layer: 0, count: 0}]}
    """

    name: ClassVar[str] = "tome"
    tokens: int = 144

    def validate(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens (per image after merging) must be an int >= 1, got {self.tokens!r}")

    def count(self, dropped: int) -> int:
        return min(self.tokens, dropped) if dropped > 0 else 0

    def merge(self, hidden: Tensor, dropped: Tensor, scores: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        def merge_one(image: Tensor) -> Tensor:  # [n, dim] -> [min(tokens, n), dim]
            return bipartite_merge(image, min(self.tokens, image.shape[0]))[0]

        return merge_each_image(hidden, ctx.layout, merge_one)  # [batch, merged, dim], [batch, merged]
