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

- Unit: each image (a visual span of the prompt), or each part of it the adapter names (LLaVA-NeXT's base tile
  and high-resolution grid; its image-newline tokens are in no unit and stay), or each frame of a video span
  whose frames the adapter knows; ``count`` / ``keep`` apply to each unit's own tokens (a fraction serves 64-
  and 3000-token images).
- Criteria read :class:`~prunekit.probes.VisionFeatures` (``LayerInput(0)`` criteria: DivPrune, the
  L2-norm and similarity baselines) and mergers get the features; criteria reading the tower
  (``VisionAttention`` / ``VisionKeys`` / ``VisionHidden``) are refused by name: no built-in adapter maps
  a tower's tokens onto these families' language-model tokens yet.
- Merged tokens of a unit sit inside it (``lead`` of them before its kept tokens, the rest after), at the
  position of the token before them, as at a decoder stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, Stage
from prunekit.errors import AdapterError, RecipeError
from prunekit.layout import TokenLayout
from prunekit.probes import TOWER_PROBES
from prunekit.recipe import VisionRecipe, collect_probes
from prunekit.record import Prefill
from prunekit.scoring import Timer
from prunekit.sequence import Assembly, gather_tokens
from prunekit.step import advance
from prunekit.vision import shorten_images

INPUT_STAGE = Stage(layer=0, keep=1.0)  # the stage the engine runs the block as (its counts are the block's own)


def runs_before_projector(adapter: Adapter, model: nn.Module) -> bool:
    """Whether a vision block on ``model`` shortens each image before its projector (LLaVA-1.5, Video-LLaVA);
    otherwise it runs at the language model's input."""
    try:
        adapter.projector(model)
        adapter.vision_layers(model)
    except (AdapterError, NotImplementedError):
        return False
    return True


def tower_readers(vision: VisionRecipe) -> list[str]:
    """``"key (probe type)"`` of every part of a vision block that reads inside the vision tower."""
    wanted = collect_probes(vision.parts(), (0,), 1_000_000, "vision", "vision")  # the depth is not checked here
    return sorted({f"{getattr(plugin, 'key', '') or 'merge'} ({type(probe).__name__})"
                   for plugin, probe in wanted if isinstance(probe, TOWER_PROBES)})


class InputVision:
    """Runs a recipe's ``vision`` block as a stage before decoder layer 0 (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter: Adapter, vision: VisionRecipe, recipe_name: str) -> None:
        self.model = model
        self.adapter = adapter
        self.vision = vision
        tower = tower_readers(vision)
        if tower:
            raise RecipeError(
                f"recipe {recipe_name!r}, vision: {', '.join(tower)} read the vision tower, which prunekit reads "
                f"before the projector of LLaVA-1.5 and Video-LLaVA only; on {type(model).__name__} (adapter "
                f"{adapter.name!r}) the vision block runs at the language model's input, on each image's projected "
                "features: use criteria that read those (LayerInput(0) / VisionFeatures: divprune, l2norm, "
                "similarity, uniform) and mergers, or a decoder-stage recipe")

    def prune(self, prefill: Prefill, hidden: Tensor, positions_policy: str, timed: Timer) -> Tensor:
        """Shorten every image (or frame) of the prefill: ``hidden`` ``[batch, seq, dim]`` entering layer 0 ->
        ``[batch, new_seq, dim]``; ``prefill`` moves on as after a decoder stage (its record marked "vision")."""
        layout = prefill.ctx.layout
        with timed("vision stage"):
            units = image_units(layout, self.adapter.vision_units(self.model, hidden, layout))
            shortened = self._shorten(hidden, units)
            plan, sources = unit_plan(units, shortened, *layout.visual.shape, hidden.device)
            new_hidden = gather_tokens(hidden, plan.index)  # [batch, new_seq, dim]: text (merged and fill slots: any)
            for b, slots, rows in sources:  # the units' slots [n] of sample b <- their shortened rows [n, dim]
                new_hidden[b, slots] = rows.to(hidden.dtype)
            prefill.visual_before_vision = layout.visual_counts()
            advance(prefill, plan, self.adapter, INPUT_STAGE, len(prefill.records), positions_policy, "vision")
            prefill.visual_original = prefill.ctx.layout.visual_counts()  # later stages keep shares of these
        return new_hidden

    def _shorten(self, hidden: Tensor, units: list[tuple[int, Tensor]]) -> list[tuple[Tensor, Tensor, int]]:
        """Each unit's shortened tokens ``[t, dim]``, kept patches (unit-relative, ascending) and leading
        merged count; units of one size are shortened together, as the images of one projector call."""
        out: list[Any] = [None] * len(units)
        by_size: dict[int, list[int]] = {}
        for i, (_, where) in enumerate(units):
            by_size.setdefault(len(where), []).append(i)
        for members in by_size.values():
            features = torch.stack([hidden[units[i][0], units[i][1]] for i in members])  # [n, P, dim]
            tokens, kept, lead = shorten_images(self.vision, features, {}, 1)  # [n, t, dim], [n, k]
            for row, i in enumerate(members):
                out[i] = (tokens[row], kept[row], lead)
        return out


def image_units(layout: TokenLayout, parts: Tensor) -> list[tuple[int, Tensor]]:
    """The units a vision block shortens: ``(sample, positions [P] ascending)`` of every image of every sample,
    cut into the adapter's ``parts`` (``[batch, seq]``: LLaVA-NeXT's base tile and high-resolution grid; -2 for
    tokens in no unit, kept as they are) or a video span into its frames where the layout knows them, in sample,
    then position order."""
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


def unit_plan(units: list[tuple[int, Tensor]], shortened: list[tuple[Tensor, Tensor, int]], batch: int, seq: int,
              device: torch.device) -> tuple[Assembly, list[tuple[int, Tensor, Tensor]]]:
    """The next sequence: every token outside the units, and each unit's shortened tokens in its place (``lead``
    merged ones, the kept patches, the other merged ones), rows left-filled to one length.

    Returns the :class:`Assembly` (kept tokens index the current sequence; merged slots anchor at the token
    before them) and, per sample, the slots that take a unit's shortened rows: ``(sample, slots, rows)``.
    """
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
                previous = s
            if row is not None:
                slots.append(s)
                rows.append(row)
        first_real = (from_current[b].nonzero().flatten()[:1].tolist() or [pad])[0]
        leading = (merged[b] >= 0) & (torch.arange(width) < first_real)
        anchor[b] = torch.where(leading, torch.full_like(anchor[b], first_real), anchor[b])
        if slots:
            sources.append((b, torch.tensor(slots, device=device), torch.stack(rows)))
    plan = Assembly(index=index.to(device), from_current=from_current.to(device), merged=merged.to(device),
                    merged_valid=(merged >= 0).to(device), anchor=anchor.to(device))
    return plan, sources
