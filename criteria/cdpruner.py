"""CDPruner (Zhang et al., 2025): a conditional DPP over the visual tokens, conditioned on the instruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import ForwardContext, LayerInputCriterion, check_fraction

from .diversity import _padded_visual, _scores_from_order


def instruction_relevance(visual: Tensor, valid: Tensor, text: Tensor, text_valid: Tensor) -> Tensor:
    """CDPruner's relevance of each visual token to the instruction, min-max normalised per sample.

    visual: ``[batch, v, dim]`` (valid ``[batch, v]``); text: ``[batch, t, dim]`` (valid ``[batch, t]``).
    ``r = mean over text tokens of -cos(visual, text)``, then ``(r - min + 1e-6) / (max - min)`` over
    the sample's visual tokens. A sample without text tokens gets relevance 1 (a plain DPP). Float64.
    """
    v = visual.to(torch.float64)
    t = text.to(torch.float64)
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    t = t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cosine = (v @ t.transpose(1, 2)) * text_valid[:, None, :]  # [batch, v, t]
    n_text = text_valid.sum(dim=1).clamp(min=1)[:, None]  # [batch, 1]
    relevance = -cosine.sum(dim=2) / n_text  # [batch, v]
    low = relevance.masked_fill(~valid, float("inf")).amin(dim=1, keepdim=True)
    high = relevance.masked_fill(~valid, float("-inf")).amax(dim=1, keepdim=True)
    relevance = (relevance - low + 1e-6) / (high - low).clamp(min=1e-12)
    no_text = ~text_valid.any(dim=1, keepdim=True)
    return torch.where(no_text, torch.ones_like(relevance), relevance).masked_fill(~valid, 0)


def dpp_greedy_order(kernel: Tensor, valid: Tensor, picks: int) -> Tensor:
    """Fast greedy MAP inference of a DPP (Chen et al., 2018): the first ``picks`` indices, ``[batch, picks]``.

    kernel: ``[batch, n, n]`` positive semi-definite, valid: ``[batch, n]``. Each step picks the token
    with the largest remaining conditional variance ``d_j^2`` (first index on ties), then updates
    ``e = (L_j - sum_t c_t[j] c_t) / d_j`` and ``d^2 -= e^2``. Variances at or below ``1e-9`` of the
    sample's largest diagonal entry count as 0: once the kernel's rank is used up (more picks than
    its rank) a pick adds no direction (``e = 0``) and the remaining picks go in index order, the
    same alone or in any batch. Slots past a sample's valid count are -1.
    """
    batch, n, _ = kernel.shape
    rows = torch.arange(batch, device=kernel.device)
    gain = torch.diagonal(kernel, dim1=1, dim2=2).clone().masked_fill(~valid, float("-inf"))  # [batch, n]
    tolerance = 1e-9 * gain.masked_fill(~valid, 0).amax(dim=1, keepdim=True)  # [batch, 1]
    directions = kernel.new_zeros(picks, batch, n)  # c_t for each pick t
    chosen = torch.full((batch, picks), -1, dtype=torch.long, device=kernel.device)
    for step in range(picks):
        j = gain.argmax(dim=1)  # [batch]
        best = gain[rows, j]
        chosen[:, step] = torch.where(best > float("-inf"), j, -1)
        projection = torch.einsum("tb,tbn->bn", directions[:step, rows, j], directions[:step])  # [batch, n]
        scale = torch.where(best > 0, best, torch.ones_like(best)).sqrt()  # best > 0 means above the tolerance
        e = torch.where((best > 0)[:, None], (kernel[rows, j] - projection) / scale[:, None], 0.0)
        directions[step] = e
        gain = gain - e * e
        gain = torch.where((gain > tolerance) | torch.isinf(gain), gain, torch.zeros_like(gain))  # noise -> 0
        gain[rows, j] = float("-inf")
    return chosen


@dataclass
class CDPruner(LayerInputCriterion):
    """CDPruner: keep the visual tokens a conditional DPP picks, relevance from the instruction.

    On the hidden states entering the prune layer (before layer 0: the projected visual tokens and
    the token embeddings): similarity ``S`` = cosine between visual tokens; relevance ``r`` = the
    mean over instruction tokens (the prompt after the image) of ``-cos(visual, instruction)``,
    min-max normalised per sample (:func:`instruction_relevance`); with ``theta < 1``,
    ``r = exp(theta / (2 (1 - theta)) * r)``. Kernel ``L = diag(r) S diag(r)``; the kept tokens are
    the first ``k`` picks of greedy MAP inference (:func:`dpp_greedy_order`), earlier picks scoring
    higher.

    Example::

        criteria: {cdpruner: {type: cdpruner}}
        schedule: {type: stages, stages: [{layer: 0, count: 64}]}
    """

    name: ClassVar[str] = "cdpruner"
    theta: float = 1.0

    def validate(self) -> None:
        check_fraction(self.theta, "theta")

    def score(self, ctx: ForwardContext) -> Tensor:
        hidden = self.stage_hidden(ctx)  # [batch, seq, dim]
        layout = ctx.layout
        features, valid, index = _padded_visual(hidden, layout.visual)  # [batch, v, dim]
        text, text_valid, _ = _padded_visual(hidden, layout.instruction & layout.valid)  # [batch, t, dim]
        relevance = instruction_relevance(features, valid, text, text_valid)  # [batch, v]
        if self.theta < 1:
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance).masked_fill(~valid, 0)
        unit = features.to(torch.float64)
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        kernel = relevance[:, :, None] * (unit @ unit.transpose(1, 2)) * relevance[:, None, :]  # [batch, v, v]
        kernel = kernel * (valid[:, :, None] & valid[:, None, :])
        picks = int(ctx.keep_counts.max().item()) if ctx.keep_counts is not None else features.shape[1]
        chosen = dpp_greedy_order(kernel, valid, picks)
        return _scores_from_order(chosen, index, layout.seq_len, torch.float64)
