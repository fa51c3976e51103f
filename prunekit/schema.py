"""The schema a recipe is validated against before anything is built (OmegaConf structured configs).

Criterion, combiner, merger and schedule parameters are checked by their plugins' own dataclasses;
``prunekit.docgen`` turns these fields and their ``doc`` metadata into the recipe-schema reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

Positions = Literal["compact", "original"]


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass
class VisionSchema:
    """A stage before the language model: prune (and merge) each image's features before the projector."""

    criteria: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "criterion key -> {type, parameters}; vision criteria read vision-tower probes"))
    combiner: Optional[dict[str, Any]] = field(default=None, metadata=_doc("as the top-level combiner"))
    keep: Optional[float] = field(default=None, metadata=_doc("fraction of each image's visual tokens, in (0, 1]"))
    count: Optional[int] = field(default=None, metadata=_doc("or a number of tokens kept per image"))
    merge: Optional[dict[str, Any]] = field(default=None, metadata=_doc(
        "{type: <merger>, ...}: summary tokens made from the dropped ones"))


@dataclass
class DecodeSchema:
    """Decode steps that read a selection of the cached visual tokens (DyCoke's dynamic KV-cache pruning)."""

    layer: int = field(default=3, metadata=_doc(
        "from this decoder layer on, a decode step attends to the selected visual tokens only; the selection "
        "is read from the new token's attention at layer - 1"))
    prune: float = field(default=0.8, metadata=_doc(
        "fraction of the cached visual tokens a selecting step leaves out, in [0, 1): it keeps "
        "int(n * (1 - prune)) of n, the most attended"))
    similar: Optional[float] = field(default=0.9, metadata=_doc(
        "a step whose attention row over the visual tokens has cosine >= similar with the previous step's "
        "reads them all (DyCoke's rule); null: every step selects"))


@dataclass
class RecipeSchema:
    """The top level of a recipe; criterion, combiner and schedule parameters are checked by their plugins."""

    name: str = field(default="custom", metadata=_doc("shown in reports and errors"))
    description: str = field(default="", metadata=_doc("one line, shown by `prunekit recipes`"))
    criteria: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "criterion key -> {type: <registered criterion>, <its parameters>}; type defaults to the key"))
    combiner: Optional[dict[str, Any]] = field(default=None, metadata=_doc(
        "{type: <registered combiner>, ...}; needed with two or more criteria"))
    schedule: dict[str, Any] = field(default_factory=dict, metadata=_doc(
        "{type: stages | pyramid | <registered schedule>, ...}: which decoder layers prune and how much stays"))
    merge: Optional[dict[str, Any]] = field(default=None, metadata=_doc(
        "{type: <registered merger>, ...}: summary tokens made from what each decoder stage drops"))
    vision: Optional[VisionSchema] = field(default=None, metadata=_doc("a stage before the language model"))
    decode: Optional[DecodeSchema] = field(default=None, metadata=_doc(
        "decode steps that attend to a per-step selection of the cached visual tokens"))
    adapter: Optional[str] = field(default=None, metadata=_doc(
        "an adapter name; by default the first registered adapter that matches the model"))
    positions: Positions = field(default="compact", metadata=_doc(
        "compact: re-index after each prune; original: each token keeps its position"))
    reference_depth: Optional[int] = field(default=None, metadata=_doc(
        "the decoder depth the layer numbers were written for; other depths are mapped onto it"))


RECIPE_KEYS = [f.name for f in dataclasses.fields(RecipeSchema)]
