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
from transformers.masking_utils import (
    _preprocess_mask_arguments,
    blockwise_overlay,
    create_causal_mask,
    create_sliding_window_causal_mask,
    maybe_pad_block_sequence_ids,
    sliding_window_overlay,
)

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
                     cache: Any, layer_idx: int, blocks: Tensor | None = None) -> dict[str, Any]:
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


class MRopeAdapter(DecoderAdapter):
    """Qwen2-VL / Qwen2.5-VL: multimodal RoPE with (temporal, height, width) positions per token.

    The decoder stack computes 3-D positions itself (``get_rope_index`` and ``rope_deltas``); the
    adapter reads them from the stack's pre-hook. ``compact`` keeps each image's grid offsets and
    closes the gap the pruned tokens leave: every token moves down by how much the largest
    position before it (or before its image) shrank.
    """

    def rope_positions(self, model: nn.Module, lm_kwargs: dict, hidden: Tensor, cache: Any) -> Tensor:
        positions = lm_kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3:
            return positions[-3:]  # [3, batch, seq]; a leading text row (4 rows) is dropped
        flat = super().rope_positions(model, lm_kwargs, hidden, cache)
        return flat.expand(3, -1, -1)

    def compact_positions(self, positions: Tensor, valid: Tensor, visual: Tensor) -> Tensor:
        out = positions.clone()
        for b in range(positions.shape[1]):  # sequential by nature; a few thousand integer steps at most
            old = positions[:, b].tolist()  # [3][seq]
            is_valid, is_visual = valid[b].tolist(), visual[b].tolist()
            old_max = new_max = None
            shift = 0
            in_run = False
            for j in range(len(is_valid)):
                if not is_valid[j]:
                    in_run = False
                    continue
                if not (is_visual[j] and in_run):  # a text token, or the first token of a visual run
                    shift = 0 if old_max is None else old_max - new_max
                in_run = is_visual[j]
                token_max = max(old[0][j], old[1][j], old[2][j])
                for c in range(3):
                    out[c, b, j] = old[c][j] - shift
                old_max = token_max if old_max is None else max(old_max, token_max)
                new_max = token_max - shift if new_max is None else max(new_max, token_max - shift)
        return out

    def stage_kwargs(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, positions: Tensor,
                     cache: Any, layer_idx: int, blocks: Tensor | None = None) -> dict[str, Any]:
        decoder = self.language_model(model)
        rotary = _get(decoder, self.spec.rotary, "rotary embedding")
        kwargs = super().stage_kwargs(model, hidden, attention_mask_2d, positions, cache, layer_idx)
        kwargs["position_embeddings"] = rotary(hidden, positions)  # 3-D positions
        kwargs["position_ids"] = None  # the stack passes text positions only for packed sequences
        return kwargs


class Gemma3Adapter(DecoderAdapter):
    """Gemma 3: during the prefill the tokens of one image attend to each other bidirectionally; local
    (sliding-window) and global layers have their own masks and their own rotary embeddings."""

    def stage_kwargs(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, positions: Tensor,
                     cache: Any, layer_idx: int, blocks: Tensor | None = None) -> dict[str, Any]:
        decoder = self.language_model(model)
        config = decoder.config
        kind = self.layer_kind(model, layer_idx)
        text_positions = positions[0]
        common = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask_2d, past_key_values=cache,
                      position_ids=text_positions, layer_idx=layer_idx)  # sized against this layer's own cache
        if blocks is None:  # decode: plain causal (sliding for local layers), as the model does
            maker = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
            mask = maker(**common)
        elif kind == "full_attention":  # prefill: OR(causal, bidirectional image blocks)
            mask = create_causal_mask(**common, block_sequence_ids=blocks)
        else:  # prefill, local layer: AND(sliding window, OR(causal, image blocks))
            early_exit, _, _, _, kv_length, _, kv_offset = _preprocess_mask_arguments(
                config, hidden, attention_mask_2d, cache, text_positions, layer_idx
            )
            padded = blocks if early_exit else maybe_pad_block_sequence_ids(blocks, attention_mask_2d, kv_length,
                                                                             kv_offset)
            mask = create_causal_mask(**common, or_mask_function=blockwise_overlay(padded),
                                      and_mask_function=sliding_window_overlay(config.sliding_window))
        return {
            "attention_mask": mask,
            "position_ids": text_positions,
            "position_embeddings": decoder.rotary_emb(hidden, text_positions, kind),
        }


LLAVA = DecoderAdapter(FamilySpec(
    name="llava",
    model_types=("llava",),
    classes=("LlavaForConditionalGeneration",),
))
LLAVA_NEXT = DecoderAdapter(FamilySpec(
    name="llava_next",
    model_types=("llava_next",),
    classes=("LlavaNextForConditionalGeneration",),
    projector=None, vision_layers=None,  # any-resolution tiles: no stage before the language model yet
))
VIDEO_LLAVA = DecoderAdapter(FamilySpec(
    name="video_llava",
    model_types=("video_llava",),
    classes=("VideoLlavaForConditionalGeneration",),
    visual_token_ids=("image_token_id", "video_token_id"),
    projector=None, vision_layers=None,
))
LLAVA_ONEVISION = DecoderAdapter(FamilySpec(
    name="llava_onevision",
    model_types=("llava_onevision",),
    classes=("LlavaOnevisionForConditionalGeneration",),
    visual_token_ids=("image_token_id", "video_token_id"),
    projector=None, vision_layers=None,
))
QWEN2_VL = MRopeAdapter(FamilySpec(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    classes=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
    visual_token_ids=("image_token_id", "video_token_id"),
    projector=None, vision_layers=None,
))

GEMMA3 = Gemma3Adapter(FamilySpec(
    name="gemma3",
    model_types=("gemma3",),
    classes=("Gemma3ForConditionalGeneration",),
    projector=None, vision_layers=None,
))

BUILTIN_ADAPTERS: list[Adapter] = [LLAVA, LLAVA_NEXT, VIDEO_LLAVA, LLAVA_ONEVISION, QWEN2_VL, GEMMA3]


@hookimpl
def prunekit_add_adapters() -> list[Adapter]:
    return list(BUILTIN_ADAPTERS)
