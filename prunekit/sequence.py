"""Turn scores into the index of the tokens a stage keeps, with room for merged summary tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def gather_tokens(value: Tensor, index: Tensor) -> Tensor:
    """``value[b, index[b, j], ...]``: value [batch, seq, *rest], index [batch, new_seq] -> [batch, new_seq, *rest]."""
    expanded = index.view(*index.shape, *([1] * (value.dim() - 2))).expand(*index.shape, *value.shape[2:])
    return value.gather(1, expanded)


@dataclass
class Selection:
    """The shorter sequence of one stage, as positions in the current one.

    Samples keep different numbers of tokens when their visual counts differ; shorter rows are
    left-filled with ``fill`` slots (masked like padding), so the batch stays one tensor.
    """

    index: Tensor  # [batch, new_seq] long: position in the current sequence of each kept slot
    fill: Tensor  # [batch, new_seq] bool: slot holds no token
    dropped: Tensor  # [batch, seq] bool: visual tokens of the current sequence this stage drops


def top_visual(scores: Tensor, visual: Tensor, counts: Tensor) -> Tensor:
    """Mark the ``counts[b]`` best-scoring visual tokens of each sample.

    scores: [batch, seq] float; visual: [batch, seq] bool; counts: [batch] long (<= visual count).
    Returns [batch, seq] bool. Ties go to the earlier token, so the choice is deterministic.
    """
    batch = scores.shape[0]
    k_max = int(counts.max().item()) if batch else 0
    keep = torch.zeros_like(visual)
    if k_max == 0:
        return keep
    masked = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    masked = masked.masked_fill(~visual, float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k_max]  # [batch, k_max]
    take = torch.arange(k_max, device=scores.device)[None, :] < counts[:, None]  # [batch, k_max]
    keep.scatter_(1, order, take)
    return keep & visual


def pack(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The true positions of each row first, in order, rows padded on the right to one width.

    keep: [batch, seq] bool. Returns index [batch, width] long (a valid position everywhere; past a
    row's own count it means nothing) and present [batch, width] bool, width the most trues of a row.
    """
    batch, seq = keep.shape
    counts = keep.sum(dim=1)  # [batch]
    width = int(counts.max().item()) if batch else 0
    positions = torch.arange(seq, device=keep.device).expand(batch, seq)
    # kept positions first, in ascending order (the others pushed past the end, then folded back)
    index = torch.where(keep, positions, positions + seq).sort(dim=1).values[:, :width] % max(seq, 1)
    present = torch.arange(width, device=keep.device)[None, :] < counts[:, None]
    return index, present


def keep_in_order(keep: Tensor) -> tuple[Tensor, Tensor]:
    """The kept positions of each row in order, rows left-filled to one length.

    keep: [batch, seq] bool. Returns index [batch, new_seq] long and fill [batch, new_seq] bool.
    """
    packed, present = pack(keep)  # [batch, new_seq]
    pad = (~present).sum(dim=1, keepdim=True)  # [batch, 1] fill slots at the left of each row
    slot = torch.arange(packed.shape[1], device=keep.device)[None, :]
    return packed.gather(1, (slot - pad).clamp(min=0)), slot < pad


def select(scores: Tensor, visual: Tensor, counts: Tensor) -> Selection:
    """Keep every non-visual token and the top ``counts[b]`` visual tokens of each sample, in order."""
    kept_visual = top_visual(scores, visual, counts)
    index, fill = keep_in_order(~visual | kept_visual)
    return Selection(index=index, fill=fill, dropped=visual & ~kept_visual)


@dataclass
class Assembly:
    """The next sequence: kept tokens in order, merged tokens right after each sample's visual span."""

    index: Tensor  # [batch, new_seq] long: source position in the current sequence (meaningless where ~from_current)
    from_current: Tensor  # [batch, new_seq] bool: slot holds a kept token of the current sequence
    merged: Tensor  # [batch, new_seq] long: index into the merged tokens, -1 elsewhere
    merged_valid: Tensor  # [batch, new_seq] bool: slot holds a real merged token
    anchor: Tensor  # [batch, new_seq] long: for merged slots, the new slot of the token before them


def assemble(selection: Selection, last_visual: Tensor, merged_valid: Tensor | None) -> Assembly:
    """Insert ``merged_valid.shape[1]`` merged slots after the kept tokens up to each sample's visual span end.

    last_visual: [batch] long, index in the current sequence of each sample's last visual token
    (-1 without one); merged_valid: [batch, n_merged] bool, or None for no merging.
    """
    batch, kept_len = selection.index.shape
    device = selection.index.device
    n_merged = 0 if merged_valid is None else merged_valid.shape[1]
    if n_merged == 0:
        none = torch.full_like(selection.index, -1)
        return Assembly(selection.index, ~selection.fill, none, torch.zeros_like(selection.fill),
                        torch.zeros_like(selection.index))
    # kept slots at or before the end of the visual span (fill slots sit at the left)
    upto = ((selection.index <= last_visual[:, None]) | selection.fill).sum(dim=1, keepdim=True)  # [batch, 1]
    slot = torch.arange(kept_len + n_merged, device=device)[None, :]  # [1, new_seq]
    is_merged = (slot >= upto) & (slot < upto + n_merged)
    source_slot = torch.where(slot < upto, slot, slot - n_merged).clamp(0, kept_len - 1)
    index = selection.index.gather(1, source_slot.expand(batch, -1))
    from_current = ~selection.fill.gather(1, source_slot.expand(batch, -1)) & ~is_merged
    merged = torch.where(is_merged, slot - upto, torch.full_like(slot, -1)).expand(batch, -1)
    valid = is_merged & merged_valid.gather(1, merged.clamp(min=0))
    anchor = (upto - 1).clamp(min=0).expand(batch, kept_len + n_merged)
    return Assembly(index, from_current, merged, valid, anchor)


def pad_rows(rows: list[Tensor], like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample token lists ``[n_b, dim]`` as one right-padded batch: ``(tokens [batch, max n_b, dim], valid
    [batch, max n_b] bool)``, in ``like``'s dtype and device (what :meth:`Merger.merge` returns)."""
    width = max((row.shape[0] for row in rows), default=0)
    tokens = like.new_zeros(len(rows), width, like.shape[-1])
    valid = torch.zeros(len(rows), width, dtype=torch.bool, device=like.device)
    for b, row in enumerate(rows):
        tokens[b, : row.shape[0]] = row
        valid[b, : row.shape[0]] = True
    return tokens, valid


def merge_each_image(hidden: Tensor, layout, merge_one) -> tuple[Tensor, Tensor]:
    """``merge_one([n, dim] one image's tokens in order) -> [m, dim]`` on every image of every sample, the results
    of a sample concatenated in image order and padded as :func:`pad_rows` does. hidden: [batch, seq, dim]."""
    rows = []
    for b in range(hidden.shape[0]):
        images = layout.image_index[b][layout.visual[b]].unique().tolist()
        merged = [merge_one(hidden[b][layout.visual[b] & (layout.image_index[b] == i)]) for i in images]
        rows.append(torch.cat(merged) if merged else hidden.new_zeros(0, hidden.shape[-1]))
    return pad_rows(rows, hidden)
