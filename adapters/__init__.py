"""Built-in model adapters: one table row per model family (module paths and the visual token id).

A family whose decoder is a standard pre-norm stack (``layers[i].self_attn``, ``.mlp``,
``.input_layernorm``, a ``rotary_emb`` taking ``(hidden, position_ids)``) needs only a
:class:`FamilySpec` row; :class:`DecoderAdapter` does the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import inspect
import itertools
import math
import sys
import threading

import torch
from torch import Tensor, nn
from transformers.masking_utils import (
    _preprocess_mask_arguments,
    blockwise_overlay,
    create_causal_mask,
    create_chunked_causal_mask,
    create_sliding_window_causal_mask,
    maybe_pad_block_sequence_ids,
    sliding_window_overlay,
)

from prunekit.api import Adapter
from prunekit.compat import MASK_CACHE_KWARG
from prunekit.errors import AdapterError
from prunekit.hookspecs import hookimpl
from prunekit.layout import (TokenLayout, frames_from_frame_runs, frames_from_grids, frames_from_mrope,
                             frames_from_runs, layout_from_ids)


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
    video_vision_layers: str | None = None  # a second tower for video frames (Video-LLaVA), same projector


@dataclass(frozen=True)
class FrameShape:
    """How a family lays out one video span's tokens: whole frames of ``per_frame`` tokens, the first
    ``lead`` of each frame outside the grid, the rest a row-major grid ``rows x cols``, then ``tail``
    tokens in no frame."""

    per_frame: int
    rows: int
    cols: int
    lead: int = 0
    tail: int = 0

    def describe(self) -> str:
        lead = f"{self.lead} + " if self.lead else ""
        tail = f", then {self.tail} token(s) in no frame per video" if self.tail else ""
        return f"frames of {lead}{self.rows}x{self.cols} tokens{tail}"


def video_frame_shape(model: nn.Module) -> FrameShape | None:
    """The frame shape of a family whose video spans hold fixed-size frames, read from its config (None for
    families without such videos, and for Qwen2-VL / Qwen2.5-VL, whose grids come from M-RoPE positions).

    - Video-LLaVA: each frame is its CLIP features with the CLS token first (the video path keeps it):
      ``1 + side x side`` tokens, ``side = image_size // patch_size``.
    - LLaVA-OneVision: each frame's grid is bilinearly pooled to ``ceil(side / 2)`` per side; one
      ``image_newline`` token closes the video.
    - LLaVA-NeXT-Video: the resampler pools each frame's grid with ``spatial_pool_stride`` (floor).
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    vision = getattr(config, "vision_config", None)
    if kind not in ("video_llava", "llava_onevision", "llava_next_video") or vision is None:
        return None
    side = vision.image_size // vision.patch_size
    if kind == "video_llava":
        return FrameShape(per_frame=1 + side * side, rows=side, cols=side, lead=1)
    if kind == "llava_onevision":
        pooled = math.ceil(side / 2)
        return FrameShape(per_frame=pooled * pooled, rows=pooled, cols=pooled, tail=1)
    pooled = side // config.spatial_pool_stride
    return FrameShape(per_frame=pooled * pooled, rows=pooled, cols=pooled)


def _video_mask(model: nn.Module, input_ids: Tensor) -> Tensor | None:
    """``[batch, seq]`` bool: the prompt's video tokens (None when the config names no video token id)."""
    config = getattr(model, "config", None)
    video_id = getattr(config, "video_token_id", None)
    if video_id is None:
        video_id = getattr(config, "video_token_index", None)
    return None if video_id is None else input_ids == int(video_id)


def _rotary_per_layer_type(rotary: nn.Module) -> bool:
    """Whether a rotary embedding is called with the layer's type (``rotary_emb(x, positions, layer_type)``)."""
    return "layer_type" in inspect.signature(rotary.forward).parameters


def _get(obj: Any, dotted: str, what: str) -> Any:
    current = obj
    for part in dotted.split("."):
        if not hasattr(current, part):
            raise AdapterError(f"{type(obj).__name__} has no {dotted!r} ({what}): missing {part!r}")
        current = getattr(current, part)
    return current


class DecoderAdapter(Adapter):
    """Adapter for a family described by a :class:`FamilySpec`."""

    fed_layer_kinds: tuple[str, ...] = ("full_attention", "sliding_attention", "chunked_attention")  # kinds
    # stage_kwargs builds masks for (prunekit doctor reads it; any other kind raises AdapterError)

    def __init__(self, spec: FamilySpec) -> None:
        self.spec = spec
        self.name = spec.name

    def matches(self, model: nn.Module) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in self.spec.model_types

    def summary(self) -> str:
        return f"{', '.join(self.spec.classes)} (config.model_type {', '.join(self.spec.model_types)})"

    def explain(self, model: nn.Module) -> str | None:
        """Why the model does not fit (None when it does)."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in self.spec.model_types:
            return f"config.model_type {model_type!r} is not one of {list(self.spec.model_types)}"
        return None

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

    def vision_has_cls(self, model: nn.Module) -> bool | None:
        if self.spec.vision_layers is None or ".encoder" not in self.spec.vision_layers:
            return None
        tower = _get(model, self.spec.vision_layers.rsplit(".encoder", 1)[0], "vision tower")
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        return None if embeddings is None else hasattr(embeddings, "class_embedding")

    def vision_towers(self, model: nn.Module) -> list[Sequence[nn.Module]]:
        towers = [self.vision_layers(model)]
        if self.spec.video_vision_layers is not None:
            towers.append(_get(model, self.spec.video_vision_layers, "video encoder layers"))
        return towers

    def projected_video_frames(self, model: nn.Module, input_ids: Tensor) -> tuple[Tensor, int] | None:
        shape = video_frame_shape(model)
        video = _video_mask(model, input_ids)
        if self.spec.video_vision_layers is None or shape is None or video is None:
            return None
        return video, shape.per_frame  # each frame reaches the projector whole (Video-LLaVA: CLS + patches)

    def visual_token_ids(self, model: nn.Module) -> list[int]:
        ids = [getattr(model.config, key, None) for key in self.spec.visual_token_ids]
        ids = list(dict.fromkeys(int(i) for i in ids if i is not None))  # aliases (image_token_index) once
        if not ids:
            raise AdapterError(f"{type(model).__name__} config has none of {self.spec.visual_token_ids}")
        return ids

    def describe_visual(self, model: nn.Module) -> str:
        return f"token id(s) {self.visual_token_ids(model)} ({', '.join(self.spec.visual_token_ids)})"

    def token_layout(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> TokenLayout:
        ids = torch.tensor(self.visual_token_ids(model), device=input_ids.device)
        visual = torch.isin(input_ids, ids)  # [batch, seq]
        layout = layout_from_ids(input_ids, visual, attention_mask)
        shape = video_frame_shape(model)
        video = _video_mask(model, input_ids)
        if shape is not None and video is not None and bool(video.any()):
            frames_from_runs(layout, video, shape.per_frame, shape.cols, shape.lead, shape.tail)
        return layout

    def describe_frames(self, model: nn.Module) -> str | None:
        """How this family's video spans divide into frames (``prunekit doctor``); None without videos."""
        shape = video_frame_shape(model)
        return None if shape is None else shape.describe()

    def layer_kind(self, model: nn.Module, layer_idx: int) -> str:
        layer_types = getattr(self.language_model(model).config, "layer_types", None)
        return layer_types[layer_idx] if layer_types else "full_attention"

    def stage_kwargs(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, positions: Tensor,
                     cache: Any, layer_idx: int, blocks: Tensor | None = None) -> dict[str, Any]:
        decoder = self.language_model(model)
        rotary = _get(decoder, self.spec.rotary, "rotary embedding")
        text_positions = positions[0]  # [batch, seq]
        # one rotary per layer type (Gemma 3's local and global layers, Step3p7): the layer's own
        per_type = (self.layer_kind(model, layer_idx),) if _rotary_per_layer_type(rotary) else ()
        return {
            "attention_mask": self.stage_mask(model, hidden, attention_mask_2d, text_positions, cache, layer_idx,
                                              blocks),
            "position_ids": text_positions,
            "position_embeddings": rotary(hidden, text_positions, *per_type),
        }

    def stage_mask(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, text_positions: Tensor,
                   cache: Any, layer_idx: int, blocks: Tensor | None = None) -> Any:
        """The attention mask transformers builds for layer ``layer_idx``'s kind over the current sequence;
        with ``blocks`` (``[batch, kv_len]``, the layout's ``attention_block``) holding a block (>= 0), the
        tokens of each block also attend to each other both ways (transformers' ``block_sequence_ids``:
        OR-ed with the causal, or sliding-window causal, mask)."""
        kind = self.layer_kind(model, layer_idx)
        make_mask = mask_maker(kind, layer_idx, type(model).__name__)
        common = dict(config=self.language_model(model).config, inputs_embeds=hidden, attention_mask=attention_mask_2d,
                      **{MASK_CACHE_KWARG: cache}, position_ids=text_positions, layer_idx=layer_idx)
        if blocks is None or not bool((blocks >= 0).any()):
            return make_mask(**common)
        if kind not in ("full_attention", "sliding_attention"):
            raise AdapterError(f"{type(model).__name__} layer {layer_idx}: bidirectional blocks on a {kind!r} layer "
                               "are not built (full and sliding attention only)")
        return make_mask(**common, block_sequence_ids=blocks)


_MASK_MAKERS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask,
                "chunked_attention": create_chunked_causal_mask}


def mask_maker(kind: str, layer_idx: int, model_name: str) -> Any:
    """The transformers mask function for a layer kind; an ``AdapterError`` for kinds prunekit cannot feed
    (linear-attention / recurrent layers keep a state that a pruned token would still have entered)."""
    maker = _MASK_MAKERS.get(kind)
    if maker is None:
        raise AdapterError(
            f"{model_name} decoder layer {layer_idx} is a {kind!r} layer; prunekit feeds a shorter sequence to "
            f"attention layers only ({', '.join(_MASK_MAKERS)}), and every layer from the first prune on "
            f"gets one: this model needs an adapter that knows {kind!r} layers"
        )
    return maker


def compact_mrope(positions: Tensor, valid: Tensor, visual: Tensor) -> Tensor:
    """M-RoPE re-indexing after a prune: ``[3, batch, seq]`` -> the same shape.

    Each run of visual tokens keeps its grid offsets from its base (the position after the token before
    it); the text after it moves down by how much the run's extent shrank: it continues right after the
    run's largest kept position, never further than the model put it unpruned (transformers >= 5.20 puts
    the text after a video at the base + the spatial grid side, below the video's temporal positions).
    Every later token moves down as much. Padding (``valid`` False) keeps its positions; an unpruned
    prompt comes out unchanged.
    """
    out = positions.clone()
    for b in range(positions.shape[1]):  # sequential by nature: plain integers, a few thousand steps at most
        old = positions[:, b].tolist()  # [3][seq]
        is_valid, is_visual = valid[b].tolist(), visual[b].tolist()
        shift = 0  # how far every token from here on moves down
        base = top = None  # the current visual run's base and largest position (originals), None in text
        previous = None  # the last real token's position (original, a text token's)
        for j, real in enumerate(is_valid):
            if not real:
                continue
            here = (old[0][j], old[1][j], old[2][j])
            if is_visual[j]:
                if base is None:  # a run starts right after the token before it
                    base = previous + 1 if previous is not None else min(here)
                    top = base - 1
                top = max(top, *here)
            else:
                if base is not None:  # the first text token after a run: the run's extent shrank
                    extent = here[0] - base
                    shift += extent - min(extent, top - base + 1)
                    base = None
                previous = here[0]
            for c in range(3):
                out[c, b, j] = here[c] - shift
    return out


def _mrope_frames(model: nn.Module) -> bool:
    """Whether the model's videos are whole grids in one run of video tokens, frame-major (Qwen2-VL and
    Qwen2.5-VL; Qwen3-VL puts each frame in a run of its own, between timestamps: ``DeepstackAdapter``)."""
    return getattr(getattr(model, "config", None), "model_type", None) in ("qwen2_vl", "qwen2_5_vl")


class TiledAdapter(DecoderAdapter):
    """LLaVA-NeXT / LLaVA-OneVision: each image reaches the language model as its base tile, then its
    high-resolution tiles packed into one unpadded grid with an image-newline token after each row."""

    def read_call(self, model: nn.Module, layout: TokenLayout, call: Any) -> TokenLayout:
        """Keep what the call says of its images' tiles for :meth:`vision_units`: ``image_sizes`` (a plain
        forward), or the tower's tile count of pre-encoded images (``generate`` passes ``mm_encoder_outputs``)."""
        layout = super().read_call(model, layout, call)
        sizes = call.get("image_sizes")
        encoded = (call.get("mm_encoder_outputs") or {}).get("image")
        tower = getattr(encoded, "last_hidden_state", None)
        pairs = None if sizes is None else torch.as_tensor(sizes).tolist()
        _TILES.sizes = None if pairs is None else [tuple(int(v) for v in pair) for pair in pairs]
        _TILES.total = None if not isinstance(tower, Tensor) else int(tower.shape[0])
        return layout

    def vision_units(self, model: nn.Module, hidden: Tensor, layout: TokenLayout) -> Tensor:
        """Each tile of each image apart: ``64 k`` for the ``k``-th image's base tile (of a run of image tokens),
        ``64 k + t`` for its high-resolution tile ``t`` (row-major, from 1), or ``64 k + 63`` for its whole grid
        where the tiles cannot be told apart; image-newline tokens (the rows of ``hidden`` equal to the model's
        ``image_newline``) -2, kept by a vision block.

        Images placed side by side (``<image><image>``) share one run of image tokens: an image's first run
        between newlines is its base tile plus one grid row (``base + w``), each further row ``w`` tokens, so a
        run of another length starts the next image. Each tile's place in the unpadded grid follows from the
        image's tile grid: from ``image_sizes`` as transformers picks it, or, when ``generate`` hands the model
        pre-encoded images without their sizes, from the grid's shape (the pinpoint whose tiles the unpadded grid
        fills along one side), checked against the tower's tile count; when that is ambiguous the grid is one
        unit."""
        units = torch.full_like(layout.image_index, -1)  # [batch, seq]
        newline = getattr(getattr(model, "model", None), "image_newline", None)
        if newline is None:
            return units
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        is_newline = layout.visual & (hidden == newline.to(hidden.dtype)).all(dim=-1)  # [batch, seq]
        images: list[tuple[int, list[int], list[list[int]]]] = []  # (sample, base columns, grid rows of columns)
        for b in range(layout.batch_size):
            for span in layout.image_index[b][layout.visual[b]].unique().tolist():
                here = layout.visual[b] & (layout.image_index[b] == span)
                newlines = here & is_newline[b]
                if not bool(newlines.any()):
                    continue  # no newline: one unit (a family without tiles)
                units[b] = torch.where(newlines, torch.full_like(units[b], -2), units[b])
                if bool((layout.frame_index[b][here] >= 0).any()):
                    continue  # a video (OneVision's closes with a newline): its frames are the units
                parsed = _packed_images(here.nonzero().flatten().tolist(),
                                        set(newlines.nonzero().flatten().tolist()), side * side)
                images += [(b, base, rows) for base, rows in (parsed or [])]
        grids = _tile_grids(model, [(len(rows), len(rows[0]) if rows else 0) for _, _, rows in images], side)
        numbering: dict[int, int] = {}  # sample -> images numbered so far (units of one run stay apart)
        for (b, base, rows), grid in zip(images, grids):
            k = numbering.get(b, 0)
            numbering[b] = k + 1
            columns = base + [column for row in rows for column in row]
            parts = [0] * len(base) + [63 if grid is None else _tile_of(r, c, grid, side)
                                       for r, row in enumerate(rows) for c in range(len(row))]
            units[b, columns] = 64 * k + torch.tensor(parts, device=units.device)  # one write per image
        return units


_TILES = threading.local()  # the running forward's image sizes / tower tile count (TiledAdapter.read_call)


def _packed_images(columns: list[int], newlines: set[int], base: int) -> list[tuple[list[int], list[list[int]]]] | None:
    """The images of one run of image tokens (``columns`` in order, ``newlines`` among them): per image its base
    tile's columns and its grid rows' columns; None when the run does not parse as whole packed images."""
    runs, current = [], []
    for column in columns:
        if column in newlines:
            runs.append(current)
            current = []
        else:
            current.append(column)
    if current:  # tokens after the last newline: not a packed image
        return None
    images: list[tuple[list[int], list[list[int]]]] = []
    width = None
    for run in runs:
        if width is None or len(run) != width:  # a new image: its base tile, then its first grid row
            if len(run) < base:
                return None
            width = len(run) - base
            images.append((run[:base], [run[base:]] if width else []))
        else:
            images[-1][1].append(run)
    return images


def _tile_grids(model: nn.Module, shapes: list[tuple[int, int]], side: int) -> list[tuple[int, int, int, int] | None]:
    """Per image of a call with grid ``shapes`` (rows, width in tokens; (0, 0) for a lone base tile), its tile grid
    and the unpadded grid's offset in it, ``(tiles_high, tiles_wide, row_offset, column_offset)``, or None."""
    config = model.config
    sizes, total = getattr(_TILES, "sizes", None), getattr(_TILES, "total", None)

    def fits(shape: tuple[int, int], tiles: tuple[int, int]) -> tuple[int, int, int, int] | None:
        (height, width), (high, wide) = shape, tiles
        full_h, full_w = high * side, wide * side
        if not (height <= full_h and width <= full_w and (height == full_h or width == full_w)):
            return None
        return high, wide, (full_h - height) // 2, (full_w - width) // 2

    if sizes is not None and len(sizes) == len(shapes):
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        grids = []
        for size, shape in zip(sizes, shapes):
            high, wide = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
            grids.append(fits(shape, (high, wide)) if shape[0] else None)
        return grids
    tile = config.vision_config.image_size
    pinpoints = sorted({(h // tile, w // tile) for h, w in config.image_grid_pinpoints})
    options = [[fit for fit in (fits(shape, p) for p in pinpoints) if fit] if shape[0] else [None] for shape in shapes]
    combos = [combo for combo in itertools.product(*options)
              if total is None or sum(1 + (g[0] * g[1] if g else 0) for g in combo) == total]
    return list(combos[0]) if len(combos) == 1 else [None] * len(shapes)


def _tile_of(row: int, column: int, grid: tuple[int, int, int, int], side: int) -> int:
    """The high-resolution tile (from 1, row-major) of the unpadded grid's token at ``row``, ``column``."""
    high, wide, row_offset, column_offset = grid
    return (row + row_offset) // side * wide + (column + column_offset) // side + 1


def _window_index(visual: nn.Module, grid_thw: Tensor) -> Tensor | None:
    """Qwen2.5-VL's window order of a call's merged tokens (``[tokens]`` long: the tower runs on them in this
    order), from the model's own ``get_vision_window_index``; None for a tower without windows (Qwen2-VL)."""
    if getattr(visual, "window_size", None) is None:
        return None
    module = sys.modules[type(visual).__module__]
    window_index = getattr(module, "get_vision_window_index", None)
    if window_index is None:  # older releases: a method of the tower
        return visual.get_window_index(grid_thw)[0]
    return window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                        patch_size=visual.patch_size)[0]


class MergedPatchTower:
    """Qwen2-VL / Qwen2.5-VL's vision tower, read for a vision block at the language model's input.

    The tower's blocks run on every patch of a call at once (Qwen2.5-VL in window order), attention split per
    image (full-attention blocks) or per window; the patch merger then makes one token of each 2x2 patches. A
    per-patch value maps onto the language model's tokens the same way: the mean over each token's patches, the
    window order undone, one tensor per image (as LightCompress's VisionZip for Qwen2.5-VL reads the tower).
    """

    def __init__(self, model: nn.Module) -> None:
        self.visual = model.model.visual
        self.layers = list(self.visual.blocks)
        self.unit = int(self.visual.spatial_merge_size) ** 2  # patches per merged token

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def to_tokens(self, per_patch: Tensor, grid_thw: Tensor) -> list[Tensor]:
        """``[patches, ...]`` in the tower's order -> per image (grid) ``[tokens, ...]`` in the prompt's order."""
        merged = per_patch.reshape(-1, self.unit, *per_patch.shape[1:]).mean(dim=1)  # [tokens, ...] tower order
        window = _window_index(self.visual, grid_thw)
        if window is not None:
            merged = merged[torch.argsort(window.to(merged.device))]
        return list(merged.split((grid_thw.prod(dim=-1) // self.unit).tolist()))


class MRopeAdapter(DecoderAdapter):
    """Qwen2-VL / Qwen2.5-VL: multimodal RoPE with (temporal, height, width) positions per token.

    The decoder stack computes 3-D positions itself (``get_rope_index`` and ``rope_deltas``); the
    adapter reads them from the stack's pre-hook. ``compact`` keeps each image's grid offsets and
    closes the gap the pruned tokens leave: every token moves down by how much the largest
    position before it (or before its image) shrank.
    """

    def read_call(self, model: nn.Module, layout: TokenLayout, call: Any) -> TokenLayout:
        """Frames of the videos: from ``video_grid_thw`` (a plain forward), else from the 3-D ``position_ids``
        (generate passes the positions it computed, and encoded videos instead of their grids)."""
        input_ids = call.get("input_ids")
        if input_ids is None or not self.videos_have_frames(model):
            return layout
        video = _video_mask(model, input_ids[:, -layout.seq_len:])
        if video is None or not bool((video & layout.valid).any()):
            return layout
        grids, positions = call.get("video_grid_thw"), call.get("position_ids")
        if grids is not None:
            merge = int(getattr(model.config.vision_config, "spatial_merge_size", 1))
            shapes = [(t, h // merge, w // merge) for t, h, w in grids.tolist()]  # temporal patches x merged grid
            return self.fill_frames(layout, video, grids=shapes)
        if positions is not None and positions.dim() == 3 and positions.shape[0] >= 3:
            return self.fill_frames(layout, video, positions=positions[-3:, :, -layout.seq_len:])
        return layout

    def videos_have_frames(self, model: nn.Module) -> bool:
        """Whether this model's video tokens are laid out in frames :meth:`fill_frames` knows."""
        return _mrope_frames(model)

    def fill_frames(self, layout: TokenLayout, video: Tensor, grids: list[tuple[int, int, int]] | None = None,
                    positions: Tensor | None = None) -> TokenLayout:
        """The frame fields of ``layout`` from each video's merged ``(frames, rows, cols)`` grid, or else from the
        3-D ``positions`` (``[3, batch, seq]``): one run of video tokens per video, frame-major."""
        return frames_from_grids(layout, video, grids) if grids is not None else frames_from_mrope(layout, video,
                                                                                                   positions)

    def rope_positions(self, model: nn.Module, lm_kwargs: dict, hidden: Tensor, cache: Any) -> Tensor:
        positions = lm_kwargs.get("position_ids")
        if positions is not None and positions.dim() == 3:
            positions = positions[-3:]  # [3, batch, seq]; a leading text row (4 rows) is dropped
            if positions.shape[0] == 1:  # text positions for all three (transformers < 5.20, a later turn)
                positions = positions.expand(3, -1, -1)
        else:
            positions = super().rope_positions(model, lm_kwargs, hidden, cache).expand(3, -1, -1)
        return positions

    def describe_frames(self, model: nn.Module) -> str | None:
        if not _mrope_frames(model):
            return None
        return ("temporal patches x (height / merge) x (width / merge) tokens per video, frame-major, read from "
                "the call's video_grid_thw (or, under generate, its M-RoPE position_ids)")

    def compact_positions(self, positions: Tensor, valid: Tensor, visual: Tensor) -> Tensor:
        return compact_mrope(positions, valid, visual)

    def input_tower(self, model: nn.Module) -> MergedPatchTower | None:
        return MergedPatchTower(model) if _mrope_frames(model) else None

    def stage_kwargs(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, positions: Tensor,
                     cache: Any, layer_idx: int, blocks: Tensor | None = None) -> dict[str, Any]:
        rotary = _get(self.language_model(model), self.spec.rotary, "rotary embedding")
        return {
            "attention_mask": self.stage_mask(model, hidden, attention_mask_2d, positions[0], cache, layer_idx),
            "position_ids": None,  # the stack passes text positions only for packed sequences
            "position_embeddings": rotary(hidden, positions),  # 3-D positions: one rotary, not a text one too
        }


def _running_layout(model: nn.Module) -> TokenLayout | None:
    """The token layout of the pruned prefill now running on ``model`` (:func:`prunekit.engine.current_layout`)."""
    from prunekit.engine import current_layout  # the engine imports the adapter registry: import on use

    return current_layout(model)


class _KeptDeepstack:
    """One prefill's deepstack inputs (``visual_pos_masks`` and ``deepstack_visual_embeds``) as views that
    follow the kept tokens: after a prune the decoder stack adds each kept visual token's own features.

    The decoder stack reads them as ``visual_pos_masks.to(device)`` and ``deepstack_visual_embeds[i]``
    after its layer ``i``; before the first prune both are the model's own tensors, unchanged.
    """

    def __init__(self, model: nn.Module, mask: Tensor, embeds: Sequence[Tensor]) -> None:
        self.model = model
        self.mask = mask.to(torch.bool)  # [batch, seq] over the prefill
        # [batch, seq]: row of each visual token in every deepstack feature tensor (row-major, as the model fills them)
        self.rank = self.mask.reshape(-1).long().cumsum(0).reshape(self.mask.shape) - 1
        self.features = list(embeds)  # each [n_visual, hidden]
        self._slots: tuple[Tensor, Tensor, Tensor] | None = None  # (original_index, mask, rows) of the last layout

    def current(self) -> tuple[Tensor, Tensor | None]:
        """The visual mask of the current sequence ``[batch, seq_now]`` and the feature rows it selects
        (``[n_kept_visual]`` long; None before the first prune)."""
        layout = _running_layout(self.model)
        if layout is None:
            return self.mask, None
        index = layout.original_index  # [batch, seq_now]; -1 on fill and merged slots
        if self._slots is None or self._slots[0] is not index:
            safe = index.clamp(min=0).to(self.mask.device)
            mask = self.mask.gather(1, safe) & (index >= 0).to(self.mask.device)  # [batch, seq_now]
            self._slots = (index, mask, self.rank.gather(1, safe)[mask])
        return self._slots[1], self._slots[2]

    def mask_view(self) -> _DeepstackMask:
        return _DeepstackMask(self)

    def embeds_view(self) -> _DeepstackEmbeds:
        return _DeepstackEmbeds(self)


class _DeepstackMask:
    """``visual_pos_masks`` for the current sequence (the decoder stack calls ``.to(device)`` on it)."""

    def __init__(self, owner: _KeptDeepstack) -> None:
        self._owner = owner

    def to(self, *args: Any, **kwargs: Any) -> Tensor:
        return self._owner.current()[0].to(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        raise AdapterError(f"the deepstack mask view supports .to() only; the decoder stack asked for {name!r} "
                           "(this transformers version applies deepstack features differently: adapter 'qwen3_vl' "
                           "needs an update)")


class _DeepstackEmbeds(Sequence):
    """``deepstack_visual_embeds``: item ``i`` holds the features of the current sequence's visual tokens."""

    def __init__(self, owner: _KeptDeepstack) -> None:
        self._owner = owner

    def __len__(self) -> int:
        return len(self._owner.features)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        features = self._owner.features[i]  # [n_visual, hidden]
        rows = self._owner.current()[1]
        return features if rows is None else features.index_select(0, rows.to(features.device))


class DeepstackAdapter(MRopeAdapter):
    """Qwen3-VL / Qwen3-VL-MoE: M-RoPE, and deepstack: the decoder stack adds features from several
    vision layers to the visual tokens after its first layers (``visual_pos_masks``,
    ``deepstack_visual_embeds``). Under pruning they follow the kept tokens: after a prune each kept
    visual token gets its own features, dropped ones none, merged summary tokens none (images and
    videos alike; decode steps carry no deepstack inputs).
    """

    def videos_have_frames(self, model: nn.Module) -> bool:
        return True

    def fill_frames(self, layout: TokenLayout, video: Tensor, grids: list[tuple[int, int, int]] | None = None,
                    positions: Tensor | None = None) -> TokenLayout:
        """Each frame is a run of its own between timestamps: the grids group the runs into videos (from the
        positions, under generate, the runs a sample holds with text only between form one clip)."""
        return frames_from_frame_runs(layout, video, grids, positions)

    def describe_frames(self, model: nn.Module) -> str | None:
        return ("one run of (height / merge) x (width / merge) tokens per frame, between timestamps; the call's "
                "video_grid_thw groups the runs into videos (under generate: the runs with text only between)")

    def rope_positions(self, model: nn.Module, lm_kwargs: dict, hidden: Tensor, cache: Any) -> Tensor:
        embeds, mask = lm_kwargs.get("deepstack_visual_embeds"), lm_kwargs.get("visual_pos_masks")
        if embeds is not None and mask is not None:  # a prefill with images or videos: the stack's own kwargs
            kept = _KeptDeepstack(model, mask, embeds)
            lm_kwargs["visual_pos_masks"] = kept.mask_view()
            lm_kwargs["deepstack_visual_embeds"] = kept.embeds_view()
        return super().rope_positions(model, lm_kwargs, hidden, cache)


class Gemma3Adapter(DecoderAdapter):
    """Gemma 3: during the prefill the tokens of one image attend to each other bidirectionally; local
    (sliding-window) and global layers have their own masks and their own rotary embeddings."""

    fed_layer_kinds = ("full_attention", "sliding_attention")

    def token_layout(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> TokenLayout:
        layout = super().token_layout(model, input_ids, attention_mask)
        layout.attention_block = layout.image_index.clone()  # each image is a bidirectional block
        return layout

    def stage_mask(self, model: nn.Module, hidden: Tensor, attention_mask_2d: Tensor, text_positions: Tensor,
                   cache: Any, layer_idx: int, blocks: Tensor | None = None) -> Any:
        """Gemma 3's prefill masks: a local layer keeps its window over the image blocks too (AND(sliding
        window, OR(causal, image blocks))); decode steps and global layers as transformers builds them."""
        if blocks is None or self.layer_kind(model, layer_idx) != "sliding_attention":
            return super().stage_mask(model, hidden, attention_mask_2d, text_positions, cache, layer_idx, blocks)
        config = self.language_model(model).config
        early_exit, _, _, _, kv_length, _, kv_offset = _preprocess_mask_arguments(
            config, hidden, attention_mask_2d, cache, text_positions, layer_idx
        )
        padded = blocks if early_exit else maybe_pad_block_sequence_ids(blocks, attention_mask_2d, kv_length, kv_offset)
        return create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask_2d,
                                  **{MASK_CACHE_KWARG: cache}, position_ids=text_positions, layer_idx=layer_idx,
                                  or_mask_function=blockwise_overlay(padded),
                                  and_mask_function=sliding_window_overlay(config.sliding_window))


class PrefixLMAdapter(DecoderAdapter):
    """PaliGemma (prefix-LM): in the prefill, the tokens the call's ``token_type_ids`` mark as prefix (0: the
    image and the prompt) attend to each other both ways, the suffix (1) causally; without
    ``token_type_ids`` the model, and prunekit, attend causally. Decode steps are causal."""

    def read_call(self, model: nn.Module, layout: TokenLayout, call: Any) -> TokenLayout:
        token_types = call.get("token_type_ids")
        if token_types is None:
            return layout
        token_types = token_types[:, -layout.seq_len:]  # a later turn: its own tokens
        if token_types.shape != layout.valid.shape:
            raise AdapterError(f"token_type_ids of shape {tuple(token_types.shape)} do not cover the prompt "
                               f"{tuple(layout.valid.shape)}; pass the processor's token_type_ids")
        layout.attention_block = torch.where(token_types == 0, 0, -1)  # padding too, as the model: no empty rows
        return layout


class Gemma3nAdapter(DecoderAdapter):
    """Gemma 3n: AltUp, per-layer inputs and KV-shared layers.

    - A decoder layer takes its hidden states as AltUp streams ``[streams, batch, seq, dim]``: the engine
      reads them as ``[batch, seq, streams * dim]`` (each token's streams side by side), so a prune gathers
      every stream of the kept tokens, and the scoring pass norms the layer's active prediction.
    - The stack hands each layer its per-layer input (``[batch, seq, per_layer_dim]``) and rotary embeddings
      positionally, over the whole prompt: after a prune the layer gets the kept tokens' per-layer inputs,
      and the stage's position embeddings.
    - The last ``num_kv_shared_layers`` layers reuse the keys and values of the last earlier layer of their
      type: a prune after such a source layer would hand the sharing layers another sequence, so it is refused.
    """

    def layer_input(self, args: tuple, kwargs: dict) -> Tensor:
        hidden = super().layer_input(args, kwargs)
        if hidden.dim() == 4:  # AltUp streams [streams, batch, seq, dim] -> [batch, seq, streams * dim]
            streams, batch, seq, dim = hidden.shape
            return hidden.permute(1, 2, 0, 3).reshape(batch, seq, streams * dim)
        return hidden  # a submodule's input (attention, MLP): [batch, seq, dim]

    def probe_input(self, args: tuple, kwargs: dict) -> Tensor:
        streams = super().layer_input(args, kwargs)  # [streams, batch, seq, dim]
        return streams[self._active] if streams.dim() == 4 else streams  # the active stream: [batch, seq, dim]

    _active = 0  # AltUp's active stream (Gemma 3n's configs: altup_active_idx 0)

    def layer_keywords(self, args: tuple, kwargs: dict) -> dict:
        named = dict(kwargs)
        named.update(zip(("position_embeddings", "per_layer_input"), args[1:3]))  # the stack's positional ones
        return named

    def write_layer_input(self, model: nn.Module, args: tuple, kwargs: dict, hidden: Tensor | None,
                          layer_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        streams = super().layer_input(args, kwargs)  # [streams, batch, seq, dim] the layer was called with
        named = {k: v for k, v in self.layer_keywords(args, kwargs).items() if k != "hidden_states"}
        if len(args) >= 3:  # the stack's slice over the whole prompt (a later hook of this call gets a gathered one)
            _GEMMA3N_LOCAL.full = args[2]
        named.update(layer_kwargs)
        layout = _running_layout(model)
        full = getattr(_GEMMA3N_LOCAL, "full", None)
        if layout is not None and full is not None and full.shape[:2] != layout.original_index.shape:
            index = layout.original_index.to(full.device)  # [batch, seq_now]; -1 on fill and merged slots
            gathered = full.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, full.shape[-1]))
            named["per_layer_input"] = gathered.masked_fill((index < 0)[..., None], 0)
        if hidden is not None:  # [batch, seq_now, streams * dim] -> [streams, batch, seq_now, dim]
            batch, seq, _ = hidden.shape
            streams = hidden.reshape(batch, seq, streams.shape[0], -1).permute(2, 0, 1, 3)
        return (streams,), named

    def input_norm(self, layer: nn.Module) -> Any:
        norm, altup, config = layer.input_layernorm, layer.altup, layer.config

        def active_prediction_normed(hidden: Tensor) -> Tensor:  # [batch, seq, streams * dim] -> [batch, seq, dim]
            batch, seq, _ = hidden.shape
            streams = hidden.reshape(batch, seq, config.altup_num_inputs, -1).permute(2, 0, 1, 3)
            return norm(altup.predict(streams)[config.altup_active_idx])

        return active_prediction_normed

    def check_prune_layers(self, model: nn.Module, layers: Sequence[int]) -> None:
        config = self.language_model(model).config
        shared = int(getattr(config, "num_kv_shared_layers", 0) or 0)
        if not shared or not layers:
            return
        kinds = list(config.layer_types)
        first_shared = len(kinds) - shared
        sources = sorted({max(i for i in range(first_shared) if kinds[i] == kinds[j])
                          for j in range(first_shared, len(kinds))})
        late = [layer for layer in layers if layer > sources[0]]
        if late:
            raise AdapterError(
                f"{type(model).__name__}: its last {shared} decoder layers ({first_shared}..{len(kinds) - 1}) reuse "
                f"the keys and values of layers {sources}; a prune before layer {late[0]} would hand them another "
                f"sequence than the one those layers cached. Prune before layers 0..{sources[0]} (a recipe's "
                "reference_depth or overrides move its stages)")


_GEMMA3N_LOCAL = threading.local()  # the per-layer input of the layer call the pruner's hooks are writing


LLAVA = DecoderAdapter(FamilySpec(
    name="llava",
    model_types=("llava",),
    classes=("LlavaForConditionalGeneration",),
))
LLAVA_NEXT = TiledAdapter(FamilySpec(
    name="llava_next",
    model_types=("llava_next",),
    classes=("LlavaNextForConditionalGeneration",),
    projector=None, vision_layers=None,  # tiles packed after the projector: vision blocks at the LM's input
))
VIDEO_LLAVA = DecoderAdapter(FamilySpec(
    name="video_llava",
    model_types=("video_llava",),
    classes=("VideoLlavaForConditionalGeneration",),
    visual_token_ids=("image_token_id", "video_token_id"),
    vision_layers="model.image_tower.encoder.layers", video_vision_layers="model.video_tower.encoder.layers",
))
LLAVA_ONEVISION = TiledAdapter(FamilySpec(
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

_ATTENTION_NAMES = ("self_attn", "attn", "attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_NORM_NAMES = ("input_layernorm", "attention_norm", "ln_1", "norm1")
_VISUAL_ID_KEYS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
# Families whose decoder looks standard but whose prefill the generic adapter's stage masks and positions would
# not reproduce: refused by name rather than run differently from the bare model.
_GENERIC_REFUSED = {
    "gemma4": "per-layer inputs, KV-shared layers and bidirectional vision attention",
    "gemma4_unified": "per-layer inputs, KV-shared layers and bidirectional vision attention",
    "mllama": "the image enters through cross-attention layers, not as tokens of the sequence",
    "qwen2_5_omni_thinker": "M-RoPE positions over interleaved audio and video",
    "qwen3_omni_moe_thinker": "M-RoPE positions over interleaved audio and video, and deepstack features",
    "granite_docling": "deepstack features added at the prompt's visual positions after the first decoder layers",
    "ernie4_5_vl_moe": "MoE layers route each token by the call's moe_mm_token_type_ids, which would not follow the "
                       "kept tokens",
    "muse_glimmer": "NoPE layers (layer_rope_theta 0) that the model runs without position embeddings",
}


class GenericAdapter(DecoderAdapter):
    """Any model whose config names an image (or video) token id and whose language model is a
    standard decoder stack: the layers, their attention / MLP / input norm and the rotary embedding
    are found by structure, so a new family usually needs no code. Tried after every named adapter.

    :meth:`resolve` returns the concrete adapter built for one model (a :class:`DecoderAdapter`,
    or an :class:`MRopeAdapter` when the decoder uses M-RoPE); the registry hands that one out.
    """

    def __init__(self) -> None:
        super().__init__(FamilySpec(name="generic", model_types=(), classes=()))

    def summary(self) -> str:
        return "any model whose config names an image/video token id and whose decoder is a standard stack"

    def matches(self, model: nn.Module) -> bool:
        return self.explain(model) is None

    def explain(self, model: nn.Module) -> str | None:
        try:
            self.resolve(model)
        except AdapterError as exc:
            return str(exc)
        return None

    def resolve(self, model: nn.Module) -> DecoderAdapter:
        config = getattr(model, "config", None)
        refused = _GENERIC_REFUSED.get(getattr(config, "model_type", None))
        if refused is not None:
            raise AdapterError(f"{type(model).__name__} ({config.model_type}): {refused}; the generic adapter would "
                               "not reproduce the bare model, and no named adapter knows it yet")
        keys = tuple(k for k in _VISUAL_ID_KEYS if getattr(config, k, None) is not None)
        if not keys:
            raise AdapterError(f"{type(model).__name__}'s config names no visual token id (looked for "
                               f"{', '.join(_VISUAL_ID_KEYS)})")
        found = next(((path, module) for path, module in model.named_modules()
                      if isinstance(getattr(module, "layers", None), nn.ModuleList) and len(module.layers)
                      and hasattr(module, "rotary_emb") and hasattr(module, "embed_tokens")), None)
        if found is None:
            raise AdapterError(f"{type(model).__name__} has no decoder stack with layers, rotary_emb and "
                               "embed_tokens")
        path, stack = found
        kinds = list(getattr(stack.config, "layer_types", None) or ())
        other = next(((i, kind) for i, kind in enumerate(kinds) if kind not in DecoderAdapter.fed_layer_kinds), None)
        if other is not None:
            raise AdapterError(
                f"{type(model).__name__} decoder layer {other[0]} is a {other[1]!r} layer (of "
                f"{sorted(set(kinds))}); prunekit feeds a shorter sequence to attention layers only "
                f"({', '.join(DecoderAdapter.fed_layer_kinds)}): a pruned token would still have to leave the "
                "recurrent state of such a layer, which needs an adapter that knows it"
            )
        layer = stack.layers[0]

        def pick(names: tuple[str, ...], what: str) -> str:
            for name in names:
                if isinstance(getattr(layer, name, None), nn.Module):
                    return name
            raise AdapterError(f"{type(layer).__name__} has no {what} (looked for {', '.join(names)})")

        mrope = "mrope_section" in (getattr(stack.config, "rope_parameters", None) or {})
        spec = FamilySpec(
            name="generic", model_types=(getattr(config, "model_type", ""),), classes=(type(model).__name__,),
            language_model=path, attention=pick(_ATTENTION_NAMES, "attention"), mlp=pick(_MLP_NAMES, "MLP"),
            input_norm=pick(_NORM_NAMES, "input norm"), visual_token_ids=keys, projector=None, vision_layers=None,
        )
        return (MRopeAdapter if mrope else DecoderAdapter)(spec)


QWEN3_VL = DeepstackAdapter(FamilySpec(
    name="qwen3_vl",
    model_types=("qwen3_vl", "qwen3_vl_moe", "cosmos3_omni"),  # Cosmos3 Omni: Qwen3-VL under its own model_type
    classes=("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
             "Cosmos3OmniForConditionalGeneration"),
    visual_token_ids=("image_token_id", "video_token_id"),
    projector=None, vision_layers=None,
))
GEMMA3 = Gemma3Adapter(FamilySpec(
    name="gemma3",
    model_types=("gemma3", "shieldgemma2"),  # ShieldGemma 2 is a Gemma3ForConditionalGeneration
    classes=("Gemma3ForConditionalGeneration",),
    projector=None, vision_layers=None,
))

GEMMA3N = Gemma3nAdapter(FamilySpec(
    name="gemma3n",
    model_types=("gemma3n",),
    classes=("Gemma3nForConditionalGeneration",),
    projector=None, vision_layers=None,
))

PALIGEMMA = PrefixLMAdapter(FamilySpec(
    name="paligemma",
    model_types=("paligemma",),
    classes=("PaliGemmaForConditionalGeneration",),
    projector=None, vision_layers=None,
))

GENERIC = GenericAdapter()

# Named rows first; the generic adapter is the fallback (the registry tries adapters in this order).
BUILTIN_ADAPTERS: list[Adapter] = [LLAVA, LLAVA_NEXT, VIDEO_LLAVA, LLAVA_ONEVISION, QWEN2_VL, QWEN3_VL, GEMMA3,
                                   GEMMA3N, PALIGEMMA, GENERIC]


@hookimpl
def prunekit_add_adapters() -> list[Adapter]:
    return list(BUILTIN_ADAPTERS)
