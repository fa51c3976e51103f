"""MustDrop (Liu et al., 2024): its vision-encoding stage (the 2x2 windows of most alike patches merged, before the
projector) and its prefill stage (dual-attention filtering of the visual tokens, a key set excepted)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, Merger
from prunekit.errors import LayoutError, RecipeError
from prunekit.probes import AttentionRows, Probe, VisionAttention, VisionHidden

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


def key_set(cls_attention: Tensor, fraction: float) -> Tensor:
    """MustDrop's key set: each image's ``ceil(fraction * P)`` patches with the most CLS attention.

    cls_attention: ``[n_images, 1 + P]`` (the CLS row, mean over heads, CLS first) -> ``[n_images, P]`` bool.
    """
    patches = cls_attention[:, 1:]  # [n_images, P]
    top = patches.topk(math.ceil(fraction * patches.shape[1]), dim=1).indices  # [n_images, keys]
    return torch.zeros_like(patches, dtype=torch.bool).scatter_(1, top, True)


@dataclass
class MustDropDualAttention(Criterion):
    """MustDrop's prefill stage: dual-attention filtering, a key set excepted (``dual_attention_filter``).

    A prune before layer ``L`` reads layer ``L - 1``'s attention of the text after the image over the visual
    tokens (softmax over every key, mean over heads). A visual token is dropped when both the attention it
    receives summed over the text rows is below ``global_thr`` times that sum over all current visual tokens
    and its largest entry over the text rows is below ``individual_thr``; the rest are kept (scored by the
    summed attention), so each stage's count depends on the image and the question: give the stage ``keep:
    1.0``. The key set is never dropped: each image's ``ceil(key_fraction * P)`` patches with the most CLS
    attention at vision layer ``key_layer`` (the official tower's last layer), read from the tower and mapped
    onto the prompt's visual tokens (LLaVA-1.5-style projectors; ``key_fraction: 0`` leaves it out); after a
    ``vision`` block, through the patches it kept (its merged tokens are not key tokens).

    Example (the official stages after layers 2, 6, 10, 14 and the caches of layers 2..14 cut for decoding)::

        criteria: {mustdrop: {type: mustdrop_dual_attention, global_thr: 0.011, individual_thr: 0.01}}
        schedule: {type: stages, stages: [{layer: 3, keep: 1.0}, {layer: 7, keep: 1.0}, {layer: 11, keep: 1.0},
                                          {layer: 15, keep: 1.0, cut_earlier: true, cut_from: 2}]}
    """

    name: ClassVar[str] = "mustdrop_dual_attention"
    count_from_input: ClassVar[bool] = True
    tower_from_decoder: ClassVar[bool] = True
    global_thr: float = 0.011
    individual_thr: float = 0.01
    key_fraction: float = 0.08
    key_layer: int = -1

    def validate(self) -> None:
        for what in ("global_thr", "individual_thr"):
            value = getattr(self, what)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
                raise ValueError(f"{what} must be a number in [0, 1] (a share of the attention), got {value!r}")
        if not isinstance(self.key_fraction, numbers.Real) or not 0 <= self.key_fraction <= 1:
            raise ValueError(f"key_fraction must be in [0, 1] (0: no key set), got {self.key_fraction!r}")

    def _rows(self, layer: int) -> AttentionRows:
        return AttentionRows(layer=layer - 1, queries="instruction", per_query=True)

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        if min(stage_layers) < 1:
            raise ValueError("mustdrop_dual_attention reads the attention of the layer before each prune: no prune "
                             "before layer 0")
        probes: list[Probe] = [self._rows(layer) for layer in stage_layers]
        if self.key_fraction > 0:
            probes.append(VisionAttention(layer=self.key_layer))
        return probes

    def score(self, ctx: ForwardContext) -> Tensor:
        rows = ctx.capture(self._rows(ctx.layer))  # [batch, seq, n_text]: mean over heads, one per text row
        visual = ctx.layout.visual  # [batch, seq]
        received = rows.sum(dim=-1)  # [batch, seq]: global attention
        total = (received * visual).sum(dim=1, keepdim=True)  # [batch, 1]
        drop = visual & (received < total * self.global_thr) & (rows.amax(dim=-1) < self.individual_thr)
        if self.key_fraction > 0:
            drop &= ~self._keys(ctx)
        return received.masked_fill(drop, -math.inf)

    def _keys(self, ctx: ForwardContext) -> Tensor:
        """``[batch, seq]`` bool: the key set on the current sequence (built at the first stage, then gathered)."""
        name = f"{self.key}/keys"
        if name not in ctx.buffers:
            marks = key_set(ctx.capture(VisionAttention(layer=self.key_layer)), self.key_fraction)  # [n_images, P]
            visual = ctx.layout.visual
            n_images = marks.shape[0]
            per_image = int(visual.sum()) // max(n_images, 1)  # the tokens each image brings to the language model
            if ctx.vision_stage is not None:  # a vision block kept some patches (and merged tokens around them)
                kept, lead = ctx.vision_stage  # [n_images, k]
                if kept.shape[0] == n_images and lead + kept.shape[1] <= per_image:
                    tokens = torch.zeros(n_images, per_image, dtype=torch.bool, device=marks.device)
                    tokens[:, lead:lead + kept.shape[1]] = marks.gather(1, kept.to(marks.device))
                    marks = tokens  # [n_images, per_image]: merged tokens are not key tokens
            if ctx.stage != 0 or int(visual.sum()) != marks.numel():
                raise LayoutError(
                    f"{self.name}: the key set maps each encoded image's {marks.shape[1]} tokens onto the prompt's "
                    f"visual tokens in order, but {n_images} images meet {int(visual.sum())} visual tokens "
                    "(a stage before, a video, or generate's copies of the images changed them)")
            keys = torch.zeros_like(visual)
            keys[visual] = marks.flatten().to(visual.device)  # images in prompt order, row by row
            ctx.buffers[name] = keys
        return ctx.buffers[name]
