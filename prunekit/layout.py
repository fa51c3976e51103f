"""Where the visual tokens and the instruction are in the sequence of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    """Per-token facts of the current (possibly already pruned) sequence of a batch.

    Every field is a ``[batch, seq]`` tensor aligned with the hidden states the next decoder
    layer receives. Adapters build the first layout from ``input_ids``; the engine gathers it
    whenever it drops tokens, so criteria always see the layout of the sequence they score.
    """

    visual: Tensor  # [batch, seq] bool: a visual (image or video) token
    instruction: Tensor  # [batch, seq] bool: a prompt token after the last visual token of its sample
    valid: Tensor  # [batch, seq] bool: a real token (not padding, not a fill slot after pruning)
    original_index: Tensor  # [batch, seq] long: index of the token in the prefill input; -1 on fill slots
    image_index: Tensor  # [batch, seq] long: which visual span of the sample the token belongs to; -1 for text

    @property
    def batch_size(self) -> int:
        return self.visual.shape[0]

    @property
    def seq_len(self) -> int:
        return self.visual.shape[1]

    def visual_counts(self) -> Tensor:
        """Visual tokens per sample, ``[batch]`` long."""
        return self.visual.sum(dim=1)

    def gather(self, index: Tensor, fill: Tensor) -> TokenLayout:
        """The layout of the sequence ``index`` selects; ``fill`` marks slots that hold no token.

        index: [batch, new_seq] long positions in the current sequence; fill: [batch, new_seq] bool.
        """
        out = {}
        for f in fields(self):
            value: Tensor = getattr(self, f.name).gather(1, index)
            if value.dtype == torch.bool:
                value = value & ~fill
            else:
                value = value.masked_fill(fill, -1)
            out[f.name] = value
        return TokenLayout(**out)


def run_starts(mask: Tensor) -> Tensor:
    """``[batch, seq]`` bool: the first token of each contiguous run of ``mask`` (``[batch, seq]`` bool)."""
    return mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)


def last_index(mask: Tensor) -> Tensor:
    """``[batch]`` long: index of the last true entry of each row of ``mask`` (``[batch, seq]``), -1 for none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def spans_from_mask(visual: Tensor) -> Tensor:
    """Number each contiguous run of visual tokens within a sample: ``[batch, seq]`` long, -1 off runs."""
    run_id = run_starts(visual).long().cumsum(dim=1) - 1
    return run_id.masked_fill(~visual, -1)


def layout_from_ids(input_ids: Tensor, visual: Tensor, attention_mask: Tensor | None) -> TokenLayout:
    """The layout for a prompt whose visual tokens are ``visual`` (``[batch, seq]`` bool).

    The instruction of a sample is every valid token after its last visual token (the question
    and the assistant prefix of a chat template); samples without visual tokens have none.
    """
    batch, seq = input_ids.shape
    valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    last_visual = last_index(visual)  # [batch]
    has_visual = last_visual >= 0
    instruction = valid & ~visual & (positions > last_visual[:, None]) & has_visual[:, None]
    return TokenLayout(
        visual=visual & valid,
        instruction=instruction,
        valid=valid,
        original_index=positions.clone(),
        image_index=spans_from_mask(visual & valid),
    )
