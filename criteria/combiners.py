"""Built-in combiners: merge the named scores of a recipe's criteria into one score per token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from prunekit.api import Combiner
from prunekit.errors import valid_list
from prunekit.hookspecs import hookimpl
from prunekit.normalize import NORMALIZATIONS, get_normalization


def _check_weights(weights: Optional[dict[str, float]], criteria: Sequence[str]) -> None:
    if weights is None:
        return
    unknown = set(weights) - set(criteria)
    if unknown:
        raise ValueError(f"weights name unknown criteria {valid_list(unknown)}; the recipe's criteria: "
                         f"{valid_list(criteria)}")
    missing = set(criteria) - set(weights)
    if missing:
        raise ValueError(f"weights give no weight to {valid_list(missing)}; give every criterion a weight")


@dataclass
class WeightedSum(Combiner):
    """Weighted sum of normalised scores: ``sum_k w_k * normalize(score_k)`` over each sample's visual tokens.

    TransPrune combines its two criteria this way: ``normalize: sum`` makes TTV and IGA each sum
    to 1 over the image tokens, then ``alpha * TTV + (1 - alpha) * IGA``. ``weights: null``
    weighs every criterion equally.

    Example::

        combiner: {type: weighted_sum, weights: {ttv: 0.5, iga: 0.5}, normalize: sum}
    """

    name: ClassVar[str] = "weighted_sum"
    weights: Optional[dict[str, float]] = None
    normalize: str = "sum"

    def validate(self, criteria: Sequence[str]) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={self.normalize!r} is unknown; valid: {valid_list(NORMALIZATIONS)}")
        _check_weights(self.weights, criteria)

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        norm = get_normalization(self.normalize)
        weights = self.weights or {key: 1.0 / len(scores) for key in scores}
        total = None
        for key, score in scores.items():
            term = weights[key] * norm(score, visual)
            total = term if total is None else total + term
        assert total is not None
        return total.masked_fill(~visual, 0)


@hookimpl
def prunekit_add_combiners() -> list[type[Combiner]]:
    return [WeightedSum]
