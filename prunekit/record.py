"""What one forward pass leaves behind: the per-forward records the hooks read and write.

The Pruner and its vision stage keep no tensors on themselves: everything a forward builds lives
in one :class:`Running` slot, which the model pre-hook fills and the model post-hook empties.
Only a :class:`CacheRecord` outlives its forward, held weakly by KV-cache object so that decode
steps on a pruned cache find each stage's slots; it goes with the cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import ForwardContext
from prunekit.errors import LayoutError
from prunekit.probes import AttentionRows, Probe


@dataclass
class PromptRewrite:
    """How a vision stage shortened the prompt of one prefill (kept by the cache record too)."""

    columns: Tensor  # [batch, new_len] long: original prompt column of each new slot (0 on fill)
    fill: Tensor  # [batch, new_len] bool
    shift: Tensor  # [batch] long: real tokens removed
    original_length: int
    image_starts: Tensor  # [n_images] long: flat (batch * original_len) index of each image's first token
    sample_of_image: Tensor  # [n_images] long


@dataclass
class VisionRecord:
    """The vision stage's share of one forward: vision-tower captures and what the projector kept."""

    captures: dict[Probe, Any] = field(default_factory=dict)  # vision probe -> [n_images, tokens, ...] (read for
    # a vision block at the language model's input: a list, one [tokens, ...] tensor per image)
    kept_patches: Tensor | None = None  # [n_images, k] long: patches the projector kept, in order
    lead: int = 0  # merged tokens put before each image's kept patches
    features: Tensor | None = None  # [n_images, t, hidden]: the projector output (the shortened images)
    # a tower read for a vision block at the language model's input (Qwen2/2.5-VL): the running tower call's
    # per-patch pieces (probe -> one tensor per attention block, in order) and its grid_thw
    tower_pieces: dict[Probe, list[Tensor]] = field(default_factory=dict)
    tower_grid: Tensor | None = None


@dataclass
class StageRecord:
    """The sequence one stage left: which prefill token sits in each slot."""

    layer: int
    original_index: Tensor  # [batch, seq_s] long: prefill index of each slot, -1 on fill slots
    visual: Tensor  # [batch, seq_s] bool
    valid: Tensor  # [batch, seq_s] bool
    shift: Tensor  # [batch] long: real tokens fewer than the prompt (dropped minus merged) from this stage on
    where: str = "decoder"  # "vision": before the language model


@dataclass
class Prefill:
    """One prefill: the criteria's context, the current positions and each stage's record."""

    ctx: ForwardContext
    positions: Tensor | None  # [components, batch, seq] long: RoPE positions of the current sequence (set by
    # the language model's pre-hook; components is 1, or 3 for M-RoPE)
    visual_original: Tensor  # [batch] long: visual tokens entering the language model
    prompt_valid: Tensor  # [batch] long: real (non-padding) tokens of the prompt
    prompt_length: int
    cache: Any
    prompt_visual: Tensor | None = None  # [batch, prompt_length] bool: visual tokens of the prompt layer 0 receives
    prompt_max_position: Tensor | None = None  # [batch] long: largest RoPE position of the prompt
    rewrite: PromptRewrite | None = None  # how a vision stage shortened the prompt
    rewrite_visual: Tensor | None = None  # [batch, short_len] bool: visual tokens of the shortened prompt
    rewrite_valid: Tensor | None = None  # [batch, short_len] bool
    visual_before_vision: Tensor | None = None  # [batch] visual tokens before a vision stage
    layer_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer kind -> this stage's kwargs
    records: list[StageRecord] = field(default_factory=list)
    labels: dict[str, Tensor] = field(default_factory=dict)  # labels / shift_labels [batch, prompt_length], taken
    # from the call: the post-hook computes the loss on the rows that are kept
    loss_kwargs: dict[str, Any] = field(default_factory=dict)  # the call's other keyword arguments (for the loss)
    scoring_module: nn.Module | None = None  # the attention module a scoring pass is running
    scoring_rows: dict[int, Tensor] = field(default_factory=dict)  # id(projection) -> the token columns [n] long
    # it projects during the scoring pass (the others are zeros)
    scoring_probes: tuple[AttentionRows, ...] = ()
    # A later turn of a conversation: the pruned cache it continues and the turn's 2D mask over the unpruned
    # conversation [batch, past.seen + turn] bool. Its layout, records and report cover the turn's own tokens.
    past: CacheRecord | None = None
    past_mask: Tensor | None = None

    def past_stage_mask(self, stage: int) -> Tensor | None:
        """[batch, slots] bool: stage ``stage``'s cached slots a later turn attends to (None for a first prefill)."""
        return None if self.past is None else self.past.stage_mask(stage, self.past_mask)

    def past_moved(self, stage: int) -> Tensor:
        """[batch] long, a later turn only: how much further back stage ``stage`` put the cache's positions
        than the stage before it did (the turn's positions move back as much at that stage)."""
        records = self.past.records
        return records[stage].shift - (records[stage - 1].shift if stage > 0 else 0)


@dataclass
class CacheRecord:
    """What decode steps on a pruned KV cache need: the prompt length and each stage's slots.

    After a conversation's later turn (new visual tokens on this cache, pruned in their turn), the
    "prompt" is everything up to the end of that turn: each stage's slots over the whole conversation.
    """

    prompt_length: int
    records: list[StageRecord]
    seen: int  # tokens the cache has seen (prompt + decoded)
    rewrite: PromptRewrite | None = None
    decode_rows: list[Tensor] | None = None  # a decode block's last attention row over each sample's visual slots
    prompt_visual: Tensor | None = None  # [batch, prompt_length] bool: the prompt's visual tokens (unpruned)

    def prompt_record(self) -> StageRecord:
        """The slots of the layers before the first stage: the whole prompt, unpruned."""
        if self.prompt_visual is None:
            raise LayoutError("this cache's record does not know its prompt's visual tokens (a cache another "
                              "pruner filled); cut_earlier cannot cut the layers before the first stage")
        batch = self.prompt_visual.shape[0]
        index = torch.arange(self.prompt_length, device=self.prompt_visual.device).expand(batch, -1)
        return StageRecord(layer=0, original_index=index, visual=self.prompt_visual,
                           valid=torch.ones_like(self.prompt_visual), shift=torch.zeros_like(index[:, 0]))

    def stage_mask(self, stage: int, mask_2d: Tensor) -> Tensor:
        """[batch, slots]: which of stage ``stage``'s cached slots hold real tokens, given the 2D mask over
        the unpruned sequence ``mask_2d`` [batch, >= seen] (its decoded part is kept whole)."""
        return torch.cat([self.records[stage].valid, mask_2d[:, self.prompt_length:self.seen]], dim=1)

    def continued(self, mask_2d: Tensor, turn: list[StageRecord], turn_visual: Tensor | None) -> CacheRecord:
        """This record after a later turn whose stages left ``turn``: per stage, the cached slots, then the
        tokens decoded since, then the turn's kept slots (indices over the whole unpruned conversation).

        mask_2d: [batch, seen + turn_length] bool, the 2D mask of the turn's forward; turn_visual: [batch,
        turn_length] bool, the turn's visual tokens.
        """
        turn_length = mask_2d.shape[1] - self.seen
        decoded = torch.arange(self.prompt_length, self.seen, device=mask_2d.device)  # [decoded]
        records = []
        for stage, (past, new) in enumerate(zip(self.records, turn)):
            batch = past.valid.shape[0]
            decoded_index = decoded[None].expand(batch, -1)  # [batch, decoded]
            index = torch.cat([past.original_index, decoded_index,
                               torch.where(new.original_index >= 0, new.original_index + self.seen, -1)], dim=1)
            records.append(StageRecord(
                layer=past.layer, original_index=index, where=past.where, shift=new.shift,
                visual=torch.cat([past.visual, torch.zeros_like(decoded_index, dtype=torch.bool), new.visual], dim=1),
                valid=torch.cat([self.stage_mask(stage, mask_2d), new.valid], dim=1),
            ))
        total = self.seen + turn_length
        prompt_visual = None
        if self.prompt_visual is not None and turn_visual is not None:
            between = torch.zeros(turn_visual.shape[0], self.seen - self.prompt_length, dtype=torch.bool,
                                  device=turn_visual.device)  # decoded tokens
            prompt_visual = torch.cat([self.prompt_visual, between, turn_visual], dim=1)
        return CacheRecord(prompt_length=total, records=records, seen=total, rewrite=self.rewrite,
                           prompt_visual=prompt_visual)


@dataclass
class Decode:
    """One decode step on a pruned cache."""

    cached: CacheRecord
    mask_2d: Tensor  # [batch, seen + q] bool
    positions: Tensor | None  # [components, batch, q] long (set by the language model's pre-hook)
    cache: Any
    layer_kwargs: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)  # (stage, kind) -> kwargs
    selection: tuple[int, Tensor] | None = None  # a decode block's (stage, [batch, slots] bool kept slots) this step
    columns: dict[tuple, Tensor] = field(default_factory=dict)  # decode blocks / cut_earlier: [batch, kv] keys read


@dataclass
class Running(threading.local):
    """The records of the forward now running on one pruned model (empty between forwards).

    ``vision`` may start before ``forward``: ``generate`` can encode images before the model's
    first forward call, and the vision tower runs before the model pre-hook sees the prompt.
    The records are the calling thread's own (a ``threading.local``): threads that call one
    pruned model at once each see their own forward, in every hook and in the attention tap.
    """

    forward: Prefill | Decode | None = None
    vision: VisionRecord | None = None

    def prefill(self) -> Prefill | None:
        """The running prefill, or None (no forward, or a decode step)."""
        return self.forward if isinstance(self.forward, Prefill) else None

    def vision_record(self) -> VisionRecord:
        """The vision record of this forward, started on first use."""
        if self.vision is None:
            self.vision = VisionRecord()
        return self.vision

    def clear(self) -> None:
        self.forward = None
        self.vision = None


def max_position(positions: Tensor, valid: Tensor) -> Tensor:
    """Largest position (over components and real tokens) of each sample: [batch]."""
    return positions.masked_fill(~valid[None], -1).amax(dim=(0, 2))
