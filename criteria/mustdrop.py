"""MustDrop's vision-encoding stage: merge the 2x2 windows of most alike patches, before the projector."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, Merger
from prunekit.errors import RecipeError
from prunekit.probes import Probe, VisionHidden

LEAD_ALL = 1 << 30  # Merger.lead for a merger whose tokens all go before the kept patches


def window_similarity(features: Tensor) -> Tensor:
    """Mean cosine similarity between the distinct patches of each 2x2 window, windows row-major.

    features: ``[n_images, patches, dim]`` on a square grid of even side -> ``[n_images, windows]``.
    """
    n_images, patches, dim = features.shape
    side = math.isqrt(patches)
    if side * side != patches or side % 2:
        raise RecipeError(f"mustdrop merges 2x2 windows of a square patch grid of even side; an image has "
                          f"{patches} patches")
    grid = features.reshape(n_images, side // 2, 2, side // 2, 2, dim).permute(0, 1, 3, 2, 4, 5)
    windows = grid.reshape(n_images, (side // 2) ** 2, 4, dim)  # [n_images, windows, 4, dim], each row-major
    pairs = F.cosine_similarity(windows[:, :, :, None], windows[:, :, None], dim=-1)  # [n_images, windows, 4, 4]
    off_diagonal = 1 - torch.eye(4, dtype=pairs.dtype, device=pairs.device)
    return (pairs * off_diagonal).sum(dim=(-1, -2)) / 12  # [n_images, windows]


def window_of_patch(patches: int, device: torch.device) -> Tensor:
    """``[patches]`` long: the 2x2 window (row-major) each patch of a square grid falls in."""
    side = math.isqrt(patches)
    rows, columns = torch.arange(patches, device=device) // side, torch.arange(patches, device=device) % side
    return rows // 2 * (side // 2) + columns // 2


@dataclass
class MustDropWindows(Criterion):
    """MustDrop's spatial redundancy (Liu et al., 2024), scored per patch for a stage before the projector.

    The patches (vision layer ``layer``'s hidden states, CLS left out) are cut into 2x2 windows; a
    window's similarity is the mean cosine similarity of its four patches to each other. Every patch
    scores minus its window's similarity, so a stage keeping ``k`` patches drops the ``(P - k) / 4``
    most alike windows whole, and the ``mustdrop_merge`` merger makes one token of each.

    Example::

        vision: {criteria: {windows: {type: mustdrop_windows}}, merge: {type: mustdrop_merge}, count: 64}
    """

    name: ClassVar[str] = "mustdrop_windows"
    layer: int = -2

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        return [VisionHidden(layer=self.layer)]

    def score(self, ctx: ForwardContext) -> Tensor:
        hidden = ctx.capture(VisionHidden(layer=self.layer))  # [n_images, tokens, dim], CLS first
        patches = ctx.layout.seq_len
        features = hidden[:, -patches:]  # [n_images, patches, dim]
        similarity = window_similarity(features.double())  # [n_images, windows]
        return -similarity[:, window_of_patch(patches, features.device)]  # [n_images, patches]


@dataclass
class MustDropMerge(Merger):
    """MustDrop's window merge: each dropped 2x2 window becomes the mean of its four patches.

    The merged tokens lead the image, most alike window first, then the kept patches in grid order
    (the order of LightCompress's MustDrop, ``llmc/compression/token_reduction/mustdrop.py``).
    """

    name: ClassVar[str] = "mustdrop_merge"
    lead: ClassVar[int] = LEAD_ALL

    def count(self, dropped: int) -> int:
        return max(dropped, 0) // 4

    def merge(self, hidden: Tensor, dropped: Tensor, scores: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        n_images, patches, dim = hidden.shape
        window = window_of_patch(patches, hidden.device)  # [patches]
        windows = patches // 4
        dropped_windows = torch.zeros(n_images, windows, dtype=torch.long, device=hidden.device)
        dropped_windows.index_add_(1, window, dropped.long())  # [n_images, windows]: dropped patches per window
        if bool(((dropped_windows != 0) & (dropped_windows != 4)).any()):
            raise RecipeError("mustdrop_merge merges whole 2x2 windows; the stage's criteria dropped part of a "
                              "window (use it with the mustdrop_windows criterion)")
        merged_n = int((dropped_windows[0] == 4).sum())
        similarity = window_similarity(hidden.detach().double())  # [n_images, windows]
        order = similarity.masked_fill(dropped_windows != 4, -math.inf).argsort(dim=1, descending=True, stable=True)
        chosen = order[:, :merged_n]  # [n_images, merged]: most alike first
        sums = hidden.new_zeros(n_images, windows, dim).index_add(1, window, hidden)  # [n_images, windows, dim]
        means = sums.gather(1, chosen[..., None].expand(-1, -1, dim)) / 4  # [n_images, merged, dim]
        return means, torch.ones(n_images, merged_n, dtype=torch.bool, device=hidden.device)
