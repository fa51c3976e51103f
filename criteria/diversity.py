"""Criteria on the visual tokens' own features: DivPrune's diversity, redundancy, L2 norm."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from prunekit.api import ForwardContext, LayerInputCriterion


def _padded_visual(hidden: Tensor, visual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's visual tokens packed left.

    Returns features [batch, v_max, dim], valid [batch, v_max] and index [batch, v_max]: the
    sequence position of each slot, ``seq`` on empty slots (see :func:`_unpack`).
    """
    batch, seq, _ = hidden.shape
    counts = visual.sum(dim=1)
    v_max = int(counts.max().item()) if batch else 0
    positions = torch.arange(seq, device=hidden.device).expand(batch, seq)
    index = torch.where(visual, positions, positions + seq).sort(dim=1).values[:, :v_max]
    valid = torch.arange(v_max, device=hidden.device)[None, :] < counts[:, None]
    index = torch.where(valid, index, seq)
    features = hidden.gather(1, index.clamp(max=seq - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
    return features, valid, index


def _unpack(values: Tensor, index: Tensor, seq: int) -> Tensor:
    """Put per-slot values [batch, v_max] back at their sequence positions: [batch, seq], 0 elsewhere."""
    out = values.new_zeros(values.shape[0], seq + 1)  # column ``seq`` absorbs the empty slots
    return out.scatter(1, index, values)[:, :seq]


def _cosine_distance(features: Tensor) -> Tensor:
    """1 - cos between every pair: [batch, n, dim] -> [batch, n, n] (float64)."""
    x = features.to(torch.float64)
    x = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return 1 - x @ x.transpose(1, 2)


def max_min_order(features: Tensor, valid: Tensor, picks: int) -> Tensor:
    """DivPrune's greedy max-min selection: the first ``picks`` token indices per sample, [batch, picks].

    Start from the token farthest from its nearest neighbour; then repeatedly add the token whose
    smallest cosine distance to the chosen set is largest (first index on ties). Invalid slots are
    never chosen; a sample with fewer valid tokens than ``picks`` gets -1 after them.
    """
    batch, n, _ = features.shape
    distance = _cosine_distance(features)  # [batch, n, n]
    invalid_pair = ~(valid[:, :, None] & valid[:, None, :])
    eye = torch.eye(n, dtype=torch.bool, device=features.device)[None]
    nearest = distance.masked_fill(invalid_pair | eye, float("inf")).amin(dim=1)  # [batch, n] NN distance
    nearest = torch.where(torch.isinf(nearest) & valid, torch.zeros_like(nearest), nearest)
    chosen = torch.full((batch, picks), -1, dtype=torch.long, device=features.device)
    taken = ~valid.clone()
    score = nearest.masked_fill(~valid, float("-inf"))
    min_to_set = torch.full((batch, n), float("inf"), dtype=torch.float64, device=features.device)
    for step in range(picks):
        if step > 0:
            score = min_to_set.masked_fill(taken, float("-inf"))
        pick = score.argmax(dim=1)  # [batch]
        ok = ~taken.gather(1, pick[:, None])[:, 0]
        chosen[:, step] = torch.where(ok, pick, -1)
        taken.scatter_(1, pick[:, None], True)
        row = distance.gather(1, pick[:, None, None].expand(-1, 1, n))[:, 0]  # [batch, n]
        min_to_set = torch.minimum(min_to_set, row)
    return chosen


def _scores_from_order(chosen: Tensor, index: Tensor, seq: int, dtype: torch.dtype) -> Tensor:
    """Score picks - rank for chosen tokens (earlier picks higher), 0 elsewhere: [batch, seq]."""
    batch, picks = chosen.shape
    rank_score = (picks - torch.arange(picks, device=chosen.device, dtype=dtype)).expand(batch, picks)
    positions = torch.where(chosen >= 0, index.gather(1, chosen.clamp(min=0)), seq)
    return _unpack(rank_score.contiguous(), positions, seq)


@dataclass
class DivPrune(LayerInputCriterion):
    """DivPrune (Alvar et al., CVPR 2025): a max-min diverse subset of the visual tokens.

    Greedy farthest-point selection on the cosine distance of the hidden states entering the prune
    layer (at layer 0: the projected visual tokens); the tokens picked first score highest, so the
    kept set is exactly the first ``k`` picks.

    Example::

        criteria: {divprune: {type: divprune}}
        schedule: {type: stages, stages: [{layer: 0, keep: 0.098}]}
    """

    name: ClassVar[str] = "divprune"

    def score(self, ctx: ForwardContext) -> Tensor:
        hidden = self.stage_hidden(ctx)
        features, valid, index = _padded_visual(hidden, ctx.layout.visual)
        picks = int(ctx.keep_counts.max().item()) if ctx.keep_counts is not None else features.shape[1]
        chosen = max_min_order(features, valid, picks)
        return _scores_from_order(chosen, index, ctx.layout.seq_len, torch.float64)


@dataclass
class Redundancy(LayerInputCriterion):
    """Keeps distinctive tokens: ``1 - mean`` (or ``max``) cosine similarity to the sample's other visual tokens.

    Example::

        criteria: {similarity: {type: similarity, reduce: max}}
    """

    name: ClassVar[str] = "similarity"
    reduce: Literal["mean", "max"] = "mean"

    def score(self, ctx: ForwardContext) -> Tensor:
        hidden = self.stage_hidden(ctx)
        features, valid, index = _padded_visual(hidden, ctx.layout.visual)
        similarity = 1 - _cosine_distance(features)  # [batch, v, v]
        n = similarity.shape[1]
        others = valid[:, :, None] & valid[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=hidden.device)
        if self.reduce == "max":
            redundancy = similarity.masked_fill(~others, float("-inf")).amax(dim=2)
            redundancy = torch.where(torch.isinf(redundancy), torch.zeros_like(redundancy), redundancy)
        else:
            redundancy = (similarity * others).sum(dim=2) / others.sum(dim=2).clamp(min=1)
        return _unpack((1 - redundancy).masked_fill(~valid, 0), index, ctx.layout.seq_len)


@dataclass
class L2Norm(LayerInputCriterion):
    """The L2 norm of each visual token's hidden state entering the prune layer (large norms kept).

    Example::

        criteria: {norm: {type: l2_norm}}
    """

    name: ClassVar[str] = "l2_norm"

    def score(self, ctx: ForwardContext) -> Tensor:
        return self.stage_hidden(ctx).to(torch.float64).norm(dim=-1).masked_fill(~ctx.layout.visual, 0)
