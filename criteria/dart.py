"""DART: keep the visual tokens that duplicate a few pivot tokens least."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from prunekit.api import Criterion, ForwardContext
from prunekit.errors import RecipeError
from prunekit.probes import DecoderKeys, LayerInput, Probe


@dataclass
class DART(Criterion):
    """DART (Wen et al., 2025, "Stop looking for important tokens: duplication matters more").

    At a prune layer ``K``: the pivots are the ``pivot_image`` visual tokens and the ``pivot_text``
    instruction tokens whose keys at layer ``K - 1`` (after RoPE, all heads side by side) have the
    largest L1 norm. Each pivot in turn takes the ``T`` visual tokens least cosine-similar to it (on
    the hidden states entering layer ``K``, through the decoder's final norm) among those no pivot
    took yet; the kept set is the image pivots and every pick, ``T = (k - pivot_image) //
    (pivot_image + pivot_text)`` for the stage's keep count ``k`` (the official 128-token setting
    keeps ``4 + 8 * 16 = 132``). Pivots are visited in the order of a Python set of their prompt
    positions, as the official code visits them. Scores rank the kept tokens first (in selection
    order); if ``k`` leaves room, the other visual tokens follow, least similar to any pivot first.

    Example::

        criteria: {dart: {type: dart, pivot_image: 4, pivot_text: 4}}
        schedule: {type: stages, stages: [{layer: 2, count: 132}]}
    """

    name: ClassVar[str] = "dart"
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self) -> None:
        for field_name in ("pivot_image", "pivot_text"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RecipeError(f"dart: {field_name}={value!r} is invalid; it must be an integer >= 0")
        if self.pivot_image + self.pivot_text == 0:
            raise RecipeError("dart: pivot_image + pivot_text is 0; DART needs at least one pivot token")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        if 0 in stage_layers:
            raise RecipeError("dart reads the keys of the layer before its prune layer; a stage at layer 0 has "
                              "none (valid prune layers: 1 and later)")
        return [p for layer in stage_layers for p in (DecoderKeys(layer - 1), LayerInput(layer, final_norm=True))]

    def observe(self, ctx: ForwardContext, probe: Probe, inputs: Tensor, output: Tensor | None) -> None:
        ctx.buffers[f"{self.key}/hidden{probe.layer}"] = inputs.detach()

    def score(self, ctx: ForwardContext) -> Tensor:
        hidden = ctx.buffers.pop(f"{self.key}/hidden{ctx.layer}")  # [batch, seq, dim], final-normed
        keys = ctx.capture(DecoderKeys(ctx.layer - 1))  # [batch, seq, kv_heads * head_dim]
        layout = ctx.layout
        scores = torch.zeros(layout.batch_size, layout.seq_len, dtype=torch.float64, device=hidden.device)
        for b in range(layout.batch_size):
            keep = int(ctx.keep_counts[b]) if ctx.keep_counts is not None else int(layout.visual[b].sum())
            order = self._order(hidden[b], keys[b], layout.visual[b], layout.instruction[b], layout.valid[b], keep)
            n = len(order)
            scores[b, torch.tensor(order, dtype=torch.long, device=hidden.device)] = torch.arange(
                n, 0, -1, dtype=torch.float64, device=hidden.device)
        return scores

    def _order(self, hidden: Tensor, keys: Tensor, visual: Tensor, instruction: Tensor, valid: Tensor,
               keep: int) -> list[int]:
        """One sample's visual slots, kept ones first in selection order (slots of the current sequence)."""
        first = int(valid.nonzero()[0])  # positions below count from the sample's first real token
        visual_slots, text_slots = visual.nonzero().flatten(), instruction.nonzero().flatten()
        l1 = keys.abs().sum(dim=-1)  # [seq]
        image_pivots = (visual_slots[l1[visual_slots].topk(min(self.pivot_image, len(visual_slots))).indices]
                        - first).tolist()
        text_pivots = (text_slots[l1[text_slots].topk(min(self.pivot_text, len(text_slots))).indices]
                       - first).tolist()
        per_pivot = max(keep - len(image_pivots), 0) // max(len(image_pivots) + len(text_pivots), 1)
        chosen = set(image_pivots + text_pivots)
        remaining = set((visual_slots - first).tolist()) - set(image_pivots)
        remaining_list = list(remaining)
        picks: list[int] = []
        for pivot in list(chosen):  # a Python set's order, as the official code iterates it
            take = min(per_pivot, len(remaining_list))
            if take == 0:
                break
            similarity = -F.cosine_similarity(hidden[pivot + first], hidden[[r + first for r in remaining_list]],
                                              dim=-1)
            taken = [remaining_list[i] for i in similarity.topk(take).indices.tolist()]
            picks += taken
            chosen.update(taken)
            remaining.difference_update(taken)
            remaining_list = list(remaining)
        kept = image_pivots + picks
        if remaining_list and (image_pivots or text_pivots):  # the rest, least similar to any pivot first (beyond the official count)
            pivots = hidden[[p + first for p in image_pivots + text_pivots]]  # [pivots, dim]
            rest = hidden[[r + first for r in remaining_list]]  # [rest, dim]
            closest = F.cosine_similarity(rest[:, None], pivots[None], dim=-1).amax(dim=1)  # [rest]
            kept += [remaining_list[i] for i in closest.argsort(stable=True).tolist()]
        return [p + first for p in kept]
