"""A recipe's ``vision`` block at the language model's input, for families whose image features cannot be
shortened before their projector.

LLaVA-1.5 and Video-LLaVA hand the projector one fixed-size grid per image, so ``prunekit.vision`` shortens
it there. Elsewhere the projector is not where an image's tokens are final: Qwen2/2.5-VL's patch merger
feeds a prompt whose M-RoPE positions come from the full grid, LLaVA-NeXT and OneVision pack each image's
tiles (unpadding, newline tokens) after the projector, Gemma 3's projector pools the patches. There the
block runs on each image's tokens as the first decoder layer receives them (the projected features in the
embeddings), before layer 0: the engine runs it as a stage of its own, so positions (M-RoPE included),
masks and the KV cache follow the kept tokens as for any stage. The language model runs on exactly the
tokens it would get had the features been dropped before it.

- Unit: each image (a visual span of the prompt), or each part of it the adapter names (LLaVA-NeXT's and
  OneVision's tiles; their image-newline tokens are in no unit and stay), or each frame of a video span
  whose frames the adapter knows; ``count`` / ``keep`` apply to each unit's own tokens (a fraction serves 64-
  and 3000-token images).
- Criteria read :class:`~prunekit.probes.VisionFeatures` (``LayerInput(0)`` criteria: DivPrune, the
  L2-norm and similarity baselines) and mergers get the features. Where the adapter reads the tower for
  it (``Adapter.input_tower``: Qwen2/2.5-VL) criteria may also read ``VisionAttentionReceived`` and
  ``VisionKeys``, one value per language-model token; any other tower probe is refused by name.
- Merged tokens of a unit sit inside it (``lead`` of them before its kept tokens, the rest after), at the
  position of the real token before them (of the first real token after them when the unit leads its row),
  as at a decoder stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, Stage
from prunekit.capture import received_attention
from prunekit.errors import LayoutError, RecipeError
from prunekit.hooks import HookSet
from prunekit.layout import TokenLayout
from prunekit.probes import TOWER_PROBES, VisionAttentionReceived, VisionKeys
from prunekit.recipe import VisionRecipe, collect_probes
from prunekit.record import Prefill, Running
from prunekit.scoring import Timer
from prunekit.sequence import Assembly, gather_tokens
from prunekit.step import advance
from prunekit.vision import shorten_images, tower_depth

INPUT_STAGE = Stage(layer=0, keep=1.0)  # the stage the engine runs the block as (its counts are the block's own)


def runs_before_projector(adapter: Adapter, model: nn.Module) -> bool:
    """Whether a vision block on ``model`` shortens each image before its projector (LLaVA-1.5, Video-LLaVA);
    otherwise it runs at the language model's input."""
    return tower_depth(adapter, model) is not None


def tower_readers(vision: VisionRecipe, readable: tuple[type, ...] = ()) -> list[str]:
    """``"key (probe type)"`` of every part of a vision block that reads inside the vision tower, other than
    through the probe types in ``readable``."""
    wanted = collect_probes(vision.parts(), (0,), 1_000_000, "vision", "vision")  # the depth is not checked here
    return sorted({f"{getattr(plugin, 'key', '') or 'merge'} ({type(probe).__name__})"
                   for plugin, probe in wanted if isinstance(probe, TOWER_PROBES) and not isinstance(probe, readable)})


def tower_probes_read(adapter: Adapter, model: nn.Module) -> tuple[type, ...]:
    """The tower probe types a vision block at the language model's input can read on ``model``."""
    return InputVision.READ_IN_TOWER if adapter.input_tower(model) is not None else ()


class InputVision:
    """Runs a recipe's ``vision`` block as a stage before decoder layer 0 (see the module docstring)."""

    READ_IN_TOWER = (VisionAttentionReceived, VisionKeys)  # what an adapter's input tower delivers per token

    def __init__(self, model: nn.Module, adapter: Adapter, vision: VisionRecipe, recipe_name: str,
                 running: Running) -> None:
        self.model = model
        self.adapter = adapter
        self.vision = vision
        self.running = running
        self.tower = adapter.input_tower(model)
        depth = len(self.tower.layers) if self.tower is not None else 1_000_000
        self.wanted = [(plugin, probe) for plugin, probe in
                       collect_probes(vision.parts(), (0,), depth, "vision", f"recipe {recipe_name!r}, vision")
                       if isinstance(probe, TOWER_PROBES)]
        names = tower_readers(vision, self.READ_IN_TOWER if self.tower is not None else ())
        if names:
            readable = (f"{type(model).__name__}'s tower gives {', '.join(k.__name__ for k in self.READ_IN_TOWER)} "
                        "(per merged token)" if self.tower is not None else
                        f"prunekit reads no tower of {type(model).__name__} there")
            raise RecipeError(
                f"recipe {recipe_name!r}, vision: {', '.join(names)} read the vision tower, which prunekit reads "
                f"before the projector of LLaVA-1.5 and Video-LLaVA; on {type(model).__name__} (adapter "
                f"{adapter.name!r}) the vision block runs at the language model's input, and {readable}. Use "
                "criteria that read the projected features (LayerInput(0) / VisionFeatures: divprune, l2_norm, "
                "similarity, uniform) and mergers, or a decoder-stage recipe")

    def install(self, hooks: HookSet, timed: Timer) -> None:
        """Hooks that read the tower (only when the block asks): each tower call's per-patch values, mapped onto
        its images' language-model tokens when the tower returns."""
        if not self.wanted:
            return
        tower, running = self.tower, self.running
        probes = list(dict.fromkeys(probe for _, probe in self.wanted))
        layer_of = {id(tower.attention(layer)): i for i, layer in enumerate(tower.layers)}
        n = len(tower.layers)

        def start(module: nn.Module, args: tuple, kwargs: dict) -> None:  # per thread: the running forward's record
            record = running.vision_record()
            record.tower_pieces = {}
            record.tower_grid = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

        def on_attention(module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
            layer = layer_of.get(id(module))
            read = [p for p in probes if layer is not None and p.layer % n == layer]
            if not read:
                return
            pieces = running.vision_record().tower_pieces
            with torch.no_grad(), timed("probes"):
                for q, k in _blocks(query, key, kwargs):  # [1, heads, len, head_dim] each
                    for probe in read:
                        value = (received_attention(q, k, kwargs)[0] if isinstance(probe, VisionAttentionReceived)
                                 else k[0].float().mean(dim=0))  # [len] / [len, head_dim]
                        pieces.setdefault(probe, []).append(value)

        def finish(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            record = running.vision_record()
            with timed("probes"):
                for probe, parts in record.tower_pieces.items():  # per tower call: a call's images, then its videos
                    record.captures.setdefault(probe, []).extend(tower.to_tokens(torch.cat(parts), record.tower_grid))
            record.tower_pieces = {}

        hooks.add(tower.visual.register_forward_pre_hook(start, with_kwargs=True))
        hooks.tap(tower.attention(tower.layers[0]).config, on_attention)
        hooks.add(tower.visual.register_forward_hook(finish, with_kwargs=True))

    def prune(self, prefill: Prefill, hidden: Tensor, positions_policy: str, timed: Timer) -> Tensor:
        """Shorten every image (or frame) of the prefill: ``hidden`` ``[batch, seq, dim]`` entering layer 0 ->
        ``[batch, new_seq, dim]``; ``prefill`` moves on as after a decoder stage (its record marked "vision")."""
        layout = prefill.ctx.layout
        with timed("vision stage"):
            units = image_units(layout, self.adapter.vision_units(self.model, hidden, layout))
            shortened = self._shorten(hidden, units, self._tower_captures(layout, units))
            plan, sources = unit_plan(units, shortened, layout.valid, hidden.device)
            new_hidden = gather_tokens(hidden, plan.index)  # [batch, new_seq, dim]: text (merged and fill slots: any)
            for b, slots, rows in sources:  # the units' slots [n] of sample b <- their shortened rows [n, dim]
                new_hidden[b, slots] = rows.to(hidden.dtype)
            prefill.visual_before_vision = layout.visual_counts()
            advance(prefill, plan, self.adapter, INPUT_STAGE, len(prefill.records), positions_policy, "vision")
            prefill.visual_original = prefill.ctx.layout.visual_counts()  # later stages keep shares of these
        return new_hidden

    def _tower_captures(self, layout: TokenLayout, units: list[tuple[int, Tensor]]) -> dict[Any, list[Tensor]]:
        """What the tower probes read, one tensor per unit (``{probe: [per unit [P, ...]]}``); {} without them.

        The tower encodes a call's images (one tensor each), then its videos (one tensor each, frame-major): an
        image unit takes its image's, a video's frame units split their video's in order."""
        if not self.wanted:
            return {}
        record = self.running.vision
        captures = {} if record is None else record.captures
        frame_of = [int(layout.frame_index[b, where[0]]) for b, where in units]  # -1: an image unit
        videos: dict[tuple[int, int], list[int]] = {}  # (sample, span) -> its frame units, in order
        for i, (b, where) in enumerate(units):
            if frame_of[i] >= 0:
                videos.setdefault((b, int(layout.image_index[b, where[0]])), []).append(i)
        images = [i for i in range(len(units)) if frame_of[i] < 0]
        wanted_sizes = [len(units[i][1]) for i in images] + [sum(len(units[i][1]) for i in f) for f in videos.values()]
        out = {}
        for probe in dict.fromkeys(p for _, p in self.wanted):
            # this forward's tower calls are the last ones (a call outside a forward, e.g. the user's own
            # get_image_features, left its images before them)
            encoded = captures.get(probe, [])[-len(wanted_sizes):] if wanted_sizes else []
            if [len(t) for t in encoded] != wanted_sizes:
                raise LayoutError(f"{probe}: the tower gave {[len(t) for t in encoded]} tokens per image or video, "
                                  f"the prompt holds {wanted_sizes} (its images in order, then its videos)")
            per_unit: list[Tensor] = [encoded[0]] * len(units)
            for image, i in enumerate(images):
                per_unit[i] = encoded[image]
            for video, frames in enumerate(videos.values()):
                parts = encoded[len(images) + video].split([len(units[i][1]) for i in frames])
                for i, part in zip(frames, parts):
                    per_unit[i] = part
            out[probe] = per_unit
        return out

    def _shorten(self, hidden: Tensor, units: list[tuple[int, Tensor]], tower: dict[Any, list[Tensor]]
                 ) -> list[tuple[Tensor, Tensor, int]]:
        """Each unit's shortened tokens ``[t, dim]``, kept patches (unit-relative, ascending) and leading
        merged count; units of one size are shortened together, as the images of one projector call."""
        out: list[Any] = [None] * len(units)
        by_size: dict[int, list[int]] = {}
        for i, (_, where) in enumerate(units):
            by_size.setdefault(len(where), []).append(i)
        for members in by_size.values():
            features = torch.stack([hidden[units[i][0], units[i][1]] for i in members])  # [n, P, dim]
            captures = {probe: torch.stack([values[i] for i in members]).to(hidden.device)
                        for probe, values in tower.items()}  # [n, P] / [n, P, head_dim]
            tokens, kept, lead = shorten_images(self.vision, features, captures, 1)  # [n, t, dim], [n, k]
            for row, i in enumerate(members):
                out[i] = (tokens[row], kept[row], lead)
        return out


def _blocks(query: Tensor, key: Tensor, kwargs: dict) -> list[tuple[Tensor, Tensor]]:
    """The attention blocks of one tapped call: itself (sdpa / eager call once per image or window), or a
    flash-attention call's sequences split by its ``cu_seq_lens_q``."""
    bounds = kwargs.get("cu_seq_lens_q")
    if bounds is None:
        return [(query, key)]
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    return list(zip(query.split(lengths, dim=2), key.split(lengths, dim=2)))


def image_units(layout: TokenLayout, parts: Tensor) -> list[tuple[int, Tensor]]:
    """The units a vision block shortens: ``(sample, positions [P] ascending)`` of every image of every sample,
    cut into the adapter's ``parts`` (``[batch, seq]``: LLaVA-NeXT's and OneVision's tiles; -2 for tokens in no
    unit, kept as they are) or a video span into its frames where the layout knows them, in sample, then position
    order."""
    inner = torch.maximum(layout.frame_index, parts)  # [batch, seq]: frame or part, -1 for none
    width = int(inner.max()) + 2
    span = layout.image_index * width + inner + 1  # one id per image, part or frame
    visual = layout.visual & (parts != -2)  # image-newline tokens stay, in no unit
    units = []
    for b in range(visual.shape[0]):
        ids = span[b][visual[b]]
        for u in dict.fromkeys(ids.tolist()):  # in order of first appearance
            units.append((b, (visual[b] & (span[b] == u)).nonzero().flatten()))
    return units


def unit_plan(units: list[tuple[int, Tensor]], shortened: list[tuple[Tensor, Tensor, int]], valid: Tensor,
              device: torch.device) -> tuple[Assembly, list[tuple[int, Tensor, Tensor]]]:
    """The next sequence: every token outside the units, and each unit's shortened tokens in its place (``lead``
    merged ones, the kept patches, the other merged ones), rows left-filled to one length.

    Returns the :class:`Assembly` (kept tokens index the current sequence; merged slots anchor at the real
    token before them, ``valid`` ``[batch, seq]`` telling padding apart) and, per sample, the slots that take a
    unit's shortened rows: ``(sample, slots, rows)``.
    """
    batch, seq = valid.shape
    real = valid.cpu()
    dropped = torch.zeros(batch, seq, dtype=torch.bool)
    rows_of: list[list[tuple[int, Tensor]]] = [[] for _ in range(batch)]  # (key, row) per unit token
    for (b, where), (tokens, kept, lead) in zip(units, shortened):
        where = where.cpu()
        dropped[b, where] = True
        n_kept, first, last = kept.shape[0], int(where[0]), int(where[-1])
        keys = []
        for r in range(tokens.shape[0]):  # sort keys: a real token j sorts at 4j + 2
            if r < lead:
                keys.append((4 * first + 1, r))  # right before the unit's first position
            elif r < lead + n_kept:
                keys.append((4 * int(where[int(kept[r - lead])]) + 2, 0))
            else:
                keys.append((4 * last + 3, r))  # right after the unit's last position
        rows_of[b].extend(zip(keys, tokens.unbind(0)))
    layout_rows, sources = [], []
    for b in range(batch):
        text = (~dropped[b]).nonzero().flatten().tolist()
        entries = [((4 * j + 2, 0), j, None) for j in text] + [(key, -1, row) for key, row in rows_of[b]]
        entries.sort(key=lambda e: e[0])
        layout_rows.append(entries)
    width = max(len(entries) for entries in layout_rows)
    index = torch.zeros(batch, width, dtype=torch.long)
    from_current = torch.zeros(batch, width, dtype=torch.bool)
    merged = torch.full((batch, width), -1, dtype=torch.long)
    anchor = torch.zeros(batch, width, dtype=torch.long)
    for b, entries in enumerate(layout_rows):
        pad = width - len(entries)  # fill slots on the left
        slots, rows, n_merged, previous = [], [], 0, None
        for s, ((key, _), j, row) in enumerate(entries, start=pad):
            is_merged = key % 4 != 2
            if is_merged:
                merged[b, s], n_merged = n_merged, n_merged + 1
                anchor[b, s] = previous if previous is not None else s  # fixed below when a unit leads the row
            else:
                index[b, s] = key // 4
                from_current[b, s] = True
                if bool(real[b, key // 4]):  # padding is never an anchor
                    previous = s
            if row is not None:
                slots.append(s)
                rows.append(row)
        anchors = from_current[b] & real[b].gather(0, index[b])  # [width]: slots of real current tokens
        first_real = (anchors.nonzero().flatten()[:1].tolist() or [pad])[0]
        leading = (merged[b] >= 0) & (torch.arange(width) < first_real)
        anchor[b] = torch.where(leading, torch.full_like(anchor[b], first_real), anchor[b])
        if slots:
            sources.append((b, torch.tensor(slots, device=device), torch.stack(rows)))
    plan = Assembly(index=index.to(device), from_current=from_current.to(device), merged=merged.to(device),
                    merged_valid=(merged >= 0).to(device), anchor=anchor.to(device))
    return plan, sources
