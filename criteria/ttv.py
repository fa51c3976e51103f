"""Token transition variation (TTV), TransPrune's criterion, single-layer and accumulated."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext
from prunekit.probes import ModuleIO, Probe

Direction = Literal["one_minus_cos", "one_minus_abs_cos"]


def transition_variation(
    inputs: Tensor,
    output: Tensor,
    valid: Tensor,
    direction: Direction = "one_minus_cos",
    magnitude: bool = True,
    use_direction: bool = True,
) -> Tensor:
    """TTV of one module: ``||out|| / ||in|| * softmax_seq(1 - cos(in, out))``.

    inputs, output: [batch, seq, hidden] (the module's normed input and its output before the
    residual add); valid: [batch, seq] bool, the tokens the softmax runs over. Returns [batch, seq].
    ``magnitude`` / ``use_direction`` switch either factor off (TransPrune's ablations).
    """
    x = inputs.to(torch.float64 if inputs.dtype == torch.float64 else torch.float32)
    y = output.to(x.dtype)
    score = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    info = torch.finfo(x.dtype)
    tiny = info.tiny
    x_norm, y_norm = x.norm(dim=-1), y.norm(dim=-1)  # [batch, seq]
    if magnitude:
        # a (near-)zero input norm is floored relative to the sample's largest one, and the ratio capped
        # with headroom for sums, so extreme but finite inputs give finite scores
        largest = x_norm.masked_fill(~valid, 0).amax(dim=-1, keepdim=True)  # [batch, 1]
        floor = torch.maximum(x_norm, largest * info.eps).clamp(min=tiny)
        score = score * (y_norm / floor).nan_to_num(posinf=info.max).clamp(max=info.max / 2**16)
    if use_direction:
        # cos from unit vectors: exact at any scale (F.cosine_similarity's eps bends it for norms near 1e-8)
        unit_x = x / x_norm.clamp(min=tiny)[..., None]
        unit_y = y / y_norm.clamp(min=tiny)[..., None]
        cos = (unit_x * unit_y).sum(dim=-1).clamp(-1.0, 1.0)  # [batch, seq]
        change = 1 - (cos.abs() if direction == "one_minus_abs_cos" else cos)
        change = change.masked_fill(~valid, float("-inf"))
        score = score * torch.softmax(change, dim=-1)
    return score.masked_fill(~valid, 0)


@dataclass
class TTV(Criterion):
    """Token transition variation (TransPrune, CVPR 2026) of the layer just before the prune.

    For the attention and the MLP of a layer, ``in`` is the module's normed input and ``out``
    its output before the residual add; ``TTV = ||out|| / ||in|| * softmax over the sequence of
    (1 - cos(in, out))`` and a layer's TTV is attention + MLP. ``direction: one_minus_abs_cos``
    uses ``1 - |cos|`` as the paper writes it; the default follows the official code.

    Example::

        criteria: {ttv: {type: ttv}}
    """

    name: ClassVar[str] = "ttv"
    direction: Direction = "one_minus_cos"
    magnitude: bool = True
    use_direction: bool = True
    modules: list[str] = field(default_factory=lambda: ["attention", "mlp"])

    def validate(self) -> None:
        if not self.magnitude and not self.use_direction:
            raise ValueError("magnitude and use_direction are both off: the score would be constant")
        bad = [m for m in self.modules if m not in ("attention", "mlp")]
        if bad or not self.modules:
            raise ValueError(f"modules must be a non-empty subset of ['attention', 'mlp'], got {self.modules}")

    def layers_for(self, stage_layers: Sequence[int], num_layers: int) -> list[int]:
        """The layers whose TTV this criterion sums."""
        return sorted({layer - 1 for layer in stage_layers if layer >= 1})

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        if any(layer < 1 for layer in stage_layers):
            raise ValueError(f"criterion {self.key or self.name!r} needs a layer before each prune; "
                             f"stages {list(stage_layers)} prune before layer 0")
        for layer in self.layers_for(stage_layers, num_layers):
            for module in self.modules:
                yield ModuleIO(layer=layer, module=module)

    def _buffer(self, layer: int) -> str:
        return f"{self.key}/layer{layer}"

    def observe(self, ctx: ForwardContext, probe: ModuleIO, inputs: Tensor, output: Tensor) -> None:
        value = transition_variation(inputs, output, ctx.layout.valid, self.direction, self.magnitude,
                                     self.use_direction)
        ctx.accumulate(self._buffer(probe.layer), value)

    def score(self, ctx: ForwardContext) -> Tensor:
        return ctx.buffers[self._buffer(ctx.layer - 1)]


@dataclass
class AccumulatedTTV(TTV):
    """TTV summed over a range of layers (TransPrune's default: 0-based layers 6..11).

    A prune before layer ``L`` scores with the sum over the accumulated layers below ``L``; the
    running sums follow the tokens through earlier prunes.

    Example::

        criteria: {ttv: {type: accumulated_ttv, first_layer: 6, last_layer: 11}}
    """

    name: ClassVar[str] = "accumulated_ttv"
    first_layer: int = field(default=6, metadata={"layer": True, "tune": True})
    last_layer: int = field(default=11, metadata={"layer": True, "tune": True})

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.first_layer <= self.last_layer:
            raise ValueError(f"need 0 <= first_layer <= last_layer, got {self.first_layer}..{self.last_layer}")

    def layers_for(self, stage_layers: Sequence[int], num_layers: int) -> list[int]:
        last_needed = max(stage_layers) - 1
        return list(range(self.first_layer, min(self.last_layer, last_needed) + 1))

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        first_stage = min(stage_layers)
        if first_stage <= self.first_layer:
            raise ValueError(
                f"criterion {self.key or self.name!r} accumulates from layer {self.first_layer}, but the first "
                f"prune is before layer {first_stage}: nothing is accumulated by then"
            )
        for layer in self.layers_for(stage_layers, num_layers):
            for module in self.modules:
                yield ModuleIO(layer=layer, module=module)

    def observe(self, ctx: ForwardContext, probe: ModuleIO, inputs: Tensor, output: Tensor) -> None:
        value = transition_variation(inputs, output, ctx.layout.valid, self.direction, self.magnitude,
                                     self.use_direction)
        ctx.accumulate(f"{self.key}/sum", value)

    def score(self, ctx: ForwardContext) -> Tensor:
        return ctx.buffers[f"{self.key}/sum"]
