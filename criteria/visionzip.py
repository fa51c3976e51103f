"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLS attention, the rest merged into contextual tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, Merger
from prunekit.probes import Probe, VisionAttention, VisionHidden, VisionKeys
from prunekit.sequence import gather_tokens


def _patch_columns(capture: Tensor, patches: int) -> Tensor:
    """Drop leading non-patch tokens (CLS) of a vision capture: [n_images, tokens, ...] -> [n_images, patches, ...]."""
    return capture[:, capture.shape[1] - patches:]


@dataclass
class VisionZipDominant(Criterion):
    """VisionZip's dominant-token score: the CLS token's attention to each patch at a vision layer.

    As the official code: the attention of vision layer ``layer`` (-2, the layer LLaVA feeds the
    projector), the CLS row, over heads (a mean here, a sum there: the same ranking). Used in a
    recipe's ``vision`` stage.

    Example::

        vision: {criteria: {dominant: {type: visionzip}}, count: 53, merge: {type: visionzip_contextual}}
    """

    name: ClassVar[str] = "visionzip"
    layer: int = -2

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        return [VisionAttention(layer=self.layer, query=0)]

    def score(self, ctx: ForwardContext) -> Tensor:
        return _patch_columns(ctx.capture(VisionAttention(layer=self.layer, query=0)), ctx.layout.seq_len)


@dataclass
class VisionZipContextual(Merger):
    """VisionZip's contextual tokens (and its CLS token) from the patches the dominant stage drops.

    As the official code: ``contextual`` targets evenly spaced by index among the dropped patches;
    every other dropped patch joins the target whose key (vision layer ``layer``, mean over heads)
    is most cosine-similar; a contextual token is its target's hidden state plus the mean of its
    members'. With ``keep_cls`` the CLS hidden state of that layer leads the image, as VisionZip
    keeps it among its dominant tokens.

    Example::

        merge: {type: visionzip_contextual, contextual: 10, keep_cls: true}
    """

    name: ClassVar[str] = "visionzip_contextual"
    contextual: int = 30
    keep_cls: bool = True
    layer: int = -2

    @property
    def lead(self) -> int:  # type: ignore[override]
        return 1 if self.keep_cls else 0

    def validate(self) -> None:
        if self.contextual < 0:
            raise ValueError(f"contextual must be >= 0, got {self.contextual}")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        probes: list[Probe] = [VisionKeys(layer=self.layer)]
        if self.keep_cls:
            probes.append(VisionHidden(layer=self.layer))
        return probes

    def count(self, dropped: int) -> int:
        return min(self.contextual, max(dropped, 0)) + self.lead

    def merge(self, hidden: Tensor, dropped: Tensor, scores: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        n_images, patches, dim = hidden.shape
        remaining = int(dropped[0].sum())  # the same for every image of a vision stage
        targets_n = min(self.contextual, remaining)
        order = torch.arange(patches, device=hidden.device).expand(n_images, patches)
        rem_index = torch.where(dropped, order, order + patches).sort(dim=1).values[:, :remaining]  # [n_images, R]
        parts = []
        if self.keep_cls:
            parts.append(ctx.capture(VisionHidden(layer=self.layer))[:, :1].to(hidden.dtype))  # [n_images, 1, dim]
        if targets_n > 0:
            keys = _patch_columns(ctx.capture(VisionKeys(layer=self.layer)), patches)
            metric = gather_tokens(keys, rem_index).float()
            metric = metric / metric.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [n_images, R, head_dim]
            states = gather_tokens(hidden, rem_index)  # [n_images, R, dim]
            step = max(1, remaining // targets_n)
            target_slots = torch.arange(0, remaining, step, device=hidden.device)[:targets_n]
            is_target = torch.zeros(remaining, dtype=torch.bool, device=hidden.device)
            is_target[target_slots] = True
            others = (~is_target).nonzero().flatten()
            similarity = metric[:, others] @ metric[:, target_slots].transpose(1, 2)  # [n_images, R - C, C]
            assign = torch.nn.functional.one_hot(similarity.argmax(dim=2), targets_n).to(states.dtype)
            counts = assign.sum(dim=1).clamp(min=1)[..., None]  # [n_images, C, 1]
            aggregated = assign.transpose(1, 2) @ states[:, others] / counts  # mean of each target's members
            parts.append(states[:, target_slots] + aggregated)
        merged = torch.cat(parts, dim=1) if parts else hidden.new_zeros(n_images, 0, dim)
        return merged, torch.ones(merged.shape[:2], dtype=torch.bool, device=hidden.device)
