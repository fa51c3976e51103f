"""The interfaces plugins implement: criteria, combiners, schedules and adapters.

Criteria, combiners and schedules are dataclasses whose fields are their recipe parameters
(``ttv: {type: ttv, direction: one_minus_abs_cos}`` builds ``TTV(direction="one_minus_abs_cos")``);
the recipe loader validates parameters against the fields before anything runs.

A field that names a decoder layer is marked ``field(metadata={"layer": True})``: with a recipe's
``reference_depth`` the engine maps it onto the model's depth, and checks that it fits.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunekit.errors import AdapterError
from prunekit.layout import TokenLayout
from prunekit.probes import AttentionRows, LayerInput, ModuleIO, Probe, VisionFeatures


@dataclass
class ForwardContext:
    """What criteria see during one prefill: the current layout, captures and per-token buffers.

    Every tensor in ``buffers`` and ``captures`` is ``[batch, seq, ...]`` on the current sequence;
    the engine gathers them together with the hidden states whenever it drops tokens, so an
    accumulator keeps following its tokens across prune stages.
    """

    layout: TokenLayout
    stage_layers: tuple[int, ...]  # prune layers of the recipe, ascending
    num_layers: int
    stage: int = -1  # index of the stage being scored (valid inside ``Criterion.score``)
    keep_counts: Tensor | None = None  # [batch] visual tokens the stage being scored keeps
    buffers: dict[str, Tensor] = field(default_factory=dict)
    captures: dict[Probe, Tensor] = field(default_factory=dict)
    # vision-tower probes a decoder criterion declared: probe -> [n_images, tokens, ...], images in prompt order
    # (not gathered: they describe the images, not the current sequence)
    tower: dict[Probe, Tensor] = field(default_factory=dict)
    # with those: what a vision block kept of each image (kept patches [n_images, k] ascending, merged tokens
    # leading each image), None without one
    vision_stage: tuple[Tensor, int] | None = None

    @property
    def layer(self) -> int:
        """The prune layer of the stage being scored."""
        return self.stage_layers[self.stage]

    def capture(self, probe: Probe) -> Tensor:
        """The value of a probe the criterion declared, on the current sequence."""
        try:
            return self.tower[probe] if probe in self.tower else self.captures[probe]
        except KeyError:
            raise KeyError(
                f"{probe} was not captured in this forward; a criterion must declare it in probes()"
            ) from None

    def accumulate(self, name: str, value: Tensor) -> None:
        """Add ``value`` (``[batch, seq]``) to the per-token buffer ``name``."""
        current = self.buffers.get(name)
        self.buffers[name] = value if current is None else current + value

    def gather(self, index: Tensor, fill: Tensor) -> None:
        """Follow a prune: keep the slots ``index`` selects (``[batch, new_seq]``).

        ``fill`` marks slots that hold no current token (padding or merged tokens): their layout
        entries are not visual, not valid, index -1, and their buffer values are 0.
        """
        from prunekit.sequence import gather_tokens

        self.layout = self.layout.gather(index, fill)
        for store in (self.buffers, self.captures):
            for key, value in store.items():
                gathered = gather_tokens(value, index)
                mask = fill.view(*fill.shape, *([1] * (value.dim() - 2)))
                store[key] = gathered.masked_fill(mask, False if gathered.dtype == torch.bool else 0)


class Criterion:
    """Scores the visual tokens at a prune stage; the engine keeps the highest scores.

    Subclass it as a ``@dataclass`` whose fields are the parameters, set ``name`` (the recipe's
    ``type``), declare the probes the score needs and implement :meth:`score`. A field naming a
    decoder layer is marked ``field(default=6, metadata={"layer": True})`` (see ``reference_depth``).
    """

    name: ClassVar[str] = ""
    key: str = ""  # the criterion's key in its recipe (``criteria: {<key>: ...}``); set when the recipe
    # is built, before probes() is called: prefix your ctx.buffers names with it so two copies never collide

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        """The captures :meth:`score` needs, for a recipe pruning before ``stage_layers``."""
        return ()

    def observe(self, ctx: ForwardContext, probe: ModuleIO | LayerInput, inputs: Tensor,
                output: Tensor | None) -> None:
        """Receive a :class:`ModuleIO` or :class:`LayerInput` capture (``[batch, seq, hidden]``) as the layer runs."""
        raise NotImplementedError(f"criterion {self.name!r} declared {probe} but has no observe()")

    def score(self, ctx: ForwardContext) -> Tensor:
        """One score per token of the current sequence, ``[batch, seq]``; only visual entries are read."""
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad parameter; called once when the recipe is built."""

    #: True for a criterion that drops tokens of its own (scores them -inf) by a rule on the input, a threshold:
    #: its stages' counts depend on the image and question, and the FLOPs model's counts are an upper bound.
    count_from_input: ClassVar[bool] = False
    #: True for a decoder criterion that also reads vision-tower probes (MustDrop's key set): they are installed on
    #: the tower and read through ``ctx.capture`` as ``[n_images, tokens, ...]``. Other criteria's vision probes
    #: belong in a ``vision`` block.
    tower_from_decoder: ClassVar[bool] = False

    def clip_count(self, frames: int, per_frame: int) -> int | None:
        """For the FLOPs model (``prunekit flops --frames``): the visual tokens a criterion that keeps a count of
        its own (scores the rest -inf) leaves of one clip of ``frames`` frames of ``per_frame`` tokens. None: it
        drops nothing by itself, or its count depends on the clip's content."""
        return None


class LayerInputCriterion(Criterion):
    """A criterion that scores the hidden states entering each of its stage layers (at layer 0: the embeddings
    with the projected visual tokens in place): :meth:`stage_hidden` gives them in :meth:`score`."""

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        return [LayerInput(layer=layer) for layer in stage_layers]

    def observe(self, ctx: ForwardContext, probe: ModuleIO | LayerInput, inputs: Tensor,
                output: Tensor | None) -> None:
        ctx.buffers[f"{self.key}/hidden{probe.layer}"] = inputs.detach()  # [batch, seq, hidden]

    def stage_hidden(self, ctx: ForwardContext) -> Tensor:
        """The hidden states entering the stage now scoring, ``[batch, seq, hidden]`` (read once per stage); in a
        ``vision`` block, the image features the stage shortens (``VisionFeatures``: ``[n_images, tokens, dim]``)."""
        features = ctx.captures.get(VisionFeatures())
        return features if features is not None else ctx.buffers.pop(f"{self.key}/hidden{ctx.layer}")


class Combiner:
    """Merges the named scores of several criteria into one ``[batch, seq]`` score."""

    name: ClassVar[str] = ""

    def combine(self, scores: Mapping[str, Tensor], visual: Tensor) -> Tensor:
        """scores: ``{criterion key: [batch, seq]}``; visual: ``[batch, seq]`` bool."""
        raise NotImplementedError

    def validate(self, criteria: Sequence[str]) -> None:
        """Raise ``ValueError`` if the combiner does not fit the recipe's criteria."""


class Merger:
    """Merges the visual tokens a stage drops into a few summary tokens, kept beside the survivors.

    Subclass it as a ``@dataclass`` whose fields are the parameters. The merged tokens count as
    visual tokens from then on (later stages may score and drop them).
    """

    name: ClassVar[str] = ""
    lead: ClassVar[int] = 0  # at a vision stage: how many merged tokens go before the kept ones (at most all)
    in_place: ClassVar[bool] = False  # merges into kept tokens (:meth:`merge_into_kept`) instead of adding tokens

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        """Captures :meth:`merge` reads (from ``ctx.captures``)."""
        return ()

    def count(self, dropped: int) -> int:
        """How many tokens :meth:`merge` makes from ``dropped`` tokens (for the FLOPs model and vision stages)."""
        raise NotImplementedError(f"merger {self.name!r} does not say how many tokens it makes")

    def merge(self, hidden: Tensor, dropped: Tensor, scores: Tensor, ctx: ForwardContext) -> tuple[Tensor, Tensor]:
        """hidden: ``[batch, seq, dim]`` the stage's input; dropped: ``[batch, seq]`` bool; scores:
        ``[batch, seq]`` the combined score. Returns merged ``[batch, n_merged, dim]`` and their
        validity ``[batch, n_merged]`` bool (samples may merge fewer tokens than others)."""
        raise NotImplementedError

    def merge_into_kept(self, hidden: Tensor, kept: Tensor, scores: Tensor, ctx: ForwardContext) -> Tensor:
        """An ``in_place`` merger's work: the stage's input ``hidden`` ``[batch, seq, dim]`` with the rows of some
        kept visual tokens (``kept`` ``[batch, seq]`` bool) replaced by what the dropped ones merge into them
        (FastVID's density-peak centres, ToMe's destinations); the engine then gathers the kept rows, so each
        merged token sits at its kept token's place and position. ``count()`` is then 0."""
        raise NotImplementedError(f"merger {self.name!r} sets in_place but has no merge_into_kept")

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad parameter; called once when the recipe is built."""


@dataclass(frozen=True)
class Stage:
    """Prune before decoder layer ``layer`` (0-based): it is the first layer on the shorter sequence.

    Keep ``keep`` (a fraction in (0, 1] of each sample's original visual tokens, truncated as
    ``int(n * keep)``) or ``count`` visual tokens: exactly one of the two. ``positions`` (``compact`` or
    ``original``) overrides the recipe's position policy at this stage (None: the recipe's).
    ``cut_earlier``: in decode steps the layers before this one attend to the visual tokens this stage
    keeps only, as if their caches were cut to its selection (PruneVid); the prefill is unchanged.
    ``cut_from``: the first layer ``cut_earlier`` cuts (the layers before it keep their whole cache; MustDrop
    cuts layers 2 and on).
    """

    layer: int
    keep: float | None = None
    count: int | None = None
    positions: str | None = None
    cut_earlier: bool = False
    cut_from: int = 0

    def keep_counts(self, n_visual: Tensor) -> Tensor:
        """Visual tokens to keep per sample, given each sample's original count (``[batch]`` long)."""
        if self.count is not None:
            return n_visual.clamp(max=self.count)
        assert self.keep is not None
        # int(n * keep) in float64, exactly as the official code's Python int() truncates.
        return torch.floor(n_visual.double() * self.keep).long().clamp(max=n_visual)

    def describe(self) -> str:
        return f"layer {self.layer}: keep {self.keep}" if self.count is None else f"layer {self.layer}: keep {self.count} tokens"

    def check(self, what: str = "stage") -> None:
        """Raise ``ValueError`` unless the layer is >= 0 and exactly one of a valid keep / count is set."""
        check_keep_count(self.keep, self.count, what)
        if not isinstance(self.layer, numbers.Integral) or self.layer < 0:
            raise ValueError(f"{what}.layer must be an int >= 0, got {self.layer!r}")
        if self.positions not in (None, "compact", "original"):
            raise ValueError(f"{what}.positions must be 'compact' or 'original' (or absent: the recipe's), got "
                             f"{self.positions!r}")
        if not isinstance(self.cut_from, numbers.Integral) or not 0 <= self.cut_from < max(self.layer, 1):
            raise ValueError(f"{what}.cut_from must be an int in 0..{max(self.layer - 1, 0)} (a layer before the "
                             f"stage's layer {self.layer}), got {self.cut_from!r}")
        if self.cut_from and not self.cut_earlier:
            raise ValueError(f"{what}.cut_from ({self.cut_from}) names the first layer cut_earlier cuts; set "
                             "cut_earlier: true with it")


class Schedule:
    """Decides which layers prune and how many visual tokens each keeps.

    Subclass it as a ``@dataclass`` whose fields are the parameters and implement :meth:`resolve`.
    """

    name: ClassVar[str] = ""

    def resolve(self, num_layers: int) -> list[Stage]:
        """The prune stages, in layer order, for a decoder of ``num_layers`` layers.

        With a recipe's ``reference_depth`` the engine passes ``reference_depth`` here and maps
        the returned layers onto the model's depth; without it, the model's depth. Raise
        ``ValueError`` when ``num_layers`` is too shallow: the recipe loader reports it as a
        ``RecipeError`` naming the schedule. Stages past the depth are reported the same way.
        """
        raise NotImplementedError

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad parameter; called once when the recipe is built."""


class Adapter(ABC):
    """One model family's facts: where the decoder layers are and how to feed them a shorter sequence."""

    name: str = ""

    @abstractmethod
    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter knows the model (usually by ``config.model_type``)."""

    def explain(self, model: nn.Module) -> str | None:
        """Why the model does not fit (None when it does), for error messages and ``prunekit doctor``."""
        return None if self.matches(model) else "matches() is false"

    def resolve(self, model: nn.Module) -> Adapter:
        """The concrete adapter for ``model`` (this one; an adapter that finds a model's parts by
        looking, such as ``generic``, returns the adapter it built for the model)."""
        return self

    @abstractmethod
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (owns ``layers``, the rotary embedding and the text config)."""

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        ...

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        ...

    @abstractmethod
    def mlp(self, layer: nn.Module) -> nn.Module:
        ...

    @abstractmethod
    def input_norm(self, layer: nn.Module) -> nn.Module:
        """The norm applied to the layer input before attention."""

    @abstractmethod
    def token_layout(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> TokenLayout:
        """Find the visual tokens and the instruction in a prompt."""

    def read_call(self, model: nn.Module, layout: TokenLayout, call: Mapping[str, Any]) -> TokenLayout:
        """Complete a prefill's layout with what the forward's keyword arguments say (``call``: the call's
        arguments by name, e.g. ``video_grid_thw``, ``token_type_ids``); by default nothing. Runs right after
        :meth:`token_layout` on a first prefill and on a later turn's tokens (whose ``call`` is the turn's)."""
        return layout

    def rope_positions(self, model: nn.Module, lm_kwargs: dict, hidden: Tensor, cache: Any) -> Tensor:
        """The RoPE positions the decoder stack uses for this call: ``[components, batch, seq]`` long.

        Read from the decoder stack's own keyword arguments (``position_ids``); 1 component for
        standard RoPE, 3 for M-RoPE. Without ``position_ids`` the decoder counts from its cache.
        """
        batch, seq = hidden.shape[:2]
        positions = lm_kwargs.get("position_ids")
        if positions is None:
            past = cache.get_seq_length() if cache is not None else 0
            positions = torch.arange(past, past + seq, device=hidden.device)
        return positions.reshape(-1, seq)[None].expand(1, batch, seq) if positions.dim() < 3 else positions

    def compact_positions(self, positions: Tensor, valid: Tensor, visual: Tensor) -> Tensor:
        """Re-index a pruned sequence: real tokens get consecutive positions from the first one.

        positions: ``[components, batch, seq]`` (the kept tokens' own positions); valid, visual:
        ``[batch, seq]`` bool. M-RoPE adapters override this to keep each image's grid.
        """
        first_slot = valid.long().argmax(dim=1)  # [batch]
        first = positions[0].gather(1, first_slot[:, None])  # [batch, 1]
        return (first + valid.long().cumsum(dim=1) - 1)[None].expand_as(positions)

    def layer_kind(self, model: nn.Module, layer_idx: int) -> str:
        """Layers of one kind share their masks (e.g. ``full_attention``, ``sliding_attention``)."""
        return "full_attention"

    @abstractmethod
    def stage_kwargs(
        self,
        model: nn.Module,
        hidden: Tensor,
        attention_mask_2d: Tensor,
        positions: Tensor,
        cache: Any,
        layer_idx: int,
        blocks: Tensor | None = None,
    ) -> dict[str, Any]:
        """The layer keyword arguments for a shorter sequence (mask, position ids and embeddings).

        hidden: ``[batch, seq, hidden]``; attention_mask_2d: ``[batch, kv_len]`` bool over the
        keys the layer will see (its cache plus this sequence); positions: ``[components, batch,
        seq]`` as :meth:`rope_positions` returns them; blocks (prefill only): ``[batch, kv_len]`` the
        visual span each key belongs to, -1 for text and for the cache of a conversation's earlier
        turns (for families whose images attend bidirectionally).
        """

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The decoder's norm before the LM head (read by ``LayerInput(final_norm=True)`` probes)."""
        norm = getattr(self.language_model(model), "norm", None)
        if not isinstance(norm, nn.Module):
            raise AdapterError(f"{type(self.language_model(model)).__name__} has no final norm module `norm`; "
                               f"adapter {self.name!r} must override final_norm() for criteria that read it")
        return norm

    def layer_input(self, args: tuple, kwargs: dict) -> Tensor:
        """The hidden states a decoder layer (or its submodule) was called with, ``[batch, seq, ...]``."""
        return args[0] if args else kwargs["hidden_states"]

    def probe_input(self, args: tuple, kwargs: dict) -> Tensor:
        """The hidden states a ``LayerInput`` probe delivers for a decoder layer call, ``[batch, seq, hidden]``
        (:meth:`layer_input`, unless the layer carries more than one stream of them)."""
        return self.layer_input(args, kwargs)

    def layer_keywords(self, args: tuple, kwargs: dict) -> dict:
        """A decoder layer call's keyword arguments, with those its stack passes positionally (after the hidden
        states) named: what the scoring pass hands the layer's attention."""
        return kwargs

    def write_layer_input(self, model: nn.Module, args: tuple, kwargs: dict, hidden: Tensor | None,
                          layer_kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        """A decoder layer's call with the stage's ``layer_kwargs`` (:meth:`stage_kwargs`) and, at a prune, the
        shorter ``hidden`` (as :meth:`layer_input` reads it; None: unchanged). An adapter whose layers take
        some of these positionally, or in another shape, overrides it."""
        kwargs.update(layer_kwargs)
        if hidden is None:
            return args, kwargs
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def check_prune_layers(self, model: nn.Module, layers: Sequence[int]) -> None:
        """Raise :class:`AdapterError` when ``model`` cannot be pruned before these decoder layers (e.g. layers that
        reuse another layer's keys and values); by default any layer can."""

    def module_output(self, output: Any) -> Tensor:
        """The hidden states a submodule returned (attention returns ``(output, weights)``)."""
        return output[0] if isinstance(output, tuple) else output

    def describe_visual(self, model: nn.Module) -> str:
        """How the adapter recognises visual tokens, for error messages."""
        return "visual token ids"

    # -- the vision side (needed only by recipes with a ``vision`` stage) --------------------
    def projector(self, model: nn.Module) -> nn.Module:
        """The module that maps ``[n_images, tokens, vision_dim]`` features to the language model's width."""
        raise self._no_vision_stage(model)

    def vision_layers(self, model: nn.Module) -> Sequence[nn.Module]:
        """The vision encoder's layers."""
        raise self._no_vision_stage(model)

    def vision_attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a vision-encoder layer."""
        raise self._no_vision_stage(None)

    def vision_has_cls(self, model: nn.Module) -> bool | None:
        """Whether the vision tower's token 0 is a CLS token (CLIP) rather than a patch (SigLIP); None: unknown."""
        return None

    def vision_towers(self, model: nn.Module) -> list[Sequence[nn.Module]]:
        """The layers of every vision encoder whose features reach the projector, one list per tower (Video-LLaVA:
        an image tower and a video tower). Vision probes are installed on each; a tower's forward fills the
        captures of the projector call that follows it."""
        return [self.vision_layers(model)]

    def projected_video_frames(self, model: nn.Module, input_ids: Tensor) -> tuple[Tensor, int] | None:
        """Where a vision stage shortens video frames: the prompt's video placeholders ``[batch, seq]`` bool and
        the tokens of one frame as the projector receives them. None: the projector sees no video frames."""
        return None

    def vision_units(self, model: nn.Module, hidden: Tensor, layout: TokenLayout) -> Tensor:
        """Where a vision block runs at the language model's input: ``[batch, seq]`` long, the part of its image
        each visual token belongs to (the block shortens each part apart), -2 for tokens it keeps whatever it
        scores (e.g. image-newline tokens), -1 where the image (or video frame) is one part. ``hidden``: the
        embeddings entering decoder layer 0 ``[batch, seq, dim]``. By default every image is one part."""
        return torch.full_like(layout.image_index, -1)

    def input_tower(self, model: nn.Module) -> Any | None:
        """Where a vision block runs at the language model's input, what reads the vision tower for it: an object
        with ``layers`` (the tower's blocks), ``attention(layer)`` and ``to_tokens(per_patch [patches, ...],
        grid_thw) -> [per image [tokens, ...]]`` (Qwen2/2.5-VL: ``MergedPatchTower``); None (the default): the
        block's criteria cannot read the tower there."""
        return None

    def _no_vision_stage(self, model: nn.Module | None) -> AdapterError:
        family = f"{type(model).__name__} (adapter {self.name!r})" if model is not None else f"adapter {self.name!r}"
        return AdapterError(
            f"{family} has no stage before its projector: prunekit shortens images there where a projector "
            "receives each image's patches as [n_images, patches, dim] (LLaVA-1.5's layout), and this family "
            "packs, tiles or pools its image features otherwise; a recipe's `vision:` block runs at the language "
            "model's input instead, on each image's projected tokens (docs/recipes.md)"
        )

    def describe(self) -> str:
        return self.name


def check_fraction(x: float, what: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a finite number in (0, 1]."""
    if not (isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and 0 < x <= 1):
        raise ValueError(f"{what} must be in (0, 1], got {x!r}")


def check_keep_count(keep: float | None, count: int | None, what: str) -> None:
    """Raise ``ValueError`` unless exactly one of ``keep`` (a fraction in (0, 1]) and ``count`` (>= 0) is set."""
    if (keep is None) == (count is None):
        raise ValueError(f"{what} needs exactly one of 'keep' (fraction of the visual tokens) or 'count', "
                         f"got keep={keep!r}, count={count!r}")
    if keep is not None:
        check_fraction(keep, f"{what}.keep")
    elif not isinstance(count, numbers.Integral) or isinstance(count, bool) or count < 0:
        raise ValueError(f"{what}.count must be an int >= 0, got {count!r}")


__all__ = [
    "Adapter",
    "AttentionRows",
    "Combiner",
    "Criterion",
    "ForwardContext",
    "LayerInput",
    "Merger",
    "ModuleIO",
    "Probe",
    "Schedule",
    "Stage",
    "check_fraction",
    "check_keep_count",
]
