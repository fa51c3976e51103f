"""Built-in schedules: which decoder layers prune and how many visual tokens each keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prunekit.api import Schedule, Stage, check_fraction
from prunekit.hookspecs import hookimpl


@dataclass
class Stages(Schedule):
    """Explicit stages, in layer order: prune before each 0-based ``layer``.

    ``keep`` is relative to the visual tokens that enter the language model (as TransPrune, FastV
    and PyramidDrop count), so ``[0.875, 0.625, 0.125]`` keeps 504, 360 and 72 of 576.

    Example::

        schedule: {type: stages, stages: [{layer: 2, keep: 0.5}]}
    """

    name: ClassVar[str] = "stages"
    stages: list[Stage] = field(default_factory=list, metadata={"tune": "stages"})

    def validate(self) -> None:
        if not self.stages:
            raise ValueError("'stages' is empty; give at least one {layer: L, keep: r}")
        for i, stage in enumerate(self.stages):
            stage.check(f"stages.{i}")

    def resolve(self, num_layers: int) -> list[Stage]:
        return list(self.stages)


@dataclass
class Pyramid(Schedule):
    """PyramidDrop's schedule: prune before each of ``layers``, stage ``s`` keeping ``ratio ** (s + 1)``.

    With ``layers: [8, 16, 24]`` and ``ratio: 0.5`` a 576-token image runs 576 / 288 / 144 / 72 tokens
    through the four segments of a 32-layer decoder.

    Example::

        schedule: {type: pyramid, layers: [8, 16, 24], ratio: 0.5}
    """

    name: ClassVar[str] = "pyramid"
    layers: list[int] = field(default_factory=lambda: [8, 16, 24], metadata={"tune": "layers"})
    ratio: float = field(default=0.5, metadata={"tune": (0.05, 1.0)})

    def validate(self) -> None:
        if not self.layers:
            raise ValueError("'layers' is empty")
        check_fraction(self.ratio, "ratio")
        if any(layer < 0 for layer in self.layers):
            raise ValueError(f"layers must be >= 0, got {self.layers}")

    def resolve(self, num_layers: int) -> list[Stage]:
        return [Stage(layer=layer, keep=self.ratio ** (s + 1)) for s, layer in enumerate(self.layers)]


@hookimpl
def prunekit_add_schedules() -> list[type[Schedule]]:
    return [Stages, Pyramid]
