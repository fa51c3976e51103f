"""Turn scores into the index of the tokens a stage keeps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
    batch, seq = scores.shape
    k_max = int(counts.max().item()) if batch else 0
    keep = torch.zeros_like(visual)
    if k_max == 0:
        return keep
    masked = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    masked = masked.masked_fill(~visual, float("-inf"))
    # Stable descending sort: equal scores keep sequence order.
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :k_max]  # [batch, k_max]
    take = torch.arange(k_max, device=scores.device)[None, :] < counts[:, None]  # [batch, k_max]
    keep.scatter_(1, order, take)
    return keep & visual


def select(scores: Tensor, visual: Tensor, counts: Tensor) -> Selection:
    """Keep every non-visual token and the top ``counts[b]`` visual tokens of each sample, in order."""
    batch, seq = visual.shape
    kept_visual = top_visual(scores, visual, counts)
    keep = ~visual | kept_visual  # [batch, seq]
    n_keep = keep.sum(dim=1)  # [batch]
    new_seq = int(n_keep.max().item())
    positions = torch.arange(seq, device=visual.device).expand(batch, seq)
    # Kept positions first, in ascending order (dropped ones pushed past the end).
    kept_sorted = torch.where(keep, positions, positions + seq).sort(dim=1).values[:, :new_seq]  # [batch, new_seq]
    pad = new_seq - n_keep  # [batch] fill slots at the left of each row
    slot = torch.arange(new_seq, device=visual.device)[None, :]
    fill = slot < pad[:, None]
    index = kept_sorted.gather(1, (slot - pad[:, None]).clamp(min=0))
    return Selection(index=index, fill=fill, dropped=visual & ~kept_visual)
