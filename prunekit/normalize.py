"""Named normalisations of a score over each sample's visual tokens.

Each takes ``score`` ``[batch, seq]`` and ``visual`` ``[batch, seq]`` bool and returns a
``[batch, seq]`` tensor normalised over the visual tokens of each sample (0 elsewhere). What
each is invariant to is what the property tests check:

============  =====================================  ==========================================
name          formula (over a sample's visual set)   invariant to
============  =====================================  ==========================================
``none``      x                                      nothing
``sum``       x / sum(x)                             positive scaling
``minmax``    (x - min) / (max - min)                positive scaling and shifts
``zscore``    (x - mean) / std                       positive scaling and shifts
``rank``      rank(x) / (n - 1), ties averaged       any strictly increasing map
``softmax``   exp(x) / sum(exp(x))                   shifts
============  =====================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from prunekit.errors import valid_list

Normalization = Callable[[Tensor, Tensor], Tensor]
_EPS = 1e-12


def _masked(score: Tensor, visual: Tensor, fill: float = 0.0) -> Tensor:
    return score.masked_fill(~visual, fill)


def _count(visual: Tensor) -> Tensor:
    return visual.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float64)


def none(score: Tensor, visual: Tensor) -> Tensor:
    return _masked(score, visual)


def sum_to_one(score: Tensor, visual: Tensor) -> Tensor:
    x = _masked(score, visual)
    total = x.sum(dim=1, keepdim=True)
    return torch.where(total.abs() > _EPS, x / total.where(total.abs() > _EPS, torch.ones_like(total)), x)


def minmax(score: Tensor, visual: Tensor) -> Tensor:
    low = _masked(score, visual, float("inf")).amin(dim=1, keepdim=True)
    high = _masked(score, visual, float("-inf")).amax(dim=1, keepdim=True)
    span = high - low
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (score - low) / safe, torch.zeros_like(score))
    return _masked(out, visual)


def zscore(score: Tensor, visual: Tensor) -> Tensor:
    x = score.to(torch.float64)
    n = _count(visual)
    mean = _masked(x, visual).sum(dim=1, keepdim=True) / n
    var = _masked((x - mean) ** 2, visual).sum(dim=1, keepdim=True) / n
    std = var.sqrt()
    out = torch.where(std > 0, (x - mean) / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(x))
    return _masked(out, visual).to(score.dtype)


def rank(score: Tensor, visual: Tensor) -> Tensor:
    """Average rank of each visual token among its sample's visual tokens, scaled to [0, 1]."""
    x = _masked(score.to(torch.float64), visual, float("-inf"))  # non-visual sort first
    ordered = x.sort(dim=1).values
    below = torch.searchsorted(ordered, x, right=False)  # [batch, seq]: entries strictly below
    upto = torch.searchsorted(ordered, x, right=True)  # entries below or equal
    non_visual = (~visual).sum(dim=1, keepdim=True)
    avg_rank = (below + upto - 1).to(torch.float64) / 2 - non_visual  # 0-based, ties averaged
    n = _count(visual)
    out = avg_rank / (n - 1).clamp(min=1)
    return _masked(out, visual).to(score.dtype)


def softmax(score: Tensor, visual: Tensor) -> Tensor:
    x = _masked(score.to(torch.float64), visual, float("-inf"))
    out = torch.softmax(x, dim=1).nan_to_num(0.0)
    return _masked(out, visual).to(score.dtype)


NORMALIZATIONS: dict[str, Normalization] = {
    "none": none,
    "sum": sum_to_one,
    "minmax": minmax,
    "zscore": zscore,
    "rank": rank,
    "softmax": softmax,
}


def get_normalization(name: str) -> Normalization:
    try:
        return NORMALIZATIONS[name]
    except KeyError:
        raise ValueError(f"unknown normalisation {name!r}; valid: {valid_list(NORMALIZATIONS)}") from None
