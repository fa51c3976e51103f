"""A recipe's ``decode`` block: decode steps that attend to a per-step selection of the cached visual tokens.

DyCoke's second half (dynamic KV-cache pruning). In each decode step of a pruned cache:

1. the attention tap reads the new token's attention row at layer ``L - 1`` (softmax over every key it
   may see, mean over heads) and keeps its entries over the cached visual slots;
2. unless that row's cosine with the previous step's is at least ``similar``, the step selects the
   ``int(n * (1 - prune))`` most attended of the ``n`` visual slots (``torch.topk``: a set);
3. layers ``L`` and later get an attention mask without the visual slots the step left out; the cache
   keeps every slot, so the next step may select others.

A step that does not select attends to every cached visual token (the official code's rule). The mask
hides columns; it does not shorten the keys, so the step costs what it cost before (transformers'
attention runs over the whole cache either way).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.api import Adapter
from prunekit.errors import AdapterError, LayoutError, RecipeError
from prunekit.hooks import HookSet
from prunekit.recipe import DecodeSelection
from prunekit.record import CacheRecord, Decode, Running


def new_token_row(query: Tensor, key: Tensor, mask: Any, scaling: float) -> Tensor:
    """The last query's softmax attention row, mean over heads: ``[batch, kv]`` (float32; float64 models: float64).

    query: [batch, heads, q, head_dim], key: [batch, kv_heads, kv, head_dim], both after RoPE; mask: the
    layer's attention mask (None, a bool ``[batch, 1, q, kv]`` with True where attended, or an additive one).
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query[:, :, -1:].to(dtype).reshape(batch, kv_heads, heads // kv_heads, head_dim)  # GQA groups side by side
    logits = torch.matmul(q, key.to(dtype).transpose(-1, -2)) * scaling  # [batch, kv_heads, group, kv]
    logits = logits.reshape(batch, heads, -1)  # [batch, heads, kv]
    if isinstance(mask, Tensor):
        last = mask[:, 0, -1, : logits.shape[-1]]  # [batch, kv]
        logits = logits.masked_fill(~last[:, None], float("-inf")) if last.dtype == torch.bool else \
            logits + last[:, None].to(dtype)
    return torch.softmax(logits, dim=-1).mean(dim=1)  # [batch, kv]


def select_slots(row: Tensor, visual: Tensor, previous: list[Tensor] | None, selection: DecodeSelection
                 ) -> tuple[Tensor, list[Tensor]]:
    """Which visual slots this step keeps, and each sample's row over its visual slots (the next step's previous).

    row: [batch, kv] (the cached slots first), visual: [batch, slots] bool (real visual slots). Returns
    ``keep`` [batch, slots] bool (True off the visual slots, and on every slot of a sample whose step keeps all).
    """
    keep = torch.ones_like(visual)
    rows = []
    if previous is not None and len(previous) != visual.shape[0]:  # the batch changed: no previous rows
        previous = None
    for b in range(visual.shape[0]):
        slots = visual[b].nonzero().flatten()  # [n]
        vector = row[b, slots]  # [n]: the visual part of the row, in slot order
        rows.append(vector)
        similar = 0.0 if previous is None or previous[b].shape != vector.shape else \
            float(F.cosine_similarity(vector, previous[b], dim=0))
        if selection.similar is not None and similar >= selection.similar:
            continue
        count = int(len(slots) * (1 - selection.prune))
        chosen = torch.topk(vector, count, sorted=False).indices  # [count]
        keep[b, slots] = False
        keep[b, slots[chosen]] = True
    return keep, rows


def masked(mask: Any, keep_columns: Tensor, dtype: torch.dtype) -> Tensor:
    """The layer's attention mask with the columns ``keep_columns`` ([batch, kv] bool) leaves out hidden.

    A mask over fewer keys belongs to a sliding-window cache that kept the latest ones: it meets the last columns.
    """
    if mask is not None:
        if mask.shape[-1] > keep_columns.shape[-1]:
            raise LayoutError(f"a decode block expected at most {keep_columns.shape[-1]} keys, the layer's "
                              f"attention mask covers {mask.shape[-1]}")
        keep_columns = keep_columns[:, keep_columns.shape[-1] - mask.shape[-1]:]
    hide = ~keep_columns[:, None, None, :]  # [batch, 1, 1, kv]
    if mask is None:
        return torch.zeros(hide.shape, dtype=dtype, device=hide.device).masked_fill(hide, torch.finfo(dtype).min)
    if mask.dtype == torch.bool:
        return mask & ~hide
    return mask.masked_fill(hide, torch.finfo(mask.dtype).min)


class EarlierCacheCut:
    """Stages with ``cut_earlier``: in each decode step the layers before such a stage attend to the cached visual
    tokens it kept only (an attention mask over their caches, which keep every token)."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: Sequence[nn.Module], stage_layers: Sequence[int],
                 cuts: Sequence[int], running: Running, stage_of_layer: Sequence[int]) -> None:
        self.adapter = adapter
        self.layers = list(layers)
        self.running = running
        self.stage_of_layer = list(stage_of_layer)
        self.cut_of_layer = {}  # layer -> the stage whose kept visual tokens it reads (the nearest cut after it)
        if any(stage_layers[stage] == 0 for stage in cuts):
            raise RecipeError("cut_earlier on the stage before layer 0: no layer comes before it")
        for stage in sorted(cuts, reverse=True):
            for layer in range(stage_layers[stage]):
                self.cut_of_layer[layer] = stage
        if self.cut_of_layer and min(stage_layers) != 0:
            raise RecipeError(f"cut_earlier at the stage before layer {stage_layers[min(cuts)]} needs a stage before "
                              f"layer 0 (the layers before the first stage cache the unpruned prompt); the first "
                              f"stage prunes before layer {min(stage_layers)}")
        _refuse_flash(adapter, model, "cut_earlier")
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}

    def install(self, hooks: HookSet) -> None:
        for layer in sorted(self.cut_of_layer):
            hooks.add(self.layers[layer].register_forward_pre_hook(self._mask_hook, with_kwargs=True))

    def _mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        decode = self.running.forward
        if type(decode) is not Decode:
            return None
        layer = self._index[id(module)]
        cached = decode.cached
        cut, own = cached.records[self.cut_of_layer[layer]], cached.records[self.stage_of_layer[layer]]
        kept = torch.where(cut.visual, cut.original_index, -2)  # [batch, slots_cut]: the cut's kept visual tokens
        read = (own.original_index[:, :, None] == kept[:, None, :]).any(dim=-1)  # [batch, slots]
        keep = ~own.visual | read
        kv = keep.shape[1] + (cached.seen - cached.prompt_length) + (decode.mask_2d.shape[1] - cached.seen)
        columns = torch.ones(keep.shape[0], kv, dtype=torch.bool, device=keep.device)
        columns[:, : keep.shape[1]] = keep
        kwargs["attention_mask"] = masked(kwargs.get("attention_mask"), columns,
                                          self.adapter.layer_input(args, kwargs).dtype)
        return args, kwargs


def _refuse_flash(adapter: Adapter, model: nn.Module, what: str) -> None:
    implementation = str(getattr(adapter.language_model(model).config, "_attn_implementation", "") or "")
    if "flash" in implementation:
        raise AdapterError(f"{what} hides cached columns with an attention mask, which {implementation!r} does not "
                           "take; load the model with attn_implementation='sdpa' or 'eager'")


class DecodeSelector:
    """Installs a ``decode`` block: the tap that reads layer ``L - 1``'s row and the mask hooks of layers ``L``..."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: Sequence[nn.Module], selection: DecodeSelection,
                 running: Running, stage_of_layer: Sequence[int]) -> None:
        self.model = model
        self.adapter = adapter
        self.layers = list(layers)
        self.selection = selection
        self.running = running
        self.stage_of_layer = list(stage_of_layer)
        self.read_layer = selection.layer - 1
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        _refuse_flash(adapter, model, "a decode block")

    def install(self, hooks: HookSet) -> None:
        """Into the pruner's ``hooks`` (removed with them, last installed first: the tap wraps the pruner's)."""
        reading = self.adapter.attention(self.layers[self.read_layer])
        hooks.tap(self.adapter.language_model(self.model).config,
                  lambda module, query, key, kwargs: self._read(module, query, key, kwargs, reading))
        for layer in self.layers[self.selection.layer:]:  # after the engine's own decode hooks on these layers
            hooks.add(layer.register_forward_pre_hook(self._mask_hook, with_kwargs=True))

    def _read(self, module: nn.Module, query: Tensor, key: Tensor, kwargs: dict, reading: nn.Module) -> None:
        decode = self.running.forward
        if module is not reading or type(decode) is not Decode:
            return
        cached: CacheRecord = decode.cached
        stage = self.stage_of_layer[self.read_layer]
        record = cached.records[stage]
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        with torch.no_grad():
            row = new_token_row(query, key, kwargs.get("attention_mask"), scaling)  # [batch, kv]
            expected = record.visual.shape[1] + (cached.seen - cached.prompt_length) + \
                (decode.mask_2d.shape[1] - cached.seen)
            if row.shape[1] < expected:  # a sliding-window cache kept the latest keys only: the rest weigh 0
                row = F.pad(row, (expected - row.shape[1], 0))
            keep, cached.decode_rows = select_slots(row, record.visual & record.valid, cached.decode_rows,
                                                    self.selection)
        decode.selection = (stage, keep)

    def _mask_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        decode = self.running.forward
        if type(decode) is not Decode or decode.selection is None:
            return None
        read_stage, keep = decode.selection
        stage = self.stage_of_layer[self._index[id(module)]]
        record = decode.cached.records[stage]
        if stage != read_stage:  # the slots of a later stage: kept unless a visual slot the step left out
            source = decode.cached.records[read_stage]
            left_out = torch.where(source.visual & ~keep, source.original_index, -2)  # [batch, slots_read]
            hidden = (record.original_index[:, :, None] == left_out[:, None, :]).any(dim=-1)
            keep = ~(hidden & record.visual)
        mask = kwargs.get("attention_mask")
        cached = decode.cached  # the stage's slots, the tokens decoded since the prompt, this step's
        kv = keep.shape[1] + (cached.seen - cached.prompt_length) + (decode.mask_2d.shape[1] - cached.seen)
        columns = torch.ones(keep.shape[0], kv, dtype=torch.bool, device=keep.device)
        columns[:, : keep.shape[1]] = keep
        hidden_states = self.adapter.layer_input(args, kwargs)
        kwargs["attention_mask"] = masked(mask, columns, hidden_states.dtype)
        return args, kwargs
