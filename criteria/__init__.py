"""Built-in criteria (TTV, accumulated TTV, IGA, attention, FastV, random) and combiners."""

from __future__ import annotations

from prunekit.api import Criterion
from prunekit.hookspecs import hookimpl

from .attention import IGA, Attention, FastVAttention
from .random import RandomScore
from .ttv import TTV, AccumulatedTTV

BUILTIN_CRITERIA: list[type[Criterion]] = [TTV, AccumulatedTTV, IGA, Attention, FastVAttention, RandomScore]


@hookimpl
def prunekit_add_criteria() -> list[type[Criterion]]:
    return list(BUILTIN_CRITERIA)
