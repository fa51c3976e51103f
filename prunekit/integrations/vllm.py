"""Serve prunekit's stages before the language model in vLLM: a ``vllm.general_plugins`` plugin.

vLLM runs the decoder on a paged KV cache that holds every prompt token at every layer, so it can
serve the recipes that decide, from the image alone, a fixed number of tokens per image before
layer 0: the processor then inserts that many placeholders and the model returns that many
embeddings. Those recipes are

* a ``vision:`` block (VisionZip, FasterVLM, VisPruner, ...): the same criteria and merger code as
  prunekit's projector pre-hook, on captures of vLLM's CLIP tower (CLS attention, keys, hidden
  states), before the projector;
* a single decoder stage at layer 0 with compact positions and criteria that read only the projected
  visual tokens (DivPrune, ``similarity``, ``l2_norm``, ``random``, ``uniform``), optionally with a
  merger that builds its tokens from them (``grid_pool``, ``tome``: the ``pooling-*`` / ``tome-*``
  recipes): scored and merged on the projector's output.

Anything else (a stage after layer 0, criteria that read the instruction or decoder attention, another
merger in a decoder stage, ``positions: original``) is a :class:`NotServableError` naming why.

The recipe comes from the model config key ``prunekit_recipe`` (``--hf-overrides``, with
``prunekit_overrides``: a list of dotted overrides) or from the environment variables
``PRUNEKIT_RECIPE`` / ``PRUNEKIT_RECIPE_OVERRIDES`` (``;``-separated). The plugin registers the
architectures ``PrunekitLlavaForConditionalGeneration`` (LLaVA-1.5) and
``PrunekitLlavaNextForConditionalGeneration`` (LLaVA-NeXT); with ``PRUNEKIT_RECIPE`` set it also serves every
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration`` checkpoint through them.

LLaVA-NeXT is pruned as prunekit's transformers path prunes it: its adapter has no stage before the
projector (any-resolution tiles), so only the layer-0 stage runs, on each image's whole token list as
the language model receives it (the base tile, the unpadded grid of the other tiles and the
image-newline tokens).

``PRUNEKIT_VLLM_RECORD`` names a file that receives one JSON line per encoded image: its pixel
fingerprint and kept tokens. docs/serving.md has the commands.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.errors import PrunekitError, valid_list

INSTALL_HINT = "pip install 'prunekit[vllm]'"
ARCHITECTURE = "PrunekitLlavaForConditionalGeneration"
NEXT_ARCHITECTURE = "PrunekitLlavaNextForConditionalGeneration"
# vLLM's architecture each prunekit architecture serves (PRUNEKIT_RECIPE routes these checkpoints to it)
QWEN_ARCHITECTURE = "PrunekitQwen2_5_VLForConditionalGeneration"
SERVES = {ARCHITECTURE: "LlavaForConditionalGeneration", NEXT_ARCHITECTURE: "LlavaNextForConditionalGeneration",
          QWEN_ARCHITECTURE: "Qwen2_5_VLForConditionalGeneration"}
# families whose prunekit adapter has no stage before the projector: only a layer-0 stage is served
NO_VISION_STAGE = {"llava_next": "LLaVA-NeXT (any-resolution tiles)", "qwen2_5_vl": "Qwen2.5-VL (merged patch grids)"}
RECIPE_ENV, OVERRIDES_ENV, RECORD_ENV = "PRUNEKIT_RECIPE", "PRUNEKIT_RECIPE_OVERRIDES", "PRUNEKIT_VLLM_RECORD"
RECIPE_KEY, OVERRIDES_KEY = "prunekit_recipe", "prunekit_overrides"
NO_PRUNING = "none"  # a recipe name that serves the model unpruned (a baseline with the same weight layout)

# Decoder criteria that, at layer 0, read only the visual tokens' own hidden states (the projected features).
# A third-party criterion joins by setting the class attribute ``image_only = True``.
IMAGE_ONLY_CRITERIA = frozenset({"divprune", "similarity", "l2_norm", "random", "uniform"})
# Mergers that build their tokens from each image's own visual tokens only (pooling-*, tome-*): served in a
# layer-0 stage on the projected tokens. A third-party merger joins by setting ``image_only = True``.
IMAGE_ONLY_MERGERS = frozenset({"grid_pool", "tome"})


class MissingExtraError(PrunekitError, RuntimeError):
    """An optional dependency of the feature asked for is not installed."""


class NotServableError(PrunekitError, ValueError):
    """A recipe that vLLM cannot run: it needs the text, decoder layers, or per-layer sequence lengths."""


def require_vllm() -> None:
    """Raise :class:`MissingExtraError` with the install command when vLLM is absent."""
    try:
        import vllm  # noqa: F401
        import vllm.model_executor.models  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"prunekit's vLLM plugin needs the vllm package, which is not installed or does "
                                f"not import ({exc}); install it with: {INSTALL_HINT}") from None


require_vllm()

from prunekit.api import Combiner, Criterion, ForwardContext, Merger, Stage  # noqa: E402
from prunekit.layout import TokenLayout  # noqa: E402
from prunekit.capture import received_attention  # noqa: E402
from prunekit.probes import (LayerInput, VisionAttention, VisionAttentionReceived, VisionFeatures,  # noqa: E402
                             VisionHidden, VisionKeys)
from prunekit.recipe import Recipe, VisionRecipe, collect_probes, load_recipe, resolve_stages  # noqa: E402
from prunekit.scoring import score  # noqa: E402
from prunekit.sequence import gather_tokens, select  # noqa: E402
from prunekit.vision import shorten_images, vision_stage_tokens  # noqa: E402
from prunekit.vision_input import tower_readers  # noqa: E402


# -- which recipes vLLM can serve -----------------------------------------------------------------
@dataclass(frozen=True)
class ProjectedStage:
    """A decoder stage at layer 0 whose criteria read only the projected visual tokens."""

    criteria: dict[str, Criterion]
    combiner: Combiner
    stage: Stage
    num_layers: int  # the decoder's depth, as the criteria see it
    merger: Merger | None = None  # summary tokens of the dropped ones, after the kept tokens

    def tokens(self, patches: int) -> int:
        """Tokens one image of ``patches`` projected tokens leaves: kept plus merged."""
        kept = int(self.stage.keep_counts(torch.tensor([patches]))[0])
        return kept + (0 if self.merger is None else int(self.merger.count(patches - kept)))


@dataclass(frozen=True)
class ServingPlan:
    """What the served model does to each image: a vision stage, a projected stage, or nothing."""

    name: str
    vision: VisionRecipe | None = None
    projected: ProjectedStage | None = None

    def tokens(self, patches: int) -> int:
        """Placeholder tokens (and embeddings) one image of ``patches`` patches gets."""
        if self.vision is not None:
            kept, merged = vision_stage_tokens(self.vision, patches)
            return kept + merged
        if self.projected is not None:
            return self.projected.tokens(patches)
        return patches


def _refuse(recipe: Recipe, why: str) -> NotServableError:
    return NotServableError(f"recipe {recipe.name!r} cannot run in vLLM: {why}. vLLM serves recipes that decide a "
                            "fixed number of tokens per image from the image alone: a 'vision:' block, or one "
                            "stage at layer 0 (compact positions, no merger) with criteria among "
                            f"{valid_list(sorted(IMAGE_ONLY_CRITERIA))} (docs/serving.md)")


def plan_recipe(source: Any, overrides: Sequence[str] | None, num_layers: int, vision_layers: int,
                family: str | None = None) -> ServingPlan:
    """The serving plan of a recipe (name, YAML path, dict or Recipe) for a decoder of ``num_layers`` layers and
    a vision tower of ``vision_layers``; :class:`NotServableError` when vLLM cannot run it. ``family``: the
    config's ``model_type``; on Qwen2.5-VL a vision block runs as prunekit runs it there, at the language model's
    input on each image's projected tokens (the same per-image stage as a layer-0 one)."""
    if isinstance(source, str) and source == NO_PRUNING:
        return ServingPlan(NO_PRUNING)
    recipe = load_recipe(source, overrides)
    if recipe.decode is not None:
        raise _refuse(recipe, "its decode block picks the cached visual tokens each decode step reads, which "
                              "vLLM's paged attention does not let a plugin mask")
    if recipe.vision is not None and recipe.schedule is not None:
        raise _refuse(recipe, "besides its vision block it has decoder stages (they prune inside the decoder, and "
                              "vLLM's paged KV cache keeps every prompt token at every layer)")
    if recipe.vision is not None and family == "qwen2_5_vl" and not tower_readers(recipe.vision):
        vision = recipe.vision
        if vision.merger is not None and vision.merger.lead:
            raise _refuse(recipe, f"its vision block's merger {vision.merger.name!r} puts tokens before the kept ones")
        stage = dataclasses.replace(vision.stage, positions=vision.stage.positions or recipe.positions)
        return ServingPlan(recipe.name, projected=_projected_stage(recipe, dict(vision.criteria), vision.combiner,
                                                                   stage, vision.merger, num_layers))
    if recipe.vision is not None:
        collect_probes(recipe.vision.parts(), (0,), vision_layers, "vision", f"recipe {recipe.name!r}, vision")
        return ServingPlan(recipe.name, vision=recipe.vision)
    stages = resolve_stages(recipe, num_layers)
    if len(stages) != 1 or stages[0].layer != 0:
        raise _refuse(recipe, f"its stages prune before decoder layers {[s.layer for s in stages]}, not once before "
                              "layer 0 (vLLM's paged KV cache keeps every prompt token at every layer)")
    stage = dataclasses.replace(stages[0], positions=stages[0].positions or recipe.positions)
    return ServingPlan(recipe.name, projected=_projected_stage(recipe, dict(recipe.criteria), recipe.combiner, stage,
                                                               recipe.merger, num_layers))


def _projected_stage(recipe: Recipe, criteria: dict[str, Criterion], combiner: Combiner, stage: Stage,
                     merger: Merger | None, num_layers: int) -> ProjectedStage:
    """One stage on each image's projected tokens (a layer-0 stage, or a vision block run at the language model's
    input), checked: its criteria and merger read those tokens only, its positions are compact."""
    if merger is not None and merger.name not in IMAGE_ONLY_MERGERS and not getattr(merger, "image_only", False):
        raise _refuse(recipe, f"its stage merges dropped tokens with {merger.name!r}, which is not known to "
                              "build its tokens from the image's own tokens alone (mergers served at layer 0: "
                              f"{valid_list(sorted(IMAGE_ONLY_MERGERS))}; a third-party one declares image_only = "
                              "True)")
    if merger is not None and any(p != LayerInput(layer=0) for p in merger.probes((0,), num_layers)):
        raise _refuse(recipe, f"its merger {merger.name!r} reads "
                              f"{', '.join(str(p) for p in merger.probes((0,), num_layers))}, not only the projected "
                              "visual tokens entering layer 0")
    if stage.positions != "compact":
        raise _refuse(recipe, f"positions {stage.positions!r} keeps gaps in the positions of the kept tokens; "
                              "vLLM numbers the prompt's placeholders contiguously (use positions: compact)")
    for key, criterion in criteria.items():
        if criterion.name not in IMAGE_ONLY_CRITERIA and not getattr(criterion, "image_only", False):
            probes = ", ".join(str(p) for p in criterion.probes((0,), num_layers)) or "none"
            raise _refuse(recipe, f"criterion {key!r} ({criterion.name!r}, probes: {probes}) is not known to read "
                                  "only the image's own tokens; it may read the instruction or the decoder, which "
                                  "vLLM's image encoder does not see (a criterion that reads only the visual "
                                  "tokens' hidden states declares image_only = True)")
        for probe in criterion.probes((0,), num_layers):
            if probe != LayerInput(layer=0):
                raise _refuse(recipe, f"criterion {key!r} ({criterion.name!r}) reads {probe}, not only the "
                                      "projected visual tokens entering layer 0")
    return ProjectedStage(criteria, combiner, stage, num_layers, merger)


def recipe_source(config: Any) -> tuple[str, list[str]] | None:
    """The recipe and overrides a model config (``prunekit_recipe``) or the environment names; None if neither."""
    name = getattr(config, RECIPE_KEY, None)
    overrides: Any = getattr(config, OVERRIDES_KEY, None)
    if name is None:
        name = os.environ.get(RECIPE_ENV) or None
        overrides = [o for o in os.environ.get(OVERRIDES_ENV, "").split(";") if o.strip()]
    if name is None:
        return None
    if isinstance(overrides, str):
        overrides = [o for o in overrides.split(";") if o.strip()]
    if overrides is not None and not (isinstance(overrides, (list, tuple))
                                      and all(isinstance(o, str) for o in overrides)):
        raise PrunekitError(f"{OVERRIDES_KEY} must be a list of 'dotted.key=value' strings, got {overrides!r}")
    return str(name), list(overrides or [])


def plan_for_config(config: Any) -> ServingPlan:
    """The serving plan a LLaVA or LLaVA-NeXT config asks for (``prunekit_recipe`` or ``PRUNEKIT_RECIPE``)."""
    named = recipe_source(config)
    if named is None:
        raise PrunekitError(f"prunekit's vLLM architectures ({', '.join(SERVES)}) need a recipe: set the model "
                            f"config key {RECIPE_KEY!r} (--hf-overrides '{{\"{RECIPE_KEY}\": \"visionzip-64\"}}') or "
                            f"the environment variable {RECIPE_ENV}; {NO_PRUNING!r} serves the model unpruned")
    vision = config.vision_config
    vision_layers = getattr(vision, "num_hidden_layers", None) or vision.depth  # Qwen2.5-VL's tower has a depth
    family = getattr(config, "model_type", None)
    plan = _cached_plan(named[0], tuple(named[1]), config.text_config.num_hidden_layers, vision_layers, family)
    if plan.vision is not None and family in NO_VISION_STAGE:
        served = ("vision blocks whose criteria read the projected tokens only (e.g. 'divprune-per-image'): this "
                  f"one reads the vision tower ({', '.join(tower_readers(plan.vision))}), which the plugin does not "
                  "read" if family == "qwen2_5_vl" else "no vision block: prunekit.apply shortens each tile apart "
                  "there, the plugin each image's whole token list")
        raise NotServableError(
            f"recipe {plan.name!r} has a 'vision:' block, which {NO_VISION_STAGE[family]} cannot run: prunekit has no "
            f"stage before its projector (the {family} adapter names no projector; prunekit.apply runs such a block "
            f"at the language model's input); the plugin serves {served}. A layer-0 stage on the projected tokens "
            "runs instead, e.g. 'divprune' (docs/serving.md)")
    return plan


@functools.lru_cache(maxsize=32)
def _cached_plan(name: str, overrides: tuple[str, ...], num_layers: int, vision_layers: int,
                 family: str | None = None) -> ServingPlan:
    """:func:`plan_recipe` once per recipe (the processor asks for every image)."""
    return plan_recipe(name, list(overrides), num_layers, vision_layers, family)


# -- pruning one batch of images ------------------------------------------------------------------
def prune_before_projector(vision: VisionRecipe, features: Tensor, captures: dict) -> tuple[Tensor, Tensor]:
    """Prune (and merge) each image's features before the projector, as prunekit's projector pre-hook does
    (:func:`prunekit.vision.shorten_images`).

    features: ``[n_images, patches, dim]`` (the tower's selected layer, CLS dropped); captures: the vision
    probes of this batch. Returns the features the projector gets ``[n_images, t, dim]`` and the kept patch
    indices ``[n_images, kept]`` (ascending).
    """
    out, kept, _ = shorten_images(vision, features, captures, num_layers=1)
    return out, kept


def prune_projected(stage: ProjectedStage, projected: Tensor) -> tuple[Tensor, Tensor]:
    """Keep each image's best projected tokens, as a prunekit stage before decoder layer 0 does for one image;
    a merger's tokens follow the kept ones, where prunekit's stage places them (after the image's kept tokens).

    projected: ``[n_images, patches, hidden]``. Returns ``[n_images, kept + merged, hidden]`` and the kept
    indices ``[n_images, kept]``.
    """
    n_images, patches, _ = projected.shape
    ones = torch.ones(n_images, patches, dtype=torch.bool, device=projected.device)
    index = torch.arange(patches, device=projected.device).expand(n_images, patches)
    layout = TokenLayout(visual=ones, instruction=~ones, valid=ones, original_index=index.clone(),
                         image_index=torch.zeros_like(index))
    ctx = ForwardContext(layout=layout, stage_layers=(0,), num_layers=stage.num_layers, stage=0)
    with torch.no_grad():
        for criterion in stage.criteria.values():
            for probe in criterion.probes((0,), stage.num_layers):
                criterion.observe(ctx, probe, projected, None)
    counts = stage.stage.keep_counts(torch.full((n_images,), patches, dtype=torch.long, device=projected.device))
    ctx.keep_counts = counts
    combined = score(stage.criteria, stage.combiner, ctx)  # [n_images, patches]
    selection = select(combined, ones, counts)
    out = gather_tokens(projected, selection.index)  # [n_images, kept, hidden]
    if stage.merger is not None:
        merged, valid = stage.merger.merge(projected, selection.dropped, combined, ctx)  # [n_images, m, hidden]
        expected = stage.tokens(patches) - selection.index.shape[1]
        if merged.shape[1] != expected or not bool(valid.all()):
            raise PrunekitError(f"merger {stage.merger.name!r} made {merged.shape[1]} tokens per image "
                                f"({int(valid.sum())} valid), its count() promised {expected}")
        out = torch.cat([out, merged.to(out.dtype)], dim=1)
    return out, selection.index


# -- captures of vLLM's CLIP tower -------------------------------------------------------------------
@contextlib.contextmanager
def capture_vision(tower: nn.Module, probes: Sequence[Any], depth: int) -> Iterator[dict]:
    """Forward hooks on vLLM's CLIP encoder layers that fill a ``{probe: tensor}`` dict, as prunekit's vision
    probes do in transformers; removed on exit (also after an exception).

    ``depth`` is the tower's configured layer count: negative probe layers count from it, as in transformers
    (vLLM builds the tower only up to LLaVA's feature layer).
    """
    layers = tower.vision_model.encoder.layers
    captures: dict = {}
    handles = []
    try:
        for probe in dict.fromkeys(probes):
            if isinstance(probe, VisionFeatures):
                continue  # no hook: the stage hands the features over itself
            layer = probe.layer % depth
            if layer >= len(layers):
                raise NotServableError(f"{probe} reads vision layer {layer} of {depth}, but vLLM builds the tower only "
                                       f"up to LLaVA's feature layer ({len(layers)} layers)")
            if isinstance(probe, VisionHidden):
                handles.append(layers[layer].register_forward_hook(_store_hidden(captures, probe)))
                continue
            attention = layers[layer].self_attn
            if attention.num_heads_per_partition != attention.num_heads:
                raise NotServableError(f"{probe} needs all {attention.num_heads} heads of vision layer {layer}, but "
                                       f"tensor parallelism splits them; run the tower unsplit "
                                       f"(mm_encoder_tp_mode='data')")
            handles.append(attention.qkv_proj.register_forward_hook(_store_attention(captures, probe, attention)))
        yield captures
    finally:
        for handle in handles:
            handle.remove()


def _store_hidden(captures: dict, probe: VisionHidden):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        captures[probe] = (output[0] if isinstance(output, tuple) else output).detach()  # [n_images, tokens, dim]
    return hook


def _store_attention(captures: dict, probe: Any, attention: nn.Module):
    heads, head_dim, scale = attention.num_heads, attention.head_dim, attention.scale

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        qkv = output[0] if isinstance(output, tuple) else output  # [n_images, tokens, 3 * heads * head_dim]
        n_images, tokens, _ = qkv.shape
        query, key, _ = (part.reshape(n_images, tokens, heads, head_dim).transpose(1, 2)
                         for part in qkv.chunk(3, dim=-1))  # [n_images, heads, tokens, head_dim] each
        with torch.no_grad():
            if isinstance(probe, VisionKeys):
                captures[probe] = key.mean(dim=1)  # [n_images, tokens, head_dim]
            elif isinstance(probe, VisionAttentionReceived):
                captures[probe] = received_attention(query, key, {"scaling": scale})  # [n_images, tokens]
            else:
                assert isinstance(probe, VisionAttention)
                q = query[:, :, probe.query: probe.query + 1].float()  # [n_images, heads, 1, head_dim]
                logits = torch.matmul(q, key.float().transpose(-1, -2)) * scale  # [n_images, heads, 1, tokens]
                captures[probe] = torch.softmax(logits, dim=-1)[:, :, 0].mean(dim=1)  # [n_images, tokens]
    return hook


# -- the record of kept patches ------------------------------------------------------------------------
_RECORD_LOCK = threading.Lock()


def pixel_fingerprint(pixels: Tensor) -> str:
    """A short hash of one image's pixel values (``[3, h, w]``, or its rows of patches), rounded to 1e-4 so both
    processes agree."""
    rounded = torch.round(pixels.detach().float().cpu() * 1e4).to(torch.int64).contiguous()
    return hashlib.sha1(rounded.numpy().tobytes()).hexdigest()[:16]


def _record(pixels: Sequence[Tensor], kept: Sequence[Tensor], plan: ServingPlan) -> None:
    """Append one line per image (pixels ``[3, h, w]``, kept indices ``[k]``) to ``PRUNEKIT_VLLM_RECORD``."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    lines = [json.dumps({"recipe": plan.name, "image": pixel_fingerprint(p), "kept": k.tolist()})
             for p, k in zip(pixels, kept)]
    with _RECORD_LOCK, open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


# -- the vLLM model and processor ---------------------------------------------------------------------
# Checkpoints saved by transformers' LlavaForConditionalGeneration / LlavaNextForConditionalGeneration with a
# bare CLIP vision transformer as the tower (prunekit's toy, transformers 5's own saves) name it
# ``vision_tower.embeddings...``; vLLM's CLIPVisionModel nests it.
TOWER_PREFIXES = {f"vision_tower.{part}.": f"vision_tower.vision_model.{part}."
                  for part in ("embeddings", "pre_layrnorm", "encoder", "post_layernorm")}


def _build_classes() -> dict[str, type]:
    """The vLLM classes; built on first use so that loading the plugin imports no model code."""
    from vllm.model_executor.models import llava, llava_next, qwen2_5_vl
    from vllm.multimodal.processing import PromptReplacement
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media
    from vllm.model_executor.models.utils import WeightsMapper
    from vllm.multimodal import MULTIMODAL_REGISTRY

    class PrunekitLlavaProcessingInfo(llava.LlavaProcessingInfo):
        """LLaVA-1.5's processing with the recipe's token count per image."""

        def serving_plan(self) -> ServingPlan:
            return plan_for_config(self.get_hf_config())

        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            patches = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            return self.serving_plan().tokens(patches)

    @MULTIMODAL_REGISTRY.register_processor(llava._build_llava_or_pixtral_hf_processor,
                                            info=PrunekitLlavaProcessingInfo,
                                            dummy_inputs=llava.LlavaDummyInputsBuilder)
    class PrunekitLlavaForConditionalGeneration(llava.LlavaForConditionalGeneration):
        """vLLM's LLaVA-1.5 whose image features are pruned by a prunekit recipe before the language model."""

        hf_to_vllm_mapper = llava.LlavaForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
            orig_to_new_prefix=TOWER_PREFIXES)

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            config = vllm_config.model_config.hf_config
            if config.vision_config.model_type != "clip_vision_model":
                raise NotServableError(f"{ARCHITECTURE} prunes LLaVA-1.5 with a CLIP tower; this checkpoint's tower "
                                       f"is {config.vision_config.model_type!r}")
            if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
                raise NotServableError(
                    f"{ARCHITECTURE} needs one vision feature layer and the 'default' strategy (CLS dropped); got "
                    f"layer {config.vision_feature_layer!r}, strategy {config.vision_feature_select_strategy!r}")
            self.serving_plan = plan_for_config(config)  # refuses a recipe vLLM cannot run before any weight loads
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            vision = self.serving_plan.vision
            self.vision_probes = [probe for _, probe in collect_probes(
                vision.parts(), (0,), config.vision_config.num_hidden_layers, "vision", "vision")] if vision else []

        def _process_image_input(self, image_input: Mapping[str, Any]) -> Tensor | tuple[Tensor, ...]:
            if image_input["type"] != "pixel_values":  # precomputed embeddings: their length is their own
                return super()._process_image_input(image_input)
            plan, pixels = self.serving_plan, image_input["pixel_values"]
            depth = self.config.vision_config.num_hidden_layers
            with capture_vision(self.vision_tower, self.vision_probes, depth) as captures:
                features = self._image_pixels_to_features(self.vision_tower, pixels)  # [n_images, patches, dim]
            kept = torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)
            if plan.vision is not None:
                features, kept = prune_before_projector(plan.vision, features, captures)
            projected = self.multi_modal_projector(features)  # [n_images, t, hidden]
            if plan.projected is not None:
                projected, kept = prune_projected(plan.projected, projected)
            _record(pixels, kept, plan)
            return projected

    class PrunekitLlavaNextProcessingInfo(llava_next.LlavaNextProcessingInfo):
        """LLaVA-NeXT's processing with the recipe's token count per image (of its whole token list)."""

        def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
            tokens = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
            return plan_for_config(self.get_hf_config()).tokens(tokens)

    @MULTIMODAL_REGISTRY.register_processor(llava_next.LlavaNextMultiModalProcessor,
                                            info=PrunekitLlavaNextProcessingInfo,
                                            dummy_inputs=llava_next.LlavaDummyInputsBuilder)
    class PrunekitLlavaNextForConditionalGeneration(llava_next.LlavaNextForConditionalGeneration):
        """vLLM's LLaVA-NeXT whose images are pruned by a prunekit layer-0 recipe before the language model:
        each image's whole token list (base tile, unpadded tiles, image-newline tokens), as prunekit's
        transformers path prunes LLaVA-NeXT."""

        hf_to_vllm_mapper = llava_next.LlavaNextForConditionalGeneration.hf_to_vllm_mapper | WeightsMapper(
            orig_to_new_prefix=TOWER_PREFIXES)

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            self.serving_plan = plan_for_config(vllm_config.model_config.hf_config)  # refuses before weights load
            super().__init__(vllm_config=vllm_config, prefix=prefix)

        def _process_image_input(self, image_input: Any) -> Tensor | list[Tensor]:
            images = super()._process_image_input(image_input)  # per image [tokens, hidden]
            if image_input["type"] != "pixel_values":  # precomputed embeddings: their length is their own
                return images
            plan, out, kept = self.serving_plan, [], []
            for tokens in images:
                if plan.projected is None:
                    out.append(tokens)
                    kept.append(torch.arange(tokens.shape[0], device=tokens.device))
                    continue
                pruned, index = prune_projected(plan.projected, tokens[None])  # [1, k, hidden], [1, k]
                out.append(pruned[0])
                kept.append(index[0])
            base_tiles = [tiles[0] for tiles in image_input["pixel_values"]]  # [3, h, w]: unpadded in any batch
            _record(base_tiles, kept, plan)
            return out

    class PrunekitQwen2_5_VLMultiModalProcessor(qwen2_5_vl.Qwen2_5_VLMultiModalProcessor):
        """Qwen2.5-VL's processing with the recipe's token count per image (videos as vLLM's own EVS does)."""

        def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any],
                                out_mm_kwargs: Any) -> Sequence[Any]:
            plan = plan_for_config(self.info.get_hf_config())
            updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
            for i, update in enumerate(updates):
                if update.modality == "image":
                    full = update.replacement  # item index -> the image's placeholder ids, one per merged patch

                    def pruned(item_idx: int, full: Any = full) -> list[int]:
                        ids = full(item_idx)
                        return ids[:plan.tokens(len(ids))]

                    updates[i] = PromptReplacement(modality="image", target=update.target, replacement=pruned)
            return updates

    @MULTIMODAL_REGISTRY.register_processor(PrunekitQwen2_5_VLMultiModalProcessor,
                                            info=qwen2_5_vl.Qwen2_5_VLProcessingInfo,
                                            dummy_inputs=qwen2_5_vl.Qwen2_5_VLDummyInputsBuilder)
    class PrunekitQwen2_5_VLForConditionalGeneration(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration):
        """vLLM's Qwen2.5-VL whose images are pruned by a prunekit layer-0 recipe before the language model.

        Each kept token keeps its own (t, h, w) M-RoPE offsets in its image and the text after an image continues
        right after the image's largest kept position, as prunekit's transformers path does (``compact``). vLLM numbers the
        placeholders before the encoder has run, so the kept tokens' grid positions travel as four extra
        channels of each image's embeddings, which vLLM's ``recompute_mrope_positions`` (its multimodal-pruning
        interface) writes into the request's positions; vLLM calls it only with ``video_pruning_rate`` > 0,
        so the engine needs that setting (videos are then pruned by vLLM's own EVS at that rate).
        """

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            self.serving_plan = plan_for_config(vllm_config.model_config.hf_config)  # refuses before weights load
            mm_config = vllm_config.model_config.get_multimodal_config()
            if not mm_config.is_multimodal_pruning_enabled():
                raise NotServableError(
                    f"{QWEN_ARCHITECTURE} needs vLLM's multimodal-pruning path to place the kept image tokens at "
                    "their own M-RoPE positions, which vLLM runs only when video_pruning_rate > 0 (got "
                    f"{mm_config.video_pruning_rate!r}); start the engine with --video-pruning-rate (e.g. 0.5, "
                    "also vLLM's EVS rate for videos) or LLM(..., video_pruning_rate=0.5)")
            super().__init__(vllm_config=vllm_config, prefix=prefix)

        def embed_multimodal(self, **kwargs: object) -> Any:
            inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
            out: tuple[Tensor, ...] = ()
            for modality, media in inputs.items():  # the order of the keyword arguments, as vLLM's own
                if modality == "image":
                    out += self._prune_images(self._process_image_input(media), media)
                if modality == "video":
                    out += tuple(self._postprocess_video_embeds_evs(self._process_video_input(media), media))
            return out

        def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[Tensor],
                                      mrope_positions: Tensor, num_computed_tokens: int) -> tuple[Any, Tensor, int]:
            out = super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                    num_computed_tokens)
            if os.environ.get(RECORD_ENV) and num_computed_tokens == 0:  # a whole prompt's positions
                ids = input_ids.tolist() if isinstance(input_ids, Tensor) else list(input_ids)
                line = json.dumps({"prompt": ids, "positions": out[1][:, :len(ids)].tolist()})
                with _RECORD_LOCK, open(os.environ[RECORD_ENV], "a", encoding="utf-8") as handle:
                    handle.write(line + "\n")
            return out

        def _prune_images(self, images: Sequence[Tensor], image_input: Mapping[str, Any]) -> tuple[Tensor, ...]:
            """Each image's kept embeddings ``[kept, hidden + 4]``: the last four channels are the kept tokens'
            (t, h, w) grid positions and where the text after the image continues (its largest kept position + 1)."""
            plan, merge = self.serving_plan, self.visual.spatial_merge_size
            grids = image_input["image_grid_thw"].tolist()
            out, kept = [], []
            for tokens, grid in zip(images, grids, strict=True):  # tokens: [t * h * w / merge^2, hidden]
                positions = compute_mrope_for_media(torch.tensor(grid), merge)  # [n, 4]: t, h, w, grid width
                index = torch.arange(tokens.shape[0], device=tokens.device)
                if plan.projected is not None and image_input["type"] == "pixel_values":
                    pruned, chosen = prune_projected(plan.projected, tokens[None])  # [1, k, hidden], [1, k]
                    tokens, index = pruned[0], chosen[0]
                kept.append(index)
                positions = positions.to(tokens.device)[index]  # [k, 4]
                positions[:, 3] = positions[:, :3].max() + 1  # compact: the text after continues after the kept
                out.append(torch.cat([tokens, positions.to(tokens.dtype)], dim=1))
            if image_input["type"] == "pixel_values" and os.environ.get(RECORD_ENV):
                sizes = [t * h * w for t, h, w in grids]  # patch rows of each image
                pixels = self.visual.input_norm(image_input["pixel_values"], self.visual.dtype)  # vLLM may
                _record(pixels.split(sizes), kept, plan)  # normalize on the device (mm_device_do_normalize)
            return tuple(out)

    return {"PrunekitLlavaProcessingInfo": PrunekitLlavaProcessingInfo,
            QWEN_ARCHITECTURE: PrunekitQwen2_5_VLForConditionalGeneration,
            ARCHITECTURE: PrunekitLlavaForConditionalGeneration,
            "PrunekitLlavaNextProcessingInfo": PrunekitLlavaNextProcessingInfo,
            NEXT_ARCHITECTURE: PrunekitLlavaNextForConditionalGeneration}


_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    if name in (*SERVES, "PrunekitLlavaProcessingInfo", "PrunekitLlavaNextProcessingInfo"):
        if not _CLASSES:
            _CLASSES.update(_build_classes())
        return _CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register prunekit's architectures in this process.

    With ``PRUNEKIT_RECIPE`` set, ``LlavaForConditionalGeneration`` and ``LlavaNextForConditionalGeneration``
    checkpoints run through them too.
    """
    from vllm import ModelRegistry

    for architecture, stock in SERVES.items():
        target = f"{__name__}:{architecture}"
        if architecture not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(architecture, target)
        if os.environ.get(RECIPE_ENV):
            ModelRegistry.register_model(stock, target)
