"""The Pruner: its lifecycle and the forward hooks it installs on a Hugging Face model.

One prefill, as the hooks see it (hooks on one module fire in the order listed):

1. model pre-hook: find the visual tokens and the instruction (the adapter's ``TokenLayout``);
   with a vision stage, shorten each image's placeholders (``prunekit.vision``); start the
   forward's :class:`~prunekit.record.Prefill` record.
2. decoder-stack pre-hook: read the RoPE positions the stack will use (M-RoPE included).
3. layer pre-hooks from the first prune layer on: the current stage's mask and position
   embeddings (``prunekit.step``), built once per layer kind.
4. probe hooks, each probe type through its installer (``prunekit.capture``): module inputs and
   outputs to the criteria that asked, attention rows from the layer's own q/k, and at a prune
   layer the scoring pass on the unpruned input (``prunekit.scoring``).
5. prune-layer pre-hook: score, keep, assemble the shorter sequence (``prunekit.step.prune``).
6. model post-hook: the report (``prunekit.report``); each stage's slots are remembered by
   KV-cache object so that decode steps get masks and positions that fit every layer's cache.

The Pruner keeps no tensors between forwards: a forward's state lives in its ``Running`` record,
emptied by the post-hook, except the per-cache record, which lives only as long as the cache does.
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, ForwardContext, Stage
from prunekit.attention import CaptureFn
from prunekit.capture import Site, install_probes
from prunekit.compat import cache_in, cache_of
from prunekit.decode_select import DecodeSelector, EarlierCacheCut
from prunekit.errors import AdapterError, LayoutError, PrunerStateError
from prunekit.hooks import HookSet
from prunekit.layout import TokenLayout
from prunekit.plugins import find_adapter
from prunekit.recipe import (
    Recipe,
    RecipeSource,
    check_decode,
    check_stages,
    collect_probes,
    load_recipe,
    scale_to_depth,
)
from prunekit.record import CacheRecord, Decode, Prefill, Running, StageRecord, max_position
from prunekit.report import PruneReport, StageReport, build_report
from prunekit.step import decode_layer_kwargs, decode_step_kwargs, prefill_layer_kwargs, prune
from prunekit.vision import TowerProbes, VisionPruner, rewrite_decode_kwargs, tower_depth
from prunekit.vision_input import INPUT_STAGE, InputVision, runs_before_projector


class Clock:
    """Wall time spent in the pruning work (``measure=True``), summed over forwards.

    ``seconds`` splits each prefill's work into :attr:`PARTS`; ``total`` is their sum. Decode
    steps on a pruned cache are timed apart: ``decode_seconds`` is the wall time spent inside
    prunekit's hooks during ``decode_steps`` steps (the model, stack and layer hooks and the
    attention tap), so ``per_decode_step`` is what the hooks add to one step; ``decode_build_seconds``
    is the part of it spent in the adapter building each stage's mask and position embeddings.
    """

    PARTS = ("probes", "attention rows", "scoring", "selection", "stage inputs", "vision stage")

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {part: 0.0 for part in self.PARTS}
        self.decode_seconds = 0.0
        self.decode_build_seconds = 0.0
        self.decode_steps = 0

    @contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - start

    @property
    def total(self) -> float:
        """Seconds of prefill work (every part of :attr:`PARTS`)."""
        return sum(self.seconds.values())

    @property
    def per_decode_step(self) -> float:
        """Mean seconds spent in prunekit's hooks per decode step (0.0 before any step)."""
        return self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    def timed_hook(self, hook: Callable[..., Any], running: Running) -> Callable[..., Any]:
        """``hook`` with its wall time added to ``decode_seconds`` when it runs in a decode step."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            decode = type(running.forward) is Decode
            start = time.perf_counter()
            try:
                return hook(*args, **kwargs)
            finally:
                if decode or type(running.forward) is Decode:
                    self.decode_seconds += time.perf_counter() - start

        return timed


class _TimedTaps(HookSet):
    """A :class:`HookSet` whose attention taps add their decode-step time to a :class:`Clock`."""

    def __init__(self, clock: Clock, running: Running) -> None:
        super().__init__()
        self._clock, self._running = clock, running

    def tap(self, config: Any, capture: CaptureFn) -> None:
        super().tap(config, self._clock.timed_hook(capture, self._running))


_NO_CLOCK = nullcontext()

# One active pruner per model: a registry, so that a second apply() is a clear error.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, Pruner] = weakref.WeakKeyDictionary()


def current_layout(model: nn.Module) -> TokenLayout | None:
    """The token layout of the pruned prefill running on ``model`` in this thread, once a stage has pruned
    (None outside a prefill, before the first prune, or without an active pruner). Adapters whose model
    feeds per-token inputs to later layers (Qwen3-VL's deepstack features) read which prefill token sits in
    each slot from its ``original_index``."""
    pruner = _ACTIVE.get(model)
    prefill = pruner._running.prefill() if pruner is not None else None
    return prefill.ctx.layout if prefill is not None and prefill.records else None


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
        self.adapter: Adapter = find_adapter(model, recipe.adapter)
        self.layers: list[nn.Module] = list(self.adapter.decoder_layers(model))
        self.num_layers = len(self.layers)
        self.recipe = scale_to_depth(recipe, self.num_layers)
        self.stages: list[Stage] = check_stages(self.recipe, self.num_layers, type(model).__name__)
        self._reports = threading.local()  # each thread's last report
        self._latest: PruneReport | None = None  # the last report of any thread
        self._running = Running()
        self._hooks = HookSet() if self.clock is None else _TimedTaps(self.clock, self._running)
        self._caches: weakref.WeakKeyDictionary[Any, CacheRecord] = weakref.WeakKeyDictionary()
        self._installed = False
        self._warned_no_cache = False
        self._removed = False
        self._signature = inspect.signature(model.forward)
        self._var_keyword = next((p.name for p in self._signature.parameters.values()
                                  if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self._parameters = frozenset(self._signature.parameters)
        self._criteria_layers = tuple(s.layer for s in self.stages)  # the recipe's prune layers (its criteria's)
        self._vision: VisionPruner | None = None
        self._input_vision: InputVision | None = None  # a vision block run before layer 0 (engine stage 0)
        if self.recipe.vision is not None and runs_before_projector(self.adapter, model):
            self._vision = VisionPruner(model, self.adapter, self.recipe.vision, self._running)
        elif self.recipe.vision is not None:
            self._input_vision = InputVision(model, self.adapter, self.recipe.vision, self.recipe.name, self._running)
            self.stages = [INPUT_STAGE, *self.stages]
        self._offset = int(self._input_vision is not None)  # engine stage s is the recipe's stage s - offset
        self.stage_layers = tuple(s.layer for s in self.stages)
        check_decode(self.recipe, self.stages, self.num_layers, type(model).__name__)
        self.adapter.check_prune_layers(model, self.stage_layers)
        probes = collect_probes(self.recipe.parts(), self._criteria_layers, self.num_layers, "decoder",
                                f"recipe {self.recipe.name!r}", tower_layers=tower_depth(self.adapter, model) or 0)
        self._probes = [(plugin, probe) for plugin, probe in probes if probe.site == "decoder"]
        tower = [(plugin, probe) for plugin, probe in probes if probe.site == "vision"]
        self._tower = TowerProbes(model, self.adapter, tower, self._running, self.recipe.name) if tower else None
        if tower and self._vision is not None:  # the vision block's pruner captures them with its own
            self._vision.read_for_decoder(tower)
        # stage index of every layer (-1 before the first prune)
        self._stage_of_layer = [max((s for s, L in enumerate(self.stage_layers) if L <= i), default=-1)
                                for i in range(self.num_layers)]
        # (stage, layer kind) of every layer: the layers of one key share a decode step's inputs
        self._decode_key = [(stage, self.adapter.layer_kind(model, i)) for i, stage in enumerate(self._stage_of_layer)]
        self._decode_groups: dict[tuple[int, str], int] = {}  # key -> its first layer, in layer order
        for i, key in enumerate(self._decode_key):
            if key[0] >= 0:
                self._decode_groups.setdefault(key, i)
        # optional: an adapter that builds every group's inputs of a decode step in one call (sharing rotary work)
        self._build_step = getattr(self.adapter, "step_kwargs", None)
        self._decode = (None if self.recipe.decode is None else
                        DecodeSelector(model, self.adapter, self.layers, self.recipe.decode, self._running,
                                       self._stage_of_layer))
        cuts = [s for s, stage in enumerate(self.stages) if stage.cut_earlier]
        self._cut = (EarlierCacheCut(model, self.adapter, self.layers, self.stages, cuts, self._running,
                                     self._stage_of_layer) if cuts else None)

    @property
    def last_report(self) -> PruneReport | None:
        """The report of the calling thread's last prefill (of any thread's, if this thread ran none)."""
        report = getattr(self._reports, "report", None)
        return report if report is not None else self._latest

    @last_report.setter
    def last_report(self, report: PruneReport | None) -> None:
        self._reports.report = report
        self._latest = report

    def _timed(self, part: str) -> AbstractContextManager:
        return self.clock(part) if self.clock is not None else _NO_CLOCK

    def _clocked(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook``, timed in decode steps when measuring (itself otherwise: no cost when not measuring)."""
        return hook if self.clock is None else self.clock.timed_hook(hook, self._running)

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
        add, clocked = self._hooks.add, self._clocked
        add(self.model.register_forward_pre_hook(clocked(self._before_model), with_kwargs=True))
        add(self.model.register_forward_hook(clocked(self._after_model), with_kwargs=True, always_call=True))
        if self._vision is not None:
            self._vision.install(self._timed)
        if self._input_vision is not None:
            self._input_vision.install(self._hooks, self._timed)
        language_model = self.adapter.language_model(self.model)
        add(language_model.register_forward_pre_hook(clocked(self._before_language_model), with_kwargs=True))
        first = self.stage_layers[0] if self.stage_layers else self.num_layers
        for i in range(first, self.num_layers):  # the stage's inputs first: probes see the layer's own
            add(self.layers[i].register_forward_pre_hook(clocked(self._stage_inputs_hook(i)), with_kwargs=True))
        install_probes(Site(self.model, self.adapter, self._hooks, self._running, self._timed, self.layers,
                            self._criteria_layers), self._probes)
        if self._tower is not None and self._vision is None:
            self._tower.install(self._hooks, self._timed)
        for s, stage in enumerate(self.stages):  # after the probes, which read the unpruned input
            prepend = s < self._offset  # the vision block runs first: layer 0's probes see the shortened images
            add(self.layers[stage.layer].register_forward_pre_hook(self._prune_hook(s, stage), with_kwargs=True,
                                                                   prepend=prepend))
        if self._decode is not None:  # after the decode hooks, whose masks it narrows
            self._decode.install(self._hooks)
        if self._cut is not None:
            self._cut.install(self._hooks)

    def remove(self) -> None:
        """Remove every hook and restore the attention implementation. Safe to call twice."""
        self._hooks.remove()
        if self._vision is not None:
            self._vision.remove()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._running.clear()
        self._caches = weakref.WeakKeyDictionary()
        self._removed = True

    def __enter__(self) -> Pruner:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- model-level hooks -----------------------------------------------------------------
    def _call_kwargs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The forward call's arguments by name (positional ones and ``**kwargs`` included)."""
        if not args and (self._var_keyword is not None or kwargs.keys() <= self._parameters):
            return dict(kwargs)  # keywords only (every decode step of generate): binding would give the same
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        call = {k: v for k, v in bound.items() if k != self._var_keyword}
        call.update(bound.get(self._var_keyword, {}) if self._var_keyword else {})
        return call

    def _before_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._running.forward = None  # a vision record the projector started stays: it belongs to this forward
        call = self._call_kwargs(args, kwargs)
        cache = cache_in(call)
        cached = self._caches.get(cache) if cache is not None else None
        input_ids: Tensor | None = call.get("input_ids")
        mask = call.get("attention_mask")
        positions = call.get("position_ids")
        if (input_ids is not None and input_ids.shape[1] > 1 and cache is not None
                and (cached is not None or cache.get_seq_length() > 0)):
            turn = self._start_turn(cached, cache, call, input_ids, mask)
            if turn is not None:  # a later turn with new visual tokens: pruned on the cache that exists
                self._running.forward = turn
                return None
        if cached is not None:
            changed = None
            if cached.rewrite is not None:  # the prompt was shortened before the language model
                mask, positions = rewrite_decode_kwargs(cached.rewrite, mask, positions)
                changed = ((), {**call, "attention_mask": mask, "position_ids": positions})
            self._running.forward = self._start_decode(cached, cache, input_ids, call.get("inputs_embeds"), mask)
            return changed
        self._check_cache_and_mask(cache, mask)
        past = cache.get_seq_length() if cache is not None else 0
        if input_ids is None:
            raise LayoutError(
                "prunekit finds visual tokens through input_ids, but the model was called with inputs_embeds "
                "only; pass input_ids (and pixel_values)"
            )
        if past > 0:
            return None  # text continuing an unpruned cache: nothing to do
        layout = self.adapter.read_call(self.model, self.adapter.token_layout(self.model, input_ids, mask), call)
        if not bool(layout.visual.any()):
            raise LayoutError(
                f"the prompt has no visual tokens (looked for {self.adapter.describe_visual(self.model)} in input_ids "
                f"of shape {tuple(input_ids.shape)}); recipe {self.recipe.name!r} needs an image or video in the prompt"
            )
        if call.get("use_cache") is False:
            self._warn_no_cache()
        visual_before = layout.visual_counts()
        changed, rewrite = None, None
        labels = self._take_labels(call, input_ids)
        if labels:
            changed = ((), call)
        if self._vision is not None:
            pad_id = getattr(self.adapter.language_model(self.model).config, "pad_token_id", None) or 0
            with self._timed("vision stage"):
                input_ids, mask, positions, rewrite = self._vision.rewrite_prompt(
                    input_ids, mask, positions, layout.visual, pad_id
                )
            layout = self.adapter.token_layout(self.model, input_ids, mask)
            changed = ((), {**call, "input_ids": input_ids, "attention_mask": mask, "position_ids": positions})
        ctx = ForwardContext(layout=layout, stage_layers=self._criteria_layers, num_layers=self.num_layers)
        self._running.forward = Prefill(
            ctx=ctx, positions=None,
            visual_original=layout.visual_counts(), prompt_valid=layout.valid.sum(dim=1),
            prompt_length=input_ids.shape[1], cache=cache, prompt_visual=layout.visual.clone(), rewrite=rewrite,
            visual_before_vision=visual_before,
            rewrite_visual=layout.visual if rewrite is not None else None,
            rewrite_valid=layout.valid if rewrite is not None else None, labels=labels,
            loss_kwargs={k: v for k, v in call.items() if k not in self._signature.parameters} if labels else {},
        )
        return changed

    def _unpruned_cache(self, cache: Any, input_ids: Tensor) -> CacheRecord:
        """The record of a cache this pruner did not fill (a shared system prompt, an unpruned first turn):
        every layer holds the same tokens, so every stage's slots are all of them (as decoded tokens)."""
        past = cache.get_seq_length()
        lengths = {layer: cache.get_seq_length(layer) for layer in self.stage_layers}
        if any(length != past for length in lengths.values()):
            raise LayoutError(
                f"the KV cache holds {past} tokens at layer 0 but {lengths} at the prune layers: it was pruned by "
                "another pruner (or another recipe); continue a conversation with the pruner that filled its cache"
            )
        slots = torch.zeros(input_ids.shape[0], 0, dtype=torch.long, device=input_ids.device)  # [batch, 0]
        shift = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)  # [batch]
        records = [StageRecord(layer=stage.layer, original_index=slots, visual=slots.bool(), valid=slots.bool(),
                               shift=shift) for stage in self.stages]
        return CacheRecord(prompt_length=0, records=records, seen=past, prompt_visual=slots.bool())

    def _start_turn(self, cached: CacheRecord | None, cache: Any, call: dict[str, Any], input_ids: Tensor,
                    mask: Tensor | None) -> Prefill | None:
        """The record of a conversation's later turn (several new tokens, some visual, on a non-empty cache:
        ``cached`` is its record, None for a cache this pruner did not fill), or None when the new tokens hold
        no visual token (they then run as a decode step, or as without prunekit on an unknown cache)."""
        turn_length = input_ids.shape[1]
        turn_mask = None if mask is None else mask[:, -turn_length:]
        layout = self.adapter.token_layout(self.model, input_ids, turn_mask)
        if not bool(layout.visual.any()):
            return None
        layout = self.adapter.read_call(self.model, layout, call)
        if cached is None:
            self._check_cache_and_mask(cache, mask)
            cached = self._unpruned_cache(cache, input_ids)
        if cached.rewrite is not None or self._vision is not None or self._input_vision is not None:
            raise LayoutError(
                f"recipe {self.recipe.name!r} has a vision stage, which prunes a conversation's first prefill only; "
                "this turn brings new visual tokens on its cache. Use a decoder-stage recipe for chats with an "
                "image per turn, or start each turn from an empty cache"
            )
        if call.get("labels") is not None:
            raise LayoutError("labels on a later turn of a conversation (new visual tokens on a pruned cache) are "
                              "not supported; compute the loss on a prefill from an empty cache")
        if self.stage_layers[:1] == (0,) and (mask is None or mask.shape[-1] != cached.seen + turn_length):
            covered = "no attention_mask" if mask is None else f"an attention_mask of {mask.shape[-1]} tokens"
            raise LayoutError(
                f"this turn brings {turn_length} tokens with {covered} on a cache that has seen {cached.seen}: "
                f"recipe {self.recipe.name!r} prunes before layer 0, so the first layer's cache is shorter than the "
                "conversation and generate() counts the new tokens from it. Call the model with only the turn's new "
                "tokens and the 2D attention_mask of the whole conversation, or use a recipe whose first stage is "
                "after layer 0"
            )
        ctx = ForwardContext(layout=layout, stage_layers=self._criteria_layers, num_layers=self.num_layers)
        return Prefill(ctx=ctx, positions=None, visual_original=layout.visual_counts(),
                       prompt_valid=layout.valid.sum(dim=1), prompt_length=turn_length, cache=cache,
                       prompt_visual=layout.visual.clone(), past=cached,
                       past_mask=self._unpruned_mask(cached, input_ids, mask))

    @staticmethod
    def _check_cache_and_mask(cache: Any, mask: Any) -> None:
        """Refuse, before any work, what a pruned forward cannot honour: a static (compileable) KV cache and
        a prepared 4D attention mask (``generate`` builds one for a static cache)."""
        if cache is not None and getattr(cache, "is_compileable", False):
            raise LayoutError(
                f"prunekit cannot prune into a static KV cache ({type(cache).__name__}, as "
                "generate(..., cache_implementation='static') and the torch.compile decode path use): its layers are "
                "preallocated to one length and generate builds one 4D mask for all of them, while pruned layers hold "
                "fewer tokens than the prompt; use the default dynamic cache (leave cache_implementation unset)"
            )
        if isinstance(mask, Tensor) and mask.dim() != 2:
            raise LayoutError(
                f"attention_mask has shape {tuple(mask.shape)}; prunekit needs the 2D padding mask [batch, seq] "
                "(it builds each stage's mask itself), not a prepared 4D mask"
            )

    def _warn_no_cache(self) -> None:
        """Once per pruner: without a cache every forward is a prefill, pruned afresh (docs/concepts.md)."""
        if self._warned_no_cache:
            return
        self._warned_no_cache = True
        warnings.warn(
            "prunekit: use_cache=False: every forward is pruned afresh as a prefill; in generate() each step "
            "re-scores the visual tokens with the tokens generated so far counted as instruction, so greedy "
            "output can differ from the cached run (which scores the prompt once). See 'Without a KV cache' "
            "in docs/concepts.md",
            UserWarning, stacklevel=3,
        )

    def _take_labels(self, call: dict[str, Any], input_ids: Tensor) -> dict[str, Tensor]:
        """Take ``labels`` (and ``shift_labels``) out of a prefill call: the loss is computed on the kept rows."""
        if call.get("labels") is None:
            return {}
        labels = {name: call.pop(name) for name in ("labels", "shift_labels") if call.get(name) is not None}
        for name, value in labels.items():
            if not isinstance(value, Tensor) or tuple(value.shape) != tuple(input_ids.shape):
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise LayoutError(
                    f"{name} has shape {shape}, input_ids {tuple(input_ids.shape)}: under pruning prunekit drops "
                    f"the {name} of dropped tokens with them and needs one per input_ids column"
                )
        if call.get("return_dict") is False or not callable(getattr(self.model, "loss_function", None)):
            raise AdapterError(
                f"labels under pruning: prunekit computes the loss of {type(self.model).__name__} on the kept rows "
                "through model.loss_function and returns it in a ModelOutput; call without return_dict=False "
                "(or compute the loss yourself from the logits and pruner.last_report.output_positions)"
            )
        return labels

    def _with_loss(self, forward: Prefill, output: Any) -> Any:
        """The model's output with the loss of the kept rows: labels gathered as the input rows were kept."""
        positions = self.last_report.output_positions  # [batch, seq_out]
        logits = getattr(output, "logits", None)
        if logits is None:
            raise AdapterError(f"labels under pruning: {type(self.model).__name__} returned no logits")
        gathered = {name: value.to(positions.device).gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -100)
                    [:, positions.shape[1] - logits.shape[1]:] for name, value in forward.labels.items()}
        config = getattr(self.model.config, "text_config", None) or self.model.config
        loss = self.model.loss_function(logits=logits, vocab_size=config.vocab_size, **forward.loss_kwargs,
                                        **gathered)
        return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})

    def _after_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        forward, vision = self._running.forward, self._running.vision
        self._running.clear()
        if isinstance(forward, Decode):
            forward.cached.seen = forward.mask_2d.shape[1]
            if self.clock is not None:
                self.clock.decode_steps += 1
            return
        if not isinstance(forward, Prefill) or output is None or len(forward.records) != len(self.stages):
            return
        self.last_report = build_report(forward, vision, self._stage_of_layer)
        cache = forward.cache if forward.cache is not None else cache_of(output)
        if forward.past is not None:  # a later turn: the cache's record now covers the conversation so far
            self._caches[cache] = forward.past.continued(forward.past_mask, forward.records, forward.prompt_visual)
        elif cache is not None:
            self._caches[cache] = CacheRecord(forward.prompt_length, forward.records, seen=forward.prompt_length,
                                              rewrite=forward.rewrite, prompt_visual=forward.prompt_visual)
        return self._with_loss(forward, output) if forward.labels else None

    def _before_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Read the RoPE positions the decoder stack will use (for M-RoPE models they are computed inside)."""
        forward = self._running.forward
        if forward is None:
            return
        hidden = kwargs.get("inputs_embeds")
        if hidden is None:
            hidden = args[0] if args and isinstance(args[0], Tensor) and args[0].dim() == 3 else None
        if hidden is None:
            raise AdapterError(f"{type(module).__name__} was called without inputs_embeds; cannot read its positions")
        forward.positions = self.adapter.rope_positions(self.model, kwargs, hidden, cache_in(kwargs))
        if isinstance(forward, Prefill):
            forward.prompt_max_position = max_position(forward.positions, forward.ctx.layout.valid)

    @staticmethod
    def _unpruned_mask(cached: CacheRecord, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """[batch, seen + q] bool: the 2D mask over the unpruned sequence of a call bringing ``q`` new tokens
        (``tokens``: [batch, q, ...]) on a cache that has seen ``cached.seen``; all ones without a mask."""
        batch, q = tokens.shape[0], tokens.shape[1]
        expected = cached.seen + q
        if mask is None:
            return torch.ones(batch, expected, dtype=torch.bool, device=tokens.device)
        mask_2d = mask.to(torch.bool)
        if mask_2d.dim() != 2 or mask_2d.shape[1] != expected:
            raise LayoutError(
                f"decode step: attention_mask has shape {tuple(mask.shape)}, expected [batch, {expected}] "
                f"({cached.seen} cached tokens + {q} new) as a 2D mask over the unpruned sequence"
            )
        return mask_2d

    def _start_decode(self, cached: CacheRecord, cache: Any, input_ids: Tensor | None, embeds: Tensor | None,
                      mask: Tensor | None) -> Decode:
        tokens = input_ids if input_ids is not None else embeds
        return Decode(cached=cached, mask_2d=self._unpruned_mask(cached, tokens, mask), positions=None, cache=cache)

    # -- layer hooks -------------------------------------------------------------------------
    def _stage_inputs_hook(self, layer_idx: int):
        """Give a layer the current stage's mask and positions (prefill after a prune, or a decode step).

        In a decode step the first layer of each (stage, layer kind) builds that key's inputs once;
        every other layer of the key only swaps the prebuilt objects into its keyword arguments.
        """
        key = self._decode_key[layer_idx]
        running, adapter, model = self._running, self.adapter, self.model

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            forward = running.forward
            if type(forward) is Decode:
                prebuilt = forward.layer_kwargs.get(key)
                if prebuilt is None:
                    start = time.perf_counter() if self.clock is not None else 0.0
                    hidden = adapter.layer_input(args, kwargs)
                    if self._build_step is not None:  # every group at once, at the step's first hooked layer
                        decode_step_kwargs(forward, self._build_step, model, self._decode_groups, hidden)
                        prebuilt = forward.layer_kwargs[key]
                    else:
                        prebuilt = decode_layer_kwargs(forward, adapter, model, key, layer_idx, hidden)
                    if self.clock is not None:
                        self.clock.decode_build_seconds += time.perf_counter() - start
                return adapter.write_layer_input(model, args, kwargs, None, prebuilt)
            if isinstance(forward, Prefill) and forward.records:
                built = prefill_layer_kwargs(forward, adapter, model, layer_idx, adapter.layer_input(args, kwargs),
                                             self._timed)
                return adapter.write_layer_input(model, args, kwargs, None, built)
            return None

        return hook

    def _prune_hook(self, stage_index: int, stage: Stage):
        """Prune before ``stage.layer``: the layer gets the shorter sequence and its mask and positions."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            prefill = self._running.prefill()
            if prefill is None:
                return None
            hidden = self.adapter.layer_input(args, kwargs)
            if stage_index < self._offset:
                hidden = self._input_vision.prune(prefill, hidden, self.recipe.positions, self._timed)
            else:
                if self._tower is not None and stage_index == self._offset:  # the forward's, read once
                    prefill.ctx.tower, prefill.ctx.vision_stage = self._tower.captures(), self._tower.vision_stage()
                hidden = prune(prefill, self.recipe, self.adapter, stage, stage_index, hidden, self._timed,
                               criteria_stage=stage_index - self._offset)
            built = prefill_layer_kwargs(prefill, self.adapter, self.model, stage.layer, hidden, self._timed)
            return self.adapter.write_layer_input(self.model, args, kwargs, hidden, built)

        return hook

    def __repr__(self) -> str:
        status = "removed" if self._removed else ("installed" if self._installed else "new")
        return f"Pruner(recipe={self.recipe.name!r}, adapter={self.adapter.name!r}, stages={self.stage_layers}, {status})"


def apply(model: nn.Module, recipe: RecipeSource, overrides: Sequence[str] | None = None,
          measure: bool = False) -> Pruner:
    """Install a recipe's hooks on ``model`` and return the :class:`Pruner` (a context manager).

    ``recipe`` is a built-in name (``"transprune-high"``), a YAML path, a dict or a :class:`Recipe`;
    ``overrides`` are dotted ``key=value`` strings applied on top. ``measure`` keeps the wall time of
    each part of the pruning work in ``pruner.clock`` (for benchmarks).
    """
    return Pruner(model, load_recipe(recipe, overrides), measure=measure).install()


__all__ = ["Clock", "PruneReport", "Pruner", "StageReport", "apply"]
