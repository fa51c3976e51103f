"""Built-in combiners: merge the named scores of a recipe's criteria into one score per token."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import Tensor

from prunekit.api import Combiner
from prunekit.errors import RecipeError, valid_list
from prunekit.hookspecs import hookimpl
from prunekit.normalize import NORMALIZATIONS, get_normalization


def _check_weights(weights: Optional[dict[str, float]], criteria: Sequence[str]) -> None:
    """Weights name exactly the recipe's criteria, each a finite number, with a positive sum.

    A NaN or infinite weight makes every combined score NaN or infinite, and weights that are all
    zero or cancel to a zero (or negative) sum make the combined score constant or inverted: in
    each case top-k would keep the first tokens in order, so the recipe is refused at load.
    """
    if weights is None:
        return
    unknown = set(weights) - set(criteria)
    if unknown:
        raise RecipeError(f"weights name unknown criteria {valid_list(unknown)}; the recipe's criteria: "
                          f"{valid_list(criteria)}")
    missing = set(criteria) - set(weights)
    if missing:
        raise RecipeError(f"weights give no weight to {valid_list(missing)}; give every criterion a weight")
    for key, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RecipeError(f"weights.{key}={weight!r} is not a finite number; each weight must be a finite "
                              f"number and the weights must sum to more than 0")
    total = math.fsum(weights.values())
    if not total > 0:
        shown = ", ".join(f"{key}: {weight!r}" for key, weight in weights.items())
        what = "are all zero" if all(w == 0 for w in weights.values()) else f"sum to {total!r}"
        raise RecipeError(f"weights {{{shown}}} {what}; the weights must sum to more than 0 (a negative weight "
                          f"is allowed only if the others outweigh it)")


@dataclass
class _Normalised(Combiner):
    """Shared by combiners that weigh each criterion's score after a named normalisation."""

    weights: Optional[dict[str, float]] = field(default=None, metadata={"tune": "simplex"})
    normalize: str = "sum"

    def validate(self, criteria: Sequence[str]) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise RecipeError(f"normalize={self.normalize!r} is unknown; valid: {valid_list(NORMALIZATIONS)}")
        _check_weights(self.weights, criteria)

    def _weights(self, scores: Mapping[str, Tensor], default: float) -> dict[str, float]:
        return self.weights or {key: default for key in scores}

    def _normalised(self, scores: Mapping[str, Tensor], visual: Tensor) -> dict[str, Tensor]:
        norm = get_normalization(self.normalize)
        return {key: norm(score.to(torch.float64), visual) for key, score in scores.items()}


@dataclass
class WeightedSum(_Normalised):
    """Weighted sum of normalised scores: ``sum_k w_k * normalize(score_k)`` over each sample's visual tokens.

    TransPrune combines its two criteria this way: ``normalize: sum`` makes TTV and IGA each sum
    to 1 over the image tokens, then ``alpha * TTV + (1 - alpha) * IGA``. ``weights: null``
    weighs every criterion equally.

    Example::

        combiner: {type: weighted_sum, weights: {ttv: 0.5, iga: 0.5}, normalize: sum}
    """

    name: ClassVar[str] = "weighted_sum"

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        weights = self._weights(scores, 1.0 / len(scores))
        terms = [weights[key] * value for key, value in self._normalised(scores, visual).items()]
        return torch.stack(terms).sum(dim=0).masked_fill(~visual, 0)


@dataclass
class RankFusion(Combiner):
    """Reciprocal rank fusion: ``sum_k w_k / (k0 + rank_k)``, rank 1 the best visual token of criterion k.

    Invariant to any strictly increasing transform of each score (only ranks matter).

    Example::

        combiner: {type: rank_fusion, k0: 60}
    """

    name: ClassVar[str] = "rank_fusion"
    weights: Optional[dict[str, float]] = field(default=None, metadata={"tune": "simplex"})
    k0: float = 60.0

    def validate(self, criteria: Sequence[str]) -> None:
        if not (math.isfinite(self.k0) and self.k0 >= 0):
            raise RecipeError(f"k0={self.k0!r} is invalid; k0 must be a finite number >= 0")
        _check_weights(self.weights, criteria)

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        weights = self.weights or {key: 1.0 for key in scores}
        total = torch.zeros(visual.shape, dtype=torch.float64, device=visual.device)
        n = visual.sum(dim=1, keepdim=True).to(torch.float64)
        for key, score in scores.items():
            # rank 1 = best: n - (ascending average rank) with ranks 0..n-1
            ascending = get_normalization("rank")(score.to(torch.float64), visual) * (n - 1).clamp(min=1)
            best_first = n - ascending
            total = total + weights[key] / (self.k0 + best_first)
        return total.masked_fill(~visual, 0)


@dataclass
class Product(_Normalised):
    """Weighted geometric combination: ``prod_k normalize(score_k) ** w_k`` (scores made positive first).

    With ``normalize: sum`` (default) it is invariant to a positive scaling of each score.

    Example::

        combiner: {type: product, normalize: sum}
    """

    name: ClassVar[str] = "product"
    eps: float = 1e-12

    def validate(self, criteria: Sequence[str]) -> None:
        super().validate(criteria)
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise RecipeError(f"eps={self.eps!r} is invalid; eps must be a finite number > 0")

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        weights = self._weights(scores, 1.0)
        logs = [weights[key] * (value.clamp(min=0) + self.eps).log()
                for key, value in self._normalised(scores, visual).items()]
        return torch.stack(logs).sum(dim=0).exp().masked_fill(~visual, 0)


@dataclass
class Maximum(_Normalised):
    """Per token, the largest weighted normalised score: a token kept by any criterion survives.

    Example::

        combiner: {type: max, normalize: minmax}
    """

    name: ClassVar[str] = "max"
    normalize: str = "minmax"

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        weights = self._weights(scores, 1.0)
        terms = [weights[key] * value for key, value in self._normalised(scores, visual).items()]
        return torch.stack(terms).amax(dim=0).masked_fill(~visual, 0)


@hookimpl
def prunekit_add_combiners() -> list[type[Combiner]]:
    return [WeightedSum, RankFusion, Product, Maximum]
