"""What the last prefill kept: :class:`PruneReport`, built from one forward's records."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from prunekit.record import Prefill, StageRecord, VisionRecord
from prunekit.vision import original_positions


@dataclass
class StageReport:
    """What one stage of the last prefill kept.

    "Original positions" are column indices into the ``input_ids`` the model was called with
    (padding included: with left padding, sample ``b``'s first real token is at ``pad_b``).
    """

    layer: int  # first decoder layer that runs on the reduced sequence (0-based)
    kept: Tensor  # [batch, n_kept] long: original positions of the kept visual tokens, sorted; -1 pads short rows
    kept_counts: Tensor  # [batch] long: kept visual tokens per sample (input tokens, not merged ones)
    sequence_lengths: Tensor  # [batch] long: real tokens per sample from this layer on
    merged_counts: Tensor  # [batch] long: merged summary tokens per sample from this layer on
    where: str = "decoder"  # "vision": a stage before the language model (``layer`` is then 0)


@dataclass
class PruneReport:
    """The last prefill: one :class:`StageReport` per stage and the tokens every decoder layer saw."""

    stages: list[StageReport]
    visual_tokens: Tensor  # [batch] long: visual tokens per sample before pruning
    tokens_per_layer: list[int]  # sequence length (the batch tensor's) of every decoder layer
    real_tokens_per_layer: Tensor  # [batch, num_layers] long: non-padding tokens per sample and layer
    visual_tokens_per_layer: Tensor  # [batch, num_layers] long: visual tokens per sample and layer
    # [batch, seq_out] long: original position (column of the input_ids the model was called with) of each
    # row of the output (logits, last hidden states); -1 on fill slots and merged tokens. With
    # ``logits_to_keep`` the logits are the last columns of this map.
    output_positions: Tensor | None = None

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i: int) -> StageReport:
        return self.stages[i]

    def __iter__(self):
        return iter(self.stages)


def stage_report(record: StageRecord) -> StageReport:
    """One stage's report: its kept input tokens by original position, sorted."""
    big = torch.iinfo(torch.long).max
    original = record.visual & (record.original_index >= 0)  # [batch, seq_s]: kept input tokens
    kept_counts = original.sum(dim=1)  # [batch]
    width = int(kept_counts.max().item()) if kept_counts.numel() else 0
    kept = torch.where(original, record.original_index, big).sort(dim=1).values[:, :width]
    return StageReport(record.layer, kept.masked_fill(kept == big, -1), kept_counts, record.valid.sum(dim=1),
                       (record.visual & ~original).sum(dim=1), record.where)


def with_vision_stage(prefill: Prefill, vision: VisionRecord | None) -> list[StageRecord]:
    """The prefill's stage records, led by the vision stage's when one shortened the prompt; every
    index is mapped back onto the original prompt's columns."""
    if prefill.rewrite is None:
        return list(prefill.records)
    origin = original_positions(prefill.rewrite, prefill.rewrite_visual, vision)  # [batch, short_len]
    first = StageRecord(layer=0, original_index=origin, visual=prefill.rewrite_visual, valid=prefill.rewrite_valid,
                        shift=prefill.rewrite.shift, where="vision")
    return [first] + [
        dataclasses.replace(r, original_index=torch.where(
            r.original_index >= 0, origin.gather(1, r.original_index.clamp(min=0)), -1))
        for r in prefill.records
    ]


def build_report(prefill: Prefill, vision: VisionRecord | None, stage_of_layer: Sequence[int]) -> PruneReport:
    """The report of one prefill; ``stage_of_layer[i]``: the decoder stage layer ``i`` runs in (-1 before the first)."""
    records = with_vision_stage(prefill, vision)
    stages = [stage_report(record) for record in records]
    offset = len(records) - len(prefill.records)  # 1 when a vision stage leads
    tokens_per_layer = [prefill.prompt_length if s < 0 else prefill.records[s].original_index.shape[1]
                        for s in stage_of_layer]
    real = torch.stack([prefill.prompt_valid if s < 0 else stages[s + offset].sequence_lengths
                        for s in stage_of_layer], dim=1)  # [batch, num_layers]
    visual = torch.stack([prefill.visual_original if s < 0 else stages[s + offset].kept_counts
                          + stages[s + offset].merged_counts for s in stage_of_layer], dim=1)  # [batch, num_layers]
    before = prefill.visual_before_vision if prefill.visual_before_vision is not None else prefill.visual_original
    return PruneReport(stages, before, tokens_per_layer, real, visual, records[-1].original_index)
