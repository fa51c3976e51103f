"""The Pruner: forward hooks that prune visual tokens inside a Hugging Face model, per a recipe.

One prefill, as the hooks see it:

1. model pre-hook: find the visual tokens and the instruction (the adapter's ``TokenLayout``);
   with a vision stage, shorten each image's placeholders (``prunekit.vision``).
2. decoder-stack pre-hook: read the RoPE positions the stack will use (M-RoPE included).
3. ModuleIO / LayerInput probes: forward hooks hand module inputs and outputs to the criteria
   that asked (TTV accumulates there).
4. AttentionRows probes: the attention tap computes a few softmax rows from the layer's own
   query/key; at a prune layer a scoring pass runs that layer's attention on the unpruned input.
5. prune layer pre-hook: criteria score, the combiner merges, the top tokens (and any merged
   summary tokens) become the new sequence; the hidden states, the layout and every buffer
   follow; the adapter builds the layer's mask and position embeddings for it, once per layer
   kind. Later layers reuse them.
6. model post-hook: the report of what was kept; each stage's slots are remembered by KV-cache
   object so that decode steps get masks and positions that fit every layer's cache.

The Pruner keeps no tensors between forwards except that per-cache decode record, which lives
only as long as the cache does.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
import weakref
from contextlib import contextmanager, nullcontext
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, ForwardContext, Stage
from prunekit.attention import attention_rows, query_weights
from prunekit.compat import CACHE_NAMES, cache_in, cache_of
from prunekit.hooks import HookSet
from prunekit.errors import AdapterError, LayoutError, PrunerStateError, RecipeError, valid_list
from prunekit.plugins import get_registry
from prunekit.probes import QUERY_SETS, AttentionRows, LayerInput, ModuleIO, Probe
from prunekit.recipe import Recipe, RecipeSource, load_recipe, resolve_stages, scale_to_depth
from prunekit.sequence import Assembly, assemble, gather_tokens, select
from prunekit.vision import ProjectorStage, PromptRewrite, rewrite_decode_kwargs

class Clock:
    """Wall time spent in each part of the pruning work, summed over forwards (``measure=True``)."""

    PARTS = ("probes", "attention rows", "scoring", "selection", "stage inputs")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {part: 0.0 for part in self.PARTS}

    @contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    def reset(self) -> None:
        self.seconds = {part: 0.0 for part in self.PARTS}

    @property
    def total(self) -> float:
        return sum(self.seconds.values())


_NO_CLOCK = nullcontext()


# One active pruner per model: a registry, so that a second apply() is a clear error.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Pruner] = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------
@dataclass
class StageReport:
    """What one stage of the last prefill kept."""

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

    def __len__(self) -> int:
        return len(self.stages)

    def __getitem__(self, i: int) -> StageReport:
        return self.stages[i]

    def __iter__(self):
        return iter(self.stages)


# ----------------------------------------------------------------------------------------------
# Per-forward state
# ----------------------------------------------------------------------------------------------
class _ScoringPassDone(Exception):
    """Raised by the attention tap once a scoring pass has what it needs."""


@dataclass
class _StageRecord:
    layer: int
    original_index: Tensor  # [batch, seq_s] long: prefill index of each slot, -1 on fill slots
    visual: Tensor  # [batch, seq_s] bool
    valid: Tensor  # [batch, seq_s] bool
    shift: Tensor  # [batch] long: real tokens fewer than the prompt (dropped minus merged) from this stage on
    where: str = "decoder"  # "vision": before the language model


@dataclass
class _Prefill:
    ctx: ForwardContext
    positions: Tensor | None  # [components, batch, seq] long: RoPE positions of the current sequence (set by
    # the language model's pre-hook; components is 1, or 3 for M-RoPE)
    visual_original: Tensor  # [batch] long
    prompt_valid: Tensor  # [batch] long: real (non-padding) tokens of the prompt
    prompt_length: int
    cache: Any
    prompt_max_position: Tensor | None = None  # [batch] long: largest RoPE position of the prompt
    rewrite: PromptRewrite | None = None  # how a vision stage shortened the prompt
    rewrite_visual: Tensor | None = None  # [batch, short_len] bool: visual tokens of the shortened prompt
    rewrite_valid: Tensor | None = None  # [batch, short_len] bool
    visual_before_vision: Tensor | None = None  # [batch] visual tokens before a vision stage
    stage_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer kind -> kwargs of this stage
    records: list[_StageRecord] = field(default_factory=list)
    scoring_module: nn.Module | None = None
    scoring_probes: tuple[AttentionRows, ...] = ()


@dataclass
class _Session:
    """What decode steps on a pruned KV cache need: the prompt length and each stage's slots."""

    prompt_length: int
    records: list[_StageRecord]
    seen: int  # tokens the cache has seen (prompt + decoded)
    rewrite: PromptRewrite | None = None


@dataclass
class _Decode:
    session: _Session
    mask_2d: Tensor  # [batch, seen + q] bool
    positions: Tensor | None  # [components, batch, q] long (set by the language model's pre-hook)
    cache: Any
    stage_kwargs: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# The Pruner
# ----------------------------------------------------------------------------------------------
class Pruner:
    """Prunes a model's visual tokens per a recipe while installed.

    Use :func:`apply`; as a context manager the hooks go when the block ends, also on error::

        with prunekit.apply(model, "transprune-high") as pruner:
            out = model.generate(**inputs, max_new_tokens=32)
        pruner.last_report.stages[0].kept   # [batch, n_kept] original positions
    """

    def __init__(self, model: nn.Module, recipe: Recipe, measure: bool = False) -> None:
        self.model = model
        self.clock: Clock | None = Clock() if measure else None
        self.adapter: Adapter = _find_adapter(model, recipe.adapter)
        self.layers: list[nn.Module] = list(self.adapter.decoder_layers(model))
        self.num_layers = len(self.layers)
        self.recipe = scale_to_depth(recipe, self.num_layers)
        recipe = self.recipe
        self.stages: list[Stage] = _check_stages(recipe, self.num_layers, model)
        self.stage_layers = tuple(s.layer for s in self.stages)
        self.last_report: PruneReport | None = None
        self._hooks = HookSet()
        self._state: _Prefill | _Decode | None = None
        self._sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()
        self._installed = False
        self._removed = False
        self._signature = inspect.signature(model.forward)
        self._var_keyword = next((p.name for p in self._signature.parameters.values()
                                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._vision = None if recipe.vision is None else ProjectorStage(model, self.adapter, recipe.vision)

        probes = _collect_probes(recipe, self.stage_layers, self.num_layers)
        self._io_observers: dict[tuple[int, str], list[tuple[Any, ModuleIO]]] = defaultdict(list)
        self._rows_before: dict[int, list[AttentionRows]] = defaultdict(list)  # scoring pass at a prune layer
        self._rows_during: dict[int, list[AttentionRows]] = defaultdict(list)  # captured as the layer runs
        self._input_observers: dict[int, list[tuple[Any, LayerInput]]] = defaultdict(list)
        for criterion, probe in probes:
            if isinstance(probe, ModuleIO):
                self._io_observers[(probe.layer, probe.module)].append((criterion, probe))
            elif isinstance(probe, LayerInput):
                self._input_observers[probe.layer].append((criterion, probe))
            elif probe.layer in self.stage_layers:
                if probe not in self._rows_before[probe.layer]:
                    self._rows_before[probe.layer].append(probe)
            elif probe not in self._rows_during[probe.layer]:
                self._rows_during[probe.layer].append(probe)
        self._attention_layer = {id(self.adapter.attention(layer)): i for i, layer in enumerate(self.layers)}
        # stage index of every layer (-1 before the first prune)
        self._stage_of_layer = [max((s for s, L in enumerate(self.stage_layers) if L <= i), default=-1)
                                for i in range(self.num_layers)]

    def _timed(self, part: str):
        return self.clock(part) if self.clock is not None else _NO_CLOCK

    # -- lifecycle -------------------------------------------------------------------------
    def install(self) -> Pruner:
        if self._removed:
            raise PrunerStateError("this pruner was removed; call prunekit.apply(model, recipe) again")
        if self._installed:
            return self
        active = _ACTIVE.get(self.model)
        if active is not None:
            raise PrunerStateError(
                f"the model already has an active pruner (recipe {active.recipe.name!r}); "
                "leave its `with` block or call .remove() before applying another"
            )
        _ACTIVE[self.model] = self
        self._installed = True
        try:
            self._install_hooks()
        except BaseException:
            self.remove()
            raise
        return self

    def _install_hooks(self) -> None:
        add = self._hooks.add
        add(self.model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        add(self.model.register_forward_hook(self._after_model, with_kwargs=True, always_call=True))
        if self._vision is not None:
            self._vision.install()
        language_model = self.adapter.language_model(self.model)
        add(language_model.register_forward_pre_hook(self._before_language_model, with_kwargs=True))
        first = self.stage_layers[0] if self.stage_layers else self.num_layers
        for i in range(first, self.num_layers):
            add(self.layers[i].register_forward_pre_hook(self._layer_pre_hook(i), with_kwargs=True))
        for layer in self._input_observers:  # at a prune layer _prune delivers them, before scoring
            if layer in self.stage_layers:
                continue
            add(self.layers[layer].register_forward_pre_hook(self._input_hook(layer), with_kwargs=True))
        for (layer, kind) in self._io_observers:
            layer_module = self.layers[layer]
            module = self.adapter.attention(layer_module) if kind == "attention" else self.adapter.mlp(layer_module)
            add(module.register_forward_hook(self._io_hook(layer, kind), with_kwargs=True))
        if self._rows_before or self._rows_during:
            self._hooks.tap(self.adapter.language_model(self.model).config, self._on_attention)

    def remove(self) -> None:
        """Remove every hook and restore the attention implementation. Safe to call twice."""
        self._hooks.remove()
        if self._vision is not None:
            self._vision.remove()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._state = None
        self._sessions = weakref.WeakKeyDictionary()
        self._removed = True

    def __enter__(self) -> Pruner:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- model-level hooks -----------------------------------------------------------------
    def _call_kwargs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The forward call's arguments by name (positional ones and ``**kwargs`` included)."""
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        call = {k: v for k, v in bound.items() if k != self._var_keyword}
        call.update(bound.get(self._var_keyword, {}) if self._var_keyword else {})
        return call

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._state = None
        call = self._call_kwargs(args, kwargs)
        cache = cache_in(call)
        session = self._sessions.get(cache) if cache is not None else None
        input_ids: Tensor | None = call.get("input_ids")
        mask = call.get("attention_mask")
        positions = call.get("position_ids")
        if session is not None:
            changed = None
            if session.rewrite is not None:  # the prompt was shortened before the language model
                mask, positions = rewrite_decode_kwargs(session.rewrite, mask, positions)
                changed = ((), {**call, "attention_mask": mask, "position_ids": positions})
            self._state = self._start_decode(session, cache, input_ids, call.get("inputs_embeds"), mask, positions)
            return changed
        past = cache.get_seq_length() if cache is not None else 0
        if input_ids is None:
            raise LayoutError(
                "prunekit finds visual tokens through input_ids, but the model was called with inputs_embeds "
                "only; pass input_ids (and pixel_values)"
            )
        layout = self.adapter.token_layout(self.model, input_ids, mask)
        if past > 0:
            if bool(layout.visual.any()):
                raise LayoutError(
                    f"this forward continues a cache of {past} tokens with new visual tokens; prunekit prunes "
                    "visual tokens in the prefill only (start from an empty cache)"
                )
            return None  # text continuing an unpruned cache: nothing to do
        if not bool(layout.visual.any()):
            raise LayoutError(
                f"the prompt has no visual tokens (looked for {self.adapter.describe_visual(self.model)} in input_ids "
                f"of shape {tuple(input_ids.shape)}); recipe {self.recipe.name!r} needs an image or video in the prompt"
            )
        visual_before = layout.visual_counts()
        changed, rewrite = None, None
        if self._vision is not None:
            pad_id = getattr(self.adapter.language_model(self.model).config, "pad_token_id", None) or 0
            input_ids, mask, positions, rewrite = self._vision.rewrite_prompt(
                input_ids, mask, positions, layout.visual, pad_id
            )
            layout = self.adapter.token_layout(self.model, input_ids, mask)
            changed = ((), {**call, "input_ids": input_ids, "attention_mask": mask, "position_ids": positions})
        seq = input_ids.shape[1]
        ctx = ForwardContext(layout=layout, stage_layers=self.stage_layers, num_layers=self.num_layers)
        self._state = _Prefill(
            ctx=ctx, positions=None,
            visual_original=layout.visual_counts(), prompt_valid=layout.valid.sum(dim=1), prompt_length=seq,
            cache=cache, rewrite=rewrite, visual_before_vision=visual_before,
            rewrite_visual=layout.visual if rewrite is not None else None,
            rewrite_valid=layout.valid if rewrite is not None else None,
        )
        return changed

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state, self._state = self._state, None
        if not isinstance(state, _Prefill) or output is None or len(state.records) != len(self.stages):
            if isinstance(state, _Decode):
                state.session.seen = state.mask_2d.shape[1]
            return
        self.last_report = self._report(state)
        cache = state.cache if state.cache is not None else cache_of(output)
        if cache is not None:
            self._sessions[cache] = _Session(state.prompt_length, state.records, seen=state.prompt_length,
                                             rewrite=state.rewrite)

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Read the RoPE positions the decoder stack will use (for M-RoPE models they are computed inside)."""
        state = self._state
        if state is None:
            return
        hidden = kwargs.get("inputs_embeds")
        if hidden is None:
            hidden = args[0] if args and isinstance(args[0], Tensor) and args[0].dim() == 3 else None
        if hidden is None:
            raise AdapterError(f"{type(module).__name__} was called without inputs_embeds; cannot read its positions")
        state.positions = self.adapter.rope_positions(self.model, kwargs, hidden, cache_in(kwargs))
        if isinstance(state, _Prefill):
            state.prompt_max_position = _max_position(state.positions, state.ctx.layout.valid)

    def _start_decode(self, session: _Session, cache: Any, input_ids: Tensor | None, embeds: Tensor | None,
                      mask: Tensor | None, positions: Tensor | None) -> _Decode:
        tokens = input_ids if input_ids is not None else embeds
        batch, q = tokens.shape[0], tokens.shape[1]
        expected = session.seen + q
        if mask is None:
            mask_2d = torch.ones(batch, expected, dtype=torch.bool, device=tokens.device)
        else:
            mask_2d = mask.to(torch.bool)
            if mask_2d.dim() != 2 or mask_2d.shape[1] != expected:
                raise LayoutError(
                    f"decode step: attention_mask has shape {tuple(mask.shape)}, expected [batch, {expected}] "
                    f"({session.seen} cached tokens + {q} new) as a 2D mask over the unpruned sequence"
                )
        return _Decode(session=session, mask_2d=mask_2d, positions=None, cache=cache)

    # -- layer hooks -------------------------------------------------------------------------
    def _layer_pre_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if isinstance(state, _Prefill):
                if layer_idx in self.stage_layers:
                    return self._prune(layer_idx, module, args, kwargs, state)
                kwargs.update(self._prefill_kwargs(state, layer_idx, self.adapter.layer_input(args, kwargs)))
                return args, kwargs
            if isinstance(state, _Decode):
                stage = self._stage_of_layer[layer_idx]
                kwargs.update(self._decode_kwargs(state, stage, layer_idx, self.adapter.layer_input(args, kwargs)))
                return args, kwargs
            return None

        return hook

    def _io_hook(self, layer_idx: int, kind: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state = self._state
            if not isinstance(state, _Prefill) or state.scoring_module is not None:
                return
            inputs = self.adapter.layer_input(args, kwargs)
            out = self.adapter.module_output(output)
            with torch.no_grad(), self._timed("probes"):
                for criterion, probe in self._io_observers[(layer_idx, kind)]:
                    criterion.observe(state.ctx, probe, inputs, out)

        return hook

    def _input_hook(self, layer_idx: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state = self._state
            if not isinstance(state, _Prefill):
                return
            hidden = self.adapter.layer_input(args, kwargs)
            with torch.no_grad(), self._timed("probes"):
                for criterion, probe in self._input_observers[layer_idx]:
                    criterion.observe(state.ctx, probe, hidden, None)

        return hook

    def _on_attention(self, module: nn.Module, query: Tensor, key: Tensor, kwargs: dict) -> None:
        state = self._state
        if not isinstance(state, _Prefill):
            return
        if state.scoring_module is not None:
            if module is state.scoring_module:
                self._capture_rows(state, state.scoring_probes, module, query, key, kwargs)
                raise _ScoringPassDone
            return
        layer = self._attention_layer.get(id(module))
        probes = self._rows_during.get(layer, ()) if layer is not None else ()
        if probes:
            with self._timed("attention rows"):
                self._capture_rows(state, probes, module, query, key, kwargs)

    def _capture_rows(self, state: _Prefill, probes: Sequence[AttentionRows], module: nn.Module,
                      query: Tensor, key: Tensor, kwargs: dict) -> None:
        layout = state.ctx.layout
        if query.shape[2] != layout.seq_len or key.shape[2] != layout.seq_len:
            raise AdapterError(
                f"attention rows: query/key cover {query.shape[2]}/{key.shape[2]} tokens but the prefill "
                f"sequence has {layout.seq_len}; attention rows need a prefill from an empty cache"
            )
        scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
        with torch.no_grad():
            for probe in probes:
                selected = _query_rows(state, probe)
                state.ctx.captures[probe] = attention_rows(query, key, scaling, query_weights(selected), layout.valid)

    def _scoring_pass(self, layer: nn.Module, hidden: Tensor, kwargs: dict, state: _Prefill,
                      probes: Sequence[AttentionRows]) -> None:
        """Run the prune layer's attention on its unpruned input until the tap has the rows."""
        attention = self.adapter.attention(layer)
        call_kwargs = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "use_cache", *CACHE_NAMES)}
        # Only the probes' query rows are read and the values never: project just those (zeros elsewhere).
        rows = torch.stack([_query_rows(state, probe) for probe in probes]).any(dim=0).any(dim=0)  # [seq]
        no_rows = torch.zeros(0, dtype=torch.long, device=rows.device)
        swapped = _swap_projections(attention, {"q_proj": rows.nonzero().flatten(), "v_proj": no_rows})
        state.scoring_module, state.scoring_probes = attention, tuple(probes)
        try:
            with torch.no_grad():
                attention(hidden_states=self.adapter.input_norm(layer)(hidden), **call_kwargs)
        except _ScoringPassDone:
            pass
        else:
            raise AdapterError(
                f"{type(attention).__name__} did not call the transformers attention interface, so its "
                "attention rows cannot be captured; this model needs an adapter that computes them"
            )
        finally:
            state.scoring_module, state.scoring_probes = None, ()
            for name, original in swapped.items():
                setattr(attention, name, original)

    def _prune(self, layer_idx: int, layer: nn.Module, args: tuple, kwargs: dict, state: _Prefill):
        ctx = state.ctx
        stage_idx = self.stage_layers.index(layer_idx)
        hidden = self.adapter.layer_input(args, kwargs)  # [batch, seq, hidden]
        if state.records:  # the sequence this layer would get: the previous stage's
            kwargs.update(self._prefill_kwargs(state, layer_idx, hidden))
        if self._rows_before.get(layer_idx):
            with self._timed("attention rows"):  # the scoring pass
                self._scoring_pass(layer, hidden, kwargs, state, self._rows_before[layer_idx])
        with torch.no_grad(), self._timed("probes"):
            for criterion, probe in self._input_observers.get(layer_idx, ()):
                criterion.observe(ctx, probe, hidden, None)
        ctx.stage = stage_idx
        counts = torch.minimum(self.stages[stage_idx].keep_counts(state.visual_original), ctx.layout.visual_counts())
        ctx.keep_counts = counts
        with torch.no_grad(), self._timed("scoring"):
            scores = {key: criterion.score(ctx) for key, criterion in self.recipe.criteria.items()}
            combined = self.recipe.combiner.combine(scores, ctx.layout.visual)  # [batch, seq]
        with torch.no_grad(), self._timed("selection"):
            selection = select(combined, ctx.layout.visual, counts)
            merged, merged_valid = None, None
            if self.recipe.merger is not None:
                merged, merged_valid = self.recipe.merger.merge(hidden, selection.dropped, combined, ctx)
            seq_index = torch.arange(ctx.layout.seq_len, device=hidden.device)
            last_visual = torch.where(ctx.layout.visual, seq_index, -1).amax(dim=1)  # [batch]
            plan = assemble(selection, last_visual, merged_valid)
            hidden = self._next_hidden(hidden, plan, merged)
            state.positions = self._next_positions(state, plan)
            ctx.gather(plan.index, ~plan.from_current)
            if merged is not None:  # merged slots are visual tokens from now on
                ctx.layout.visual |= plan.merged_valid
                ctx.layout.valid |= plan.merged_valid
        shift = torch.zeros_like(state.prompt_valid)
        if self.recipe.positions == "compact":  # decode tokens continue right after the compacted prompt
            shift = state.prompt_max_position - _max_position(state.positions, ctx.layout.valid)
        state.records.append(_StageRecord(
            layer=layer_idx, original_index=ctx.layout.original_index, visual=ctx.layout.visual,
            valid=ctx.layout.valid, shift=shift,
        ))
        state.stage_kwargs = {}
        kwargs.update(self._prefill_kwargs(state, layer_idx, hidden))
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs["hidden_states"] = hidden
        return args, kwargs

    @staticmethod
    def _next_hidden(hidden: Tensor, plan: Assembly, merged: Tensor | None) -> Tensor:
        """[batch, new_seq, dim]: kept tokens gathered, merged tokens in their slots."""
        out = gather_tokens(hidden, plan.index)
        if merged is not None and merged.shape[1]:
            placed = gather_tokens(merged.to(hidden.dtype), plan.merged.clamp(min=0))
            out = torch.where((plan.merged >= 0)[..., None], placed, out)
        return out

    def _next_positions(self, state: _Prefill, plan: Assembly) -> Tensor:
        """RoPE positions of the next sequence: re-indexed (compact) or each token's own (original)."""
        valid = (plan.from_current & state.ctx.layout.valid.gather(1, plan.index)) | plan.merged_valid
        components = state.positions.shape[0]
        positions = state.positions.gather(2, plan.index[None].expand(components, -1, -1))  # [components, batch, new]
        # a merged token sits at the position of the kept token before it
        anchored = positions.gather(2, plan.anchor[None].expand(components, -1, -1))
        positions = torch.where(plan.merged[None] >= 0, anchored, positions)
        if self.recipe.positions == "compact":
            visual = (plan.from_current & state.ctx.layout.visual.gather(1, plan.index)) | plan.merged_valid
            positions = self.adapter.compact_positions(positions, valid, visual)
        return positions.masked_fill(~valid[None], 0)

    def _prefill_kwargs(self, state: _Prefill, layer_idx: int, hidden: Tensor) -> dict[str, Any]:
        """The current stage's layer keyword arguments for a layer of this kind (built once per kind)."""
        kind = self.adapter.layer_kind(self.model, layer_idx)
        if kind not in state.stage_kwargs:
            layout = state.ctx.layout
            with self._timed("stage inputs"):
                state.stage_kwargs[kind] = self.adapter.stage_kwargs(
                    self.model, hidden, layout.valid, state.positions, state.cache, layer_idx, layout.image_index
                )
        return state.stage_kwargs[kind]

    def _decode_kwargs(self, state: _Decode, stage: int, layer_idx: int, hidden: Tensor) -> dict[str, Any]:
        key = (stage, self.adapter.layer_kind(self.model, layer_idx))
        if key not in state.stage_kwargs:
            record = state.session.records[stage]
            prompt = state.session.prompt_length
            mask_2d = torch.cat([record.valid, state.mask_2d[:, prompt:]], dim=1)  # [batch, seq_s + decoded + q]
            positions = state.positions - record.shift[None, :, None]
            with self._timed("stage inputs"):
                state.stage_kwargs[key] = self.adapter.stage_kwargs(
                    self.model, hidden, mask_2d, positions, state.cache, layer_idx
                )
        return state.stage_kwargs[key]

    # -- report ------------------------------------------------------------------------------
    def _report(self, state: _Prefill) -> PruneReport:
        stages = []
        big = torch.iinfo(torch.long).max
        records = list(state.records)
        if state.rewrite is not None:  # index the shortened prompt's tokens by their original columns
            origin = self._vision.original_positions(state.rewrite, state.rewrite_visual)  # [batch, short_len]
            first = _StageRecord(layer=0, original_index=origin, visual=state.rewrite_visual,
                                 valid=state.rewrite_valid, shift=state.rewrite.shift, where="vision")
            records = [first] + [
                dataclasses.replace(r, original_index=torch.where(
                    r.original_index >= 0, origin.gather(1, r.original_index.clamp(min=0)), -1))
                for r in records
            ]
        for record in records:
            original = record.visual & (record.original_index >= 0)  # [batch, seq_s]: kept input tokens
            kept_counts = original.sum(dim=1)  # [batch]
            width = int(kept_counts.max().item()) if kept_counts.numel() else 0
            kept = torch.where(original, record.original_index, big).sort(dim=1).values[:, :width]
            stages.append(StageReport(record.layer, kept.masked_fill(kept == big, -1), kept_counts,
                                      record.valid.sum(dim=1), (record.visual & ~original).sum(dim=1),
                                      record.where))
        offset = len(records) - len(state.records)  # 1 when a vision stage leads
        tokens_per_layer = [state.prompt_length if s < 0 else state.records[s].original_index.shape[1]
                            for s in self._stage_of_layer]
        real = torch.stack([state.prompt_valid if s < 0 else stages[s + offset].sequence_lengths
                            for s in self._stage_of_layer], dim=1)  # [batch, num_layers]
        visual_entering = state.visual_original  # visual tokens the language model receives
        visual = torch.stack([visual_entering if s < 0 else stages[s + offset].kept_counts
                              + stages[s + offset].merged_counts for s in self._stage_of_layer], dim=1)
        before = state.visual_before_vision if state.visual_before_vision is not None else state.visual_original
        return PruneReport(stages, before, tokens_per_layer, real, visual)

    def __repr__(self) -> str:
        status = "removed" if self._removed else ("installed" if self._installed else "new")
        return f"Pruner(recipe={self.recipe.name!r}, adapter={self.adapter.name!r}, stages={self.stage_layers}, {status})"


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def _query_rows(state: _Prefill, probe: AttentionRows) -> Tensor:
    """[batch, seq] bool: the query tokens whose attention rows ``probe`` reads."""
    layout = state.ctx.layout
    if probe.queries == "instruction":
        return layout.instruction
    if probe.queries == "last":  # the last real token of each sample
        idx = torch.arange(layout.seq_len, device=layout.valid.device).expand_as(layout.valid)
        last = torch.where(layout.valid, idx, -1).amax(dim=1, keepdim=True)
        return idx == last
    if probe.queries in state.ctx.buffers:
        return state.ctx.buffers[probe.queries] & layout.valid
    raise KeyError(f"{probe}: no query set {probe.queries!r}; use one of {QUERY_SETS} or a bool buffer a "
                   "criterion fills before that layer")


class _RowsOnly(nn.Module):
    """Stands in for a linear projection during a scoring pass: the token columns ``columns`` only, zeros elsewhere."""

    def __init__(self, projection: nn.Linear, columns: Tensor) -> None:
        super().__init__()
        self.projection, self.columns = projection, columns

    def forward(self, hidden: Tensor) -> Tensor:  # [batch, seq, in] -> [batch, seq, out]
        out = hidden.new_zeros(*hidden.shape[:-1], self.projection.out_features)
        if self.columns.numel():
            out[:, self.columns] = self.projection(hidden[:, self.columns])
        return out


def _swap_projections(attention: nn.Module, columns: dict[str, Tensor]) -> dict[str, nn.Module]:
    """Replace the attention's plain ``nn.Linear`` projections named in ``columns``; returns the originals."""
    swapped = {}
    for name, wanted in columns.items():
        projection = getattr(attention, name, None)
        if type(projection) is nn.Linear:  # fused, quantised or adapted projections are left to run whole
            swapped[name] = projection
            setattr(attention, name, _RowsOnly(projection, wanted))
    return swapped


def _max_position(positions: Tensor, valid: Tensor) -> Tensor:
    """Largest position (over components and real tokens) of each sample: [batch]."""
    return positions.masked_fill(~valid[None], -1).amax(dim=(0, 2))


def _find_adapter(model: nn.Module, name: str | None) -> Adapter:
    registry = get_registry()
    if name is not None:
        adapter = registry.get("adapter", name).obj
        if not adapter.matches(model):
            raise AdapterError(f"adapter {name!r} (from the recipe) does not fit {type(model).__name__}")
        return adapter
    adapters = registry.adapters()
    for adapter in adapters:
        if adapter.matches(model):
            return adapter
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    reasons = [f"{a.name}: {a.explain(model)}" for a in adapters if getattr(a, "name", "") == "generic"]
    raise AdapterError(
        f"no adapter matches {type(model).__name__} (config.model_type={model_type!r}); "
        f"registered adapters: {valid_list(a.name for a in adapters)}" + (f" ({'; '.join(reasons)})" if reasons else "")
        + "; `prunekit doctor` explains each"
    )


def _check_stages(recipe: Recipe, num_layers: int, model: nn.Module) -> list[Stage]:
    if recipe.schedule is None:  # a recipe with only a vision stage
        return []
    stages = resolve_stages(recipe, num_layers)
    where = f"recipe {recipe.name!r}, schedule"
    if not stages:
        raise RecipeError(f"{where}: the schedule has no stages")
    previous_layer, previous_keep = -1, None
    for i, stage in enumerate(stages):
        if not 0 <= stage.layer < num_layers:
            raise RecipeError(
                f"{where}: stage {i} prunes before layer {stage.layer}, past the model's depth: "
                f"{type(model).__name__} has {num_layers} decoder layers (valid layers 0..{num_layers - 1})"
            )
        if stage.layer <= previous_layer:
            raise RecipeError(f"{where}: stage {i} layer {stage.layer} must come after layer {previous_layer}")
        keep = stage.keep if stage.keep is not None else stage.count
        if previous_keep is not None and type(keep) is type(previous_keep) and keep > previous_keep:
            raise RecipeError(f"{where}: stage {i} keeps {keep}, more than the stage before ({previous_keep})")
        previous_layer, previous_keep = stage.layer, keep
    return stages


def _collect_probes(recipe: Recipe, stage_layers: tuple[int, ...], num_layers: int) -> list[tuple[Any, Probe]]:
    out = []
    parts = list(recipe.criteria.items()) + ([("merge", recipe.merger)] if recipe.merger is not None else [])
    for key, criterion in parts:
        try:
            probes = list(criterion.probes(stage_layers, num_layers))
        except ValueError as exc:
            raise RecipeError(f"recipe {recipe.name!r}, criteria.{key}: {exc}") from exc
        for probe in probes:
            if not 0 <= probe.layer < num_layers:
                raise RecipeError(
                    f"recipe {recipe.name!r}, criteria.{key}: {probe} reads layer {probe.layer}, past the model's "
                    f"depth (valid layers 0..{num_layers - 1})"
                )
            out.append((criterion, probe))
    return out


def apply(model: nn.Module, recipe: RecipeSource, overrides: Sequence[str] | None = None,
          measure: bool = False) -> Pruner:
    """Install a recipe's hooks on ``model`` and return the :class:`Pruner` (a context manager).

    ``recipe`` is a built-in name (``"transprune-high"``), a YAML path, a dict or a :class:`Recipe`;
    ``overrides`` are dotted ``key=value`` strings applied on top. ``measure`` keeps the wall time of
    each part of the pruning work in ``pruner.clock`` (for benchmarks).
    """
    return Pruner(model, load_recipe(recipe, overrides), measure=measure).install()
