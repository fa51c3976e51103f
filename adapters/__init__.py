"""Built-in model adapters: one table row per model family (module paths and the visual token id).

A family whose decoder is a standard pre-norm stack (``layers[i].self_attn``, ``.mlp``,
``.input_layernorm``, a ``rotary_emb`` taking ``(hidden, position_ids)``) needs only a
:class:`FamilySpec` row; :class:`DecoderAdapter` does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from prunekit.api import Adapter
from prunekit.errors import AdapterError
from prunekit.hookspecs import hookimpl
from prunekit.layout import TokenLayout, layout_from_ids


@dataclass(frozen=True)
class FamilySpec:
    """Where one model family keeps its parts (dotted attribute paths)."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values of the top-level model
    classes: tuple[str, ...]  # transformers classes this row is for (documentation and doctor)
    language_model: str = "model.language_model"  # from the top-level model to the decoder stack
    layers: str = "layers"  # from the decoder stack
    attention: str = "self_attn"  # from a decoder layer
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    rotary: str = "rotary_emb"  # from the decoder stack
    visual_token_ids: tuple[str, ...] = ("image_token_id",)  # config attributes holding visual token ids
    projector: str | None = "model.multi_modal_projector"  # from the top-level model
    vision_layers: str | None = "model.vision_tower.encoder.layers"
    vision_attention: str = "self_attn"  # from a vision-encoder layer


def _get(obj: Any, dotted: str, what: str) -> Any:
    current = obj
    for part in dotted.split("."):
        if not hasattr(current, part):
            raise AdapterError(f"{type(obj).__name__} has no {dotted!r} ({what}): missing {part!r}")
        current = getattr(current, part)
    return current


class DecoderAdapter(Adapter):
    """Adapter for a family described by a :class:`FamilySpec`."""

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.name = spec.name

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.spec.model_types

    def language_model(self, model: nn.Module) -> nn.Module:
        return _get(model, self.spec.language_model, "decoder stack")

    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        return _get(self.language_model(model), self.spec.layers, "decoder layers")

    def attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.spec.attention, "attention module")

    def mlp(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.spec.mlp, "MLP module")

    def input_norm(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.spec.input_norm, "input norm")

    def projector(self, model: nn.Module) -> nn.Module:
        if self.spec.projector is None:
            return super().projector(model)
        return _get(model, self.spec.projector, "multimodal projector")

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        if self.spec.vision_layers is None:
            return super().vision_layers(model)
        return _get(model, self.spec.vision_layers, "vision encoder layers")

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        return _get(layer, self.spec.vision_attention, "vision attention module")

    def visual_token_ids(self, model: nn.Module) -> list[int]:
        ids = [getattr(model.config, key, None) for key in self.spec.visual_token_ids]
        ids = [int(i) for i in ids if i is not None]
        if not ids:
            raise AdapterError(f"{type(model).__name__} config has none of {self.spec.visual_token_ids}")
        return ids

    def describe_visual(self, model: nn.Module) -> str:
        return f"token id(s) {self.visual_token_ids(model)} ({', '.join(self.spec.visual_token_ids)})"

    def token_layout(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> TokenLayout:
        ids = torch.tensor(self.visual_token_ids(model), device=input_ids.device)
        visual = torch.isin(input_ids, ids)  # [batch, seq]
        return layout_from_ids(input_ids, visual, attention_mask)

    def layer_kind(self, model: nn.Module, layer_idx: int) -> str:
        layer_types = getattr(self.language_model(model).config, "layer_types", None)
        return layer_types[layer_idx] if layer_types else "full_attention"

    def stage_kwargs(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, positions: Tensor,
                     cache: Any, layer_idx: int) -> dict[str, Any]:
        decoder = self.language_model(model)
        rotary = _get(decoder, self.spec.rotary, "rotary embedding")
        text_positions = positions[0]  # [batch, seq]
        make_mask = (create_sliding_window_causal_mask
                     if self.layer_kind(model, layer_idx) == "sliding_attention" else create_causal_mask)
        mask = make_mask(
            config=decoder.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask_2d,
            past_key_values=cache,
            position_ids=text_positions,
            layer_idx=layer_idx,
        )
        return {
            "attention_mask": mask,
            "position_ids": text_positions,
            "position_embeddings": rotary(hidden, text_positions),
        }


LLAVA = DecoderAdapter(FamilySpec(
    name="llava",
    model_types=("llava",),
    classes=("LlavaForConditionalGeneration",),
))

BUILTIN_ADAPTERS: list[Adapter] = [LLAVA]


@hookimpl
def prunekit_add_adapters() -> list[Adapter]:
    return list(BUILTIN_ADAPTERS)
