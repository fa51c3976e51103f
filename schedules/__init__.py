"""Built-in schedules: which decoder layers prune and how many visual tokens each keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from prunekit.api import Schedule, Stage
from prunekit.hookspecs import hookimpl


@dataclass
class StageSpec:
    """One stage of :class:`Stages`: prune before ``layer``; keep a fraction or a count of visual tokens."""

    layer: int = 0
    keep: Optional[float] = None  # fraction of each sample's original visual tokens, in (0, 1]
    count: Optional[int] = None  # or an absolute number of visual tokens (>= 0)


@dataclass
class Stages(Schedule):
    """Explicit stages, in layer order: prune before each 0-based ``layer``.

    ``keep`` is relative to the visual tokens that enter the language model (as TransPrune, FastV
    and PyramidDrop count), so ``[0.875, 0.625, 0.125]`` keeps 504, 360 and 72 of 576.

    Example::

        schedule: {type: stages, stages: [{layer: 2, keep: 0.5}]}
    """

    name: ClassVar[str] = "stages"
    stages: list[StageSpec] = field(default_factory=list)

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("'stages' is empty; give at least one {layer: L, keep: r}")
        for i, spec in enumerate(self.stages):
            if (spec.keep is None) == (spec.count is None):
                raise ValueError(f"stages.{i} needs exactly one of 'keep' (fraction) or 'count', got {spec}")
            if spec.keep is not None and not 0 < spec.keep <= 1:
                raise ValueError(f"stages.{i}.keep must be in (0, 1], got {spec.keep!r}")
            if spec.count is not None and spec.count < 0:
                raise ValueError(f"stages.{i}.count must be >= 0, got {spec.count!r}")
            if spec.layer < 0:
                raise ValueError(f"stages.{i}.layer must be >= 0, got {spec.layer!r}")

    def resolve(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=s.layer, keep=s.keep, count=s.count) for s in self.stages]


@dataclass
class Pyramid(Schedule):
    """PyramidDrop's schedule: prune before each of ``layers``, stage ``s`` keeping ``ratio ** (s + 1)``.

    With ``layers: [8, 16, 24]`` and ``ratio: 0.5`` a 576-token image runs 576 / 288 / 144 / 72 tokens
    through the four segments of a 32-layer decoder.

    Example::

        schedule: {type: pyramid, layers: [8, 16, 24], ratio: 0.5}
    """

    name: ClassVar[str] = "pyramid"
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    ratio: float = 0.5

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("'layers' is empty")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be >= 0, got {self.layers}")

    def resolve(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=layer, keep=self.ratio ** (s + 1)) for s, layer in enumerate(self.layers)]


@hookimpl
def prunekit_add_schedules() -> list[type[Schedule]]:
    return [Stages, Pyramid]
