"""Visual cues before the language model: FasterVLM (CLS attention) and VisPruner (CLS attention, then diversity)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, check_fraction
from prunekit.probes import Probe, VisionAttention, VisionHidden

from .visionzip import VisionZipDominant, _patch_columns


@dataclass
class ClsAttention(VisionZipDominant):
    """FasterVLM (Zhang et al., 2024): the [CLS] token's attention to each patch, before the projector.

    As the official code: the attention of vision layer ``layer`` (-2, the layer LLaVA feeds the
    projector), the CLS row, mean over heads; a ``vision`` stage keeps the top ``count`` patches
    and merges nothing.

    Example::

        vision: {criteria: {cls: {type: cls_attention}}, count: 64}
    """

    name: ClassVar[str] = "cls_attention"
    layer: int = -2


def vispruner_selection(attention: Tensor, features: Tensor, keep: int, important_ratio: float,
                        step: int = 8) -> tuple[Tensor, Tensor]:
    """VisPruner's kept patches: ``(important [n, T_imp], diverse [n, T - T_imp])`` patch indices.

    attention: ``[n_images, patches]`` CLS attention; features: ``[n_images, patches, dim]``. The
    ``int(keep * important_ratio)`` patches with the most attention are important. The rest, in
    descending attention, are thinned by rounds of matching until ``keep - T_imp`` remain: split
    them alternately into ``a`` (even places) and ``b`` (odd places), give each ``a`` its largest
    cosine similarity to any ``b``, drop the ``min(step, R - T_div)`` most similar ``a`` and go on
    with the other ``a`` (most similar first) followed by every ``b``. Sorting is stable (ties keep
    the earlier place).
    """
    n_images, patches = attention.shape
    important_n = int(keep * important_ratio)
    diverse_n = keep - important_n
    order = torch.sort(attention, dim=1, descending=True, stable=True).indices  # [n, patches]
    important, residual = order[:, :important_n], order[:, important_n:]
    unit = features / features.norm(dim=-1, keepdim=True)  # [n, patches, dim]
    while diverse_n > 0:
        remaining = residual.shape[1]
        r = min(step, remaining - diverse_n)
        if r <= 0:
            break
        tokens = unit.gather(1, residual[..., None].expand(-1, -1, unit.shape[-1]))  # [n, R, dim]
        a, b = tokens[:, ::2], tokens[:, 1::2]
        similarity = (a @ b.transpose(1, 2)).amax(dim=2)  # [n, ceil(R / 2)]
        distinct = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, r:]
        residual = torch.cat([residual[:, ::2].gather(1, distinct), residual[:, 1::2]], dim=1)  # [n, R - r]
    diverse = residual[:, :diverse_n] if diverse_n > 0 else residual[:, :0]
    return important, diverse


@dataclass
class VisPruner(Criterion):
    """VisPruner (Zhang et al., ICCV 2025): important patches by CLS attention, then diverse ones.

    As the official code, on vision layer ``layer`` (-2, the layer LLaVA feeds the projector): of the
    ``T`` patches a ``vision`` stage keeps, ``int(T * important_ratio)`` are those with the most CLS
    attention (mean over heads); the rest come from the other patches, thinned by rounds of
    bipartite matching on the cosine similarity of that layer's hidden states, ``step`` tokens a
    round (see :func:`vispruner_selection`). Scores: ``2 + attention`` for important patches,
    ``1 + attention`` for diverse ones, ``attention`` otherwise.

    Example::

        vision: {criteria: {vispruner: {type: vispruner, important_ratio: 0.5}}, count: 64}
    """

    name: ClassVar[str] = "vispruner"
    important_ratio: float = 0.5
    layer: int = -2
    step: int = 8

    def validate(self) -> None:
        check_fraction(self.important_ratio, "important_ratio")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 1:
            raise ValueError(f"step (tokens dropped per matching round) must be an int >= 1, got {self.step!r}")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        return [VisionAttention(layer=self.layer, query=0), VisionHidden(layer=self.layer)]

    def score(self, ctx: ForwardContext) -> Tensor:
        patches = ctx.layout.seq_len
        attention = _patch_columns(ctx.capture(VisionAttention(layer=self.layer, query=0)), patches)  # [n, P]
        features = _patch_columns(ctx.capture(VisionHidden(layer=self.layer)), patches)  # [n, P, dim]
        if ctx.keep_counts is None:
            raise ValueError("vispruner needs the stage's keep count (it is a vision-stage criterion)")
        keep = int(ctx.keep_counts.max())
        important, diverse = vispruner_selection(attention, features, keep, self.important_ratio, self.step)
        scores = attention.to(torch.float64).clone()  # [n, P]
        scores.scatter_add_(1, important, torch.full(important.shape, 2.0, dtype=scores.dtype, device=scores.device))
        scores.scatter_add_(1, diverse, torch.ones(diverse.shape, dtype=scores.dtype, device=scores.device))
        return scores
