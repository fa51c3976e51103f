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

from prunekit.api import Adapter, Stage
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


def slots_holding(record: Any, source: Any, chosen: Tensor) -> Tensor:
    """Which of ``record``'s slots hold a token that ``chosen`` (``[batch, source slots]`` bool) marks among
    ``source``'s slots: ``[batch, record slots]`` bool, matched by prefill index (two stages' records)."""
    if record is source:
        return chosen
    span = int(max(record.original_index.max(), source.original_index.max())) + 2  # -1 (fill) goes to the last
    marked = torch.zeros(chosen.shape[0], span, dtype=torch.bool, device=chosen.device)
    marked.scatter_(1, torch.where(chosen, source.original_index, span - 1), True)
    marked[:, -1] = False
    return marked.gather(1, torch.where(record.original_index >= 0, record.original_index, span - 1))


def step_keys(decode: Decode, slots: int) -> int:
    """The keys of a layer whose stage caches ``slots`` prompt slots, in a decode step: those, every token decoded
    since the prompt, and this step's."""
    cached = decode.cached
    return slots + (cached.seen - cached.prompt_length) + (decode.mask_2d.shape[1] - cached.seen)


def step_columns(decode: Decode, keep: Tensor) -> Tensor:
    """``[batch, kv]`` bool over one layer's keys in a decode step: ``keep`` on its stage's cached slots, then
    every token decoded since the prompt and this step's."""
    kv = step_keys(decode, keep.shape[1])
    columns = torch.ones(keep.shape[0], kv, dtype=torch.bool, device=keep.device)
    columns[:, : keep.shape[1]] = keep
    return columns


def _with_columns(args: tuple, kwargs: dict, columns: Tensor) -> tuple[tuple, dict]:
    """The layer call with its attention mask narrowed to ``columns``."""
    dtype = (args[0] if args else kwargs["hidden_states"]).dtype  # the layer's own hidden states
    kwargs["attention_mask"] = masked(kwargs.get("attention_mask"), columns, dtype)
    return args, kwargs


class EarlierCacheCut:
    """Stages with ``cut_earlier``: in each decode step the layers before such a stage (from its ``cut_from`` on)
    attend to the cached visual tokens it kept only (an attention mask over their caches, which keep every token).
    Layers before the first stage cache the whole prompt; they are cut the same way."""

    def __init__(self, model: nn.Module, adapter: Adapter, layers: Sequence[nn.Module], stages: Sequence[Stage],
                 cuts: Sequence[int], running: Running, stage_of_layer: Sequence[int]) -> None:
        self.layers = list(layers)
        self.running = running
        self.stage_of_layer = list(stage_of_layer)
        self.cut_of_layer = {}  # layer -> the stage whose kept visual tokens it reads (the nearest cut after it)
        if any(stages[stage].layer == 0 for stage in cuts):
            raise RecipeError("cut_earlier on the stage before layer 0: no layer comes before it")
        for stage in sorted(cuts, reverse=True):
            for layer in range(stages[stage].cut_from, stages[stage].layer):
                self.cut_of_layer[layer] = stage
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
        key = ("cut", self.cut_of_layer[layer], self.stage_of_layer[layer])
        if key not in decode.columns:  # once per step for the layers that share a cut and a stage
            cached = decode.cached
            cut = cached.records[key[1]]
            own = cached.records[key[2]] if key[2] >= 0 else cached.prompt_record()
            keep = ~own.visual | slots_holding(own, cut, cut.visual)  # [batch, slots]: the cut's kept visual tokens
            decode.columns[key] = step_columns(decode, keep)
        return _with_columns(args, kwargs, decode.columns[key])


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
            expected = step_keys(decode, record.visual.shape[1])
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
        key = ("select", self.stage_of_layer[self._index[id(module)]])
        if key not in decode.columns:  # once per step for the layers of one stage
            source, record = decode.cached.records[read_stage], decode.cached.records[key[1]]
            left_out = slots_holding(record, source, source.visual & ~keep)  # [batch, slots]
            decode.columns[key] = step_columns(decode, ~(left_out & record.visual))
        return _with_columns(args, kwargs, decode.columns[key])
