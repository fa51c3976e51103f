"""What a prune layer does to a prefill's record, and the layer inputs every stage's layers get.

:func:`prune` scores the current sequence, keeps the top visual tokens (and any merged summary
tokens), and moves the record on: the layout and buffers are gathered, positions follow, and the
stage's :class:`~prunekit.record.StageRecord` is appended. :func:`prefill_layer_kwargs` and
:func:`decode_layer_kwargs` build a layer's mask and position embeddings for the current stage,
once per layer kind (per forward, or per decode step).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, Stage
from prunekit.errors import AdapterError
from prunekit.layout import last_index
from prunekit.recipe import Recipe
from prunekit.record import Decode, Prefill, StageRecord, max_position
from prunekit.scoring import Timer, score
from prunekit.sequence import Assembly, assemble, gather_tokens, select


def prune(prefill: Prefill, recipe: Recipe, adapter: Adapter, stage: Stage, stage_index: int, hidden: Tensor,
          timed: Timer, criteria_stage: int | None = None) -> Tensor:
    """Prune before ``stage.layer``: returns the next hidden states [batch, new_seq, dim] and updates ``prefill``.

    ``criteria_stage``: the stage index the criteria see (``stage_index`` unless the engine runs a vision
    stage of its own before the recipe's stages)."""
    ctx = prefill.ctx
    ctx.stage = stage_index if criteria_stage is None else criteria_stage
    counts = torch.minimum(stage.keep_counts(prefill.visual_original), ctx.layout.visual_counts())  # [batch]
    ctx.keep_counts = counts
    with timed("scoring"):
        combined = score(recipe.criteria, recipe.combiner, ctx)  # [batch, seq], detached: scoring stays out of the graph
    dropped_by_criteria = (ctx.layout.visual & (combined == float("-inf"))).sum(dim=1)  # [batch]
    if bool(dropped_by_criteria.any()):  # a criterion's own count: at most the tokens it did not drop
        counts = torch.minimum(counts, ctx.layout.visual_counts() - dropped_by_criteria)
        ctx.keep_counts = counts
    with timed("selection"):
        with torch.no_grad():
            selection = select(combined, ctx.layout.visual, counts)
        merged, merged_valid = None, None
        if recipe.merger is not None and recipe.merger.in_place:  # merged into kept tokens, in the graph
            hidden = recipe.merger.merge_into_kept(hidden, ctx.layout.visual & ~selection.dropped, combined, ctx)
        elif recipe.merger is not None:  # merged tokens are built from the hidden states, in the graph
            merged, merged_valid = recipe.merger.merge(hidden, selection.dropped, combined, ctx)
        with torch.no_grad():
            plan = assemble(selection, last_index(ctx.layout.visual), merged_valid)
        hidden = next_hidden(hidden, plan, merged)  # a gather: gradients reach the kept tokens as in the bare model
        advance(prefill, plan, adapter, stage, stage_index, recipe.positions)
    return hidden


def advance(prefill: Prefill, plan: Assembly, adapter: Adapter, stage: Stage, stage_index: int,
            recipe_positions: str, where: str = "decoder") -> None:
    """Move ``prefill`` on to the sequence ``plan`` assembles: positions follow the kept tokens (re-indexed
    under ``compact``), the layout and buffers are gathered, and the stage's record is appended."""
    ctx = prefill.ctx
    policy = stage.positions or recipe_positions
    with torch.no_grad():
        prefill.positions = next_positions(prefill, plan, adapter, policy)
        if prefill.past is not None:  # a later turn: continue right after this stage's cached positions
            prefill.positions = prefill.positions - prefill.past_moved(stage_index)[None, :, None]
        ctx.gather(plan.index, ~plan.from_current)
        ctx.layout.visual |= plan.merged_valid  # merged slots are visual tokens from now on
        ctx.layout.valid |= plan.merged_valid
    shift = prefill.records[-1].shift if prefill.records else torch.zeros_like(prefill.prompt_valid)
    if policy == "compact":  # decode tokens continue right after the compacted prompt
        shift = prefill.prompt_max_position - max_position(prefill.positions, ctx.layout.valid)
    layout = ctx.layout
    prefill.records.append(StageRecord(layer=stage.layer, original_index=layout.original_index,
                                       visual=layout.visual, valid=layout.valid, shift=shift, where=where))
    prefill.layer_kwargs = {}


def next_hidden(hidden: Tensor, plan: Assembly, merged: Tensor | None) -> Tensor:
    """[batch, new_seq, dim]: kept tokens gathered, merged tokens in their slots."""
    out = gather_tokens(hidden, plan.index)
    if merged is not None and merged.shape[1]:
        placed = gather_tokens(merged.to(hidden.dtype), plan.merged.clamp(min=0))
        out = torch.where((plan.merged >= 0)[..., None], placed, out)
    return out


def next_positions(prefill: Prefill, plan: Assembly, adapter: Adapter, policy: str) -> Tensor:
    """[components, batch, new_seq]: RoPE positions of the next sequence, re-indexed (compact) or each token's own."""
    layout = prefill.ctx.layout
    valid = (plan.from_current & layout.valid.gather(1, plan.index)) | plan.merged_valid
    components = prefill.positions.shape[0]
    positions = prefill.positions.gather(2, plan.index[None].expand(components, -1, -1))
    # a merged token sits at the position of the kept token before it
    anchored = positions.gather(2, plan.anchor[None].expand(components, -1, -1))
    positions = torch.where(plan.merged[None] >= 0, anchored, positions)
    if policy == "compact":
        visual = (plan.from_current & layout.visual.gather(1, plan.index)) | plan.merged_valid
        positions = adapter.compact_positions(positions, valid, visual)
    return positions.masked_fill(~valid[None], 0)


def prefill_layer_kwargs(prefill: Prefill, adapter: Adapter, model: nn.Module, layer_idx: int, hidden: Tensor,
                         timed: Timer) -> dict[str, Any]:
    """The current stage's keyword arguments for decoder layer ``layer_idx`` (built once per layer kind)."""
    kind = adapter.layer_kind(model, layer_idx)
    if kind not in prefill.layer_kwargs:
        layout = prefill.ctx.layout
        past = prefill.past_stage_mask(len(prefill.records) - 1)  # a later turn also attends to its stage's cache
        mask_2d, blocks = layout.valid, layout.attention_block  # [batch, kv_len] each
        if past is not None:  # keys: the cached slots (text to the turn's image blocks), then the turn's tokens
            mask_2d = torch.cat([past, layout.valid], dim=1)
            blocks = torch.cat([torch.full_like(past, -1, dtype=blocks.dtype), blocks], dim=1)
        with timed("stage inputs"):
            prefill.layer_kwargs[kind] = adapter.stage_kwargs(
                model, hidden, mask_2d, prefill.positions, prefill.cache, layer_idx, blocks
            )
    return prefill.layer_kwargs[kind]


def _decode_inputs(decode: Decode, key: tuple[int, str]) -> tuple[Tensor, Tensor]:
    """The 2D mask [batch, seq_s + decoded + q] and positions [components, batch, q] of ``key``'s stage."""
    cached = decode.cached
    mask_2d = torch.cat([cached.stage_mask(key[0], decode.mask_2d), decode.mask_2d[:, cached.seen:]], dim=1)
    return mask_2d, decode.positions - cached.records[key[0]].shift[None, :, None]


def decode_layer_kwargs(decode: Decode, adapter: Adapter, model: nn.Module, key: tuple[int, str], layer_idx: int,
                        hidden: Tensor) -> dict[str, Any]:
    """A decode step's keyword arguments for the layers of ``key`` = (stage, layer kind), built at the
    key's first layer ``layer_idx`` and kept in ``decode.layer_kwargs`` for the others: the mask over
    that stage's cached slots plus the decoded tokens, positions shifted by what the stage removed."""
    mask_2d, positions = _decode_inputs(decode, key)
    built = adapter.stage_kwargs(model, hidden, mask_2d, positions, decode.cache, layer_idx)
    decode.layer_kwargs[key] = built
    return built


def decode_step_kwargs(decode: Decode, build_step: Callable[..., list[dict[str, Any]]], model: nn.Module,
                       groups: Mapping[tuple[int, str], int], hidden: Tensor) -> None:
    """Every key's keyword arguments of one decode step in one call of an adapter's optional
    ``step_kwargs(model, hidden, masks_2d, positions, cache, layer_idxs)``, which returns, per key in
    order, what ``stage_kwargs`` would for that key's first layer (``groups``: key -> first layer)."""
    inputs = [_decode_inputs(decode, key) for key in groups]
    built = build_step(model, hidden, [mask for mask, _ in inputs], [positions for _, positions in inputs],
                       decode.cache, list(groups.values()))
    if len(built) != len(groups):
        raise AdapterError(f"step_kwargs returned {len(built)} sets of layer inputs for {len(groups)} groups of "
                           f"layers {dict(groups)}; it must return one per group, in order")
    decode.layer_kwargs.update(zip(groups, built))
