"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLS attention, the rest merged into contextual tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, Merger
from prunekit.probes import Probe, VisionAttention, VisionAttentionReceived, VisionHidden, VisionKeys
from prunekit.sequence import gather_tokens


TARGETS = "visionzip_targets"  # ctx.buffers key: visionzip_received's contextual targets, [n_images, patches] bool


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


@dataclass
class VisionZipReceived(Criterion):
    """VisionZip for a vision tower without a CLS token, as LightCompress runs it on Qwen2.5-VL: dominant tokens
    by the attention they receive, then contextual targets spread over the rest.

    As LightCompress (``llmc/compression/token_reduction/visionzip.py``, its Qwen2.5-VL path): the attention
    of vision layer ``layer`` (-1: the last block, a full-attention block on Qwen2.5-VL), mean over heads,
    summed over the queries, per merged token (``VisionAttentionReceived``). Of the ``T`` tokens a ``vision``
    stage keeps, ``c = max(int(T * contextual), 1)`` are contextual targets and the other ``T - c`` the
    dominant ones, those receiving the most attention; the targets are every ``step``-th of the remaining
    tokens in order (``step = max(1, m // c)`` over the ``m`` remaining, the first ``c``). LightCompress takes
    the two counts as ratios of the image's tokens; here they are shares of the stage's ``T``. Scores: 2 for
    dominant, 1 for targets, 0 otherwise, plus the attention scaled below 0.5; the targets also go to
    ``ctx.buffers["visionzip_targets"]`` for ``visionzip_targets``, which merges every other token into its
    most similar target in place.

    Example::

        vision: {criteria: {dominant: {type: visionzip_received}}, keep: 0.33334,
                 merge: {type: visionzip_targets}}
    """

    name: ClassVar[str] = "visionzip_received"
    layer: int = -1
    contextual: float = 0.15625

    def validate(self) -> None:
        if not 0 < self.contextual < 1:
            raise ValueError(f"contextual (the targets' share of the kept tokens) must be in (0, 1), got "
                             f"{self.contextual!r}")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        return [VisionAttentionReceived(layer=self.layer)]

    def score(self, ctx: ForwardContext) -> Tensor:
        patches = ctx.layout.seq_len
        attention = _patch_columns(ctx.capture(VisionAttentionReceived(layer=self.layer)), patches).double()  # [n, P]
        if ctx.keep_counts is None:
            raise ValueError("visionzip_received needs the stage's keep count (it is a vision-stage criterion)")
        keep = int(ctx.keep_counts.max())
        targets_n = min(max(int(keep * self.contextual), 1), keep)
        dominant = attention.topk(keep - targets_n, dim=1).indices  # [n, T - c]
        category = torch.zeros_like(attention)
        category.scatter_(1, dominant, 2.0)
        for i in range(attention.shape[0]):
            rest = (category[i] == 0).nonzero().flatten()  # the non-dominant tokens, in order
            step = max(1, len(rest) // max(targets_n, 1))
            category[i, rest[torch.arange(0, len(rest), step, device=rest.device)[:targets_n]]] = 1.0
        ctx.buffers[TARGETS] = category == 1.0  # [n, P]: the contextual targets, for visionzip_targets
        return category + 0.5 * attention / (attention.amax(dim=1, keepdim=True) + 1)


@dataclass
class VisionZipTargets(Merger):
    """VisionZip's contextual merge in place (LightCompress on Qwen2.5-VL): each dropped token joins the kept
    contextual target (``visionzip_received`` names them) whose key at vision layer ``layer``
    (mean over heads, ``VisionKeys``) is most cosine-similar; a target becomes its own features plus the mean
    of its members', in its own place and position.

    Example::

        merge: {type: visionzip_targets, layer: -1}
    """

    name: ClassVar[str] = "visionzip_targets"
    in_place: ClassVar[bool] = True
    layer: int = -1

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        return [VisionKeys(layer=self.layer)]

    def count(self, dropped: int) -> int:
        return 0

    def merge_into_kept(self, hidden: Tensor, kept: Tensor, scores: Tensor, ctx: ForwardContext) -> Tensor:
        chosen = ctx.buffers.get(TARGETS)  # [n, P] bool, from visionzip_received
        if chosen is None:
            raise ValueError("visionzip_targets merges into the contextual targets visionzip_received picks: use "
                             "it in a vision block whose criteria include visionzip_received")
        keys = _patch_columns(ctx.capture(VisionKeys(layer=self.layer)), hidden.shape[1]).float()  # [n, P, head_dim]
        metric = keys / keys.norm(dim=-1, keepdim=True)
        out = hidden.clone()
        for i in range(hidden.shape[0]):
            targets = (kept[i] & chosen[i]).nonzero().flatten()  # [c]
            members = (~kept[i]).nonzero().flatten()  # [m]
            if not len(targets) or not len(members):
                continue
            assign = (metric[i, members] @ metric[i, targets].T).argmax(dim=1)  # [m]: each member's target
            sums = hidden.new_zeros(len(targets), hidden.shape[-1]).index_add_(0, assign, hidden[i, members])
            counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1).to(hidden.dtype)
            out[i, targets] = hidden[i, targets] + sums / counts[:, None]
        return out
