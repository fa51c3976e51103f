"""The stage before the language model: prune and merge each image's features before the projector.

VisionZip-style methods shorten the image before the language model sees it. prunekit does it
with hooks only:

1. projector pre-hook (whenever the model encodes images, also before generate's first forward):
   criteria score each image's ``P`` features (from the vision probes), the top ``k`` are gathered
   in order, the merger adds its summary tokens, and the projector receives ``[n_images, t, dim]``.
2. model pre-hook: the prompt is rewritten with ``t`` placeholder tokens per image instead of
   ``P`` (``t`` = kept + merged tokens, known from the recipe), so the model's own check that
   placeholders match features holds; the attention mask and position ids follow.
3. vision probes (installed through ``prunekit.capture``, as the decoder's): forward hooks and the
   attention tap capture what criteria asked for (the CLS attention row, keys, hidden states of a
   vision layer) as the vision tower runs, into the forward's ``VisionRecord``.
4. decode steps: the attention mask drops the removed placeholder columns and positions shift.

:class:`VisionPruner` keeps no tensors: what one forward captures and keeps lives in the
pruner's ``Running`` record.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from prunekit.api import Adapter, ForwardContext
from prunekit.capture import Site, install_probes
from prunekit.errors import AdapterError, LayoutError, RecipeError
from prunekit.hooks import HookSet
from prunekit.layout import TokenLayout, run_starts
from prunekit.probes import VisionAttention, VisionFeatures
from prunekit.recipe import VisionRecipe, collect_probes
from prunekit.record import PromptRewrite, Running, VisionRecord
from prunekit.scoring import Timer, score
from prunekit.sequence import gather_tokens, keep_in_order, select


def vision_stage_tokens(vision: Any, patches: int) -> tuple[int, int]:
    """(kept patches, merged tokens) a vision stage gives an image of ``patches`` tokens.

    A stage that would lengthen the image (its count is at least the image's size and the merger adds
    tokens, e.g. VisionZip's CLS) leaves it whole instead: ``(patches, 0)``.
    """
    kept = int(vision.stage.keep_counts(torch.tensor([patches]))[0])
    merged = 0 if vision.merger is None or vision.merger.in_place else int(vision.merger.count(patches - kept))
    return (patches, 0) if kept + merged > patches else (kept, merged)


def run_rank(visual: Tensor) -> Tensor:
    """Index of each visual token within its contiguous run: [batch, seq] long (0 off runs)."""
    positions = torch.arange(visual.shape[1], device=visual.device).expand_as(visual)
    start_of_run = torch.where(run_starts(visual), positions, torch.zeros_like(positions)).cummax(dim=1).values
    return torch.where(visual, positions - start_of_run, torch.zeros_like(positions))


def run_lengths(visual: Tensor) -> Tensor:
    """Length of the run each visual token is in: [batch, seq] long (0 off runs)."""
    reversed_rank = run_rank(visual.flip(1)).flip(1)  # distance to the run's end
    return torch.where(visual, run_rank(visual) + reversed_rank + 1, torch.zeros_like(reversed_rank))


def image_rank(visual: Tensor, per_image: int | None) -> tuple[Tensor, Tensor]:
    """Index of each visual token within its image, and each image's length: two ``[batch, seq]`` long tensors.

    An image is a contiguous visual run, except that a run of several whole ``per_image``-token images
    placed side by side (``<image><image>``, nothing between) is split into them.
    """
    rank, length = run_rank(visual), run_lengths(visual)
    if not per_image:
        return rank, length
    several = visual & (length > per_image) & (length % per_image == 0)  # [batch, seq]
    return torch.where(several, rank % per_image, rank), torch.where(several, torch.full_like(length, per_image),
                                                                       length)


def tokens_per_image(model: nn.Module, has_cls: bool = True) -> int | None:
    """Placeholder tokens one image takes in a LLaVA-style prompt (the vision tower's patch grid, plus the CLS
    token under the "full" feature strategy when the tower has one), or None when the config does not say."""
    config = getattr(model, "config", None)
    vision = getattr(config, "vision_config", None)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int) or patch <= 0:
        return None
    full = getattr(config, "vision_feature_select_strategy", "default") == "full"
    return (size // patch) ** 2 + int(full and has_cls)


def shorten_images(vision: VisionRecipe, features: Tensor, captures: dict, num_layers: int
                   ) -> tuple[Tensor, Tensor, int]:
    """A vision stage on a batch of images, without hooks: ``features`` ``[n_images, patches, dim]`` (what the
    projector receives) and the vision probes' ``captures`` -> the shortened features ``[n_images, t, dim]``
    (``features`` itself when the stage leaves images this small whole), the kept patch indices
    ``[n_images, kept]`` (ascending) and how many merged tokens lead each image.

    The projector pre-hook runs it; so does prunekit's vLLM plugin, on vLLM's features.
    """
    n_images, patches, _ = features.shape
    kept, merged = vision_stage_tokens(vision, patches)
    index = torch.arange(patches, device=features.device).expand(n_images, patches)
    if kept == patches:
        return features, index, 0
    ones = torch.ones(n_images, patches, dtype=torch.bool, device=features.device)
    layout = TokenLayout(visual=ones, instruction=~ones, valid=ones, original_index=index.clone(),
                         image_index=torch.zeros_like(index))
    captures = {**captures, VisionFeatures(): features.detach()}
    ctx = ForwardContext(layout=layout, stage_layers=(0,), num_layers=num_layers, stage=0, captures=captures)
    counts = torch.full((n_images,), kept, dtype=torch.long, device=features.device)
    ctx.keep_counts = counts
    combined = score(vision.criteria, vision.combiner, ctx)  # [n_images, patches]
    with torch.no_grad():
        selection = select(combined, ones, counts)  # index [n_images, kept], in patch order
    if vision.merger is not None and vision.merger.in_place:  # merged into kept patches, in the graph
        features = vision.merger.merge_into_kept(features, ~selection.dropped, combined, ctx)
    out = gather_tokens(features, selection.index)  # [n_images, kept, dim]
    lead = 0
    if vision.merger is not None and not vision.merger.in_place:  # merged tokens built from the features
        extra, valid = vision.merger.merge(features, selection.dropped, combined, ctx)  # [n_images, merged, dim]
        if extra.shape[1] != merged or not bool(valid.all()):
            raise RecipeError(f"vision.merge: {type(vision.merger).__name__} made {extra.shape[1]} tokens "
                              f"per image, its count() promised {merged}")
        lead = min(vision.merger.lead, extra.shape[1])  # a merger may lead with all its tokens
        out = torch.cat([extra[:, :lead].to(out.dtype), out, extra[:, lead:].to(out.dtype)], dim=1)
    return out, selection.index, lead


class VisionPruner:
    """Installs the hooks of a recipe's ``vision`` stage: its probes, the projector pre-hook."""

    def __init__(self, model: nn.Module, adapter: Adapter, vision: VisionRecipe, running: Running) -> None:
        self.model = model
        self.adapter = adapter
        self.vision = vision
        self.running = running
        self.towers = [list(layers) for layers in adapter.vision_towers(model)]  # Video-LLaVA: images, videos
        self.layers = self.towers[0]
        self.projector = adapter.projector(model)
        self.wanted = collect_probes(vision.parts(), (0,), len(self.layers), "vision", "vision")
        no_cls = adapter.vision_has_cls(model) is False  # a SigLIP tower: token 0 is a patch
        cls_readers = [plugin for plugin, probe in self.wanted if isinstance(probe, VisionAttention) and probe.query == 0]
        if cls_readers and no_cls:
            names = ", ".join(sorted({repr(getattr(p, "name", type(p).__name__)) for p in cls_readers}))
            raise RecipeError(f"vision: {names} read the vision tower's CLS attention (token 0), but "
                              f"{type(model).__name__}'s tower has no CLS token (a SigLIP tower: token 0 is a patch); "
                              "use vision criteria that read the patches only, or a decoder-stage recipe")
        self.per_image = tokens_per_image(model, has_cls=not no_cls)  # splits adjacent images (<image><image>)
        self._hooks = HookSet()
        self._timed: Timer | None = None
        self.retain: set = set()  # tower probes decoder criteria read too (kept in the record past the projector)

    def read_for_decoder(self, tower: list) -> None:
        """Also capture ``tower`` (decoder criteria's ``(plugin, probe)`` pairs, :class:`TowerProbes`) and keep them
        in the forward's record past the projector, for the decoder stages."""
        known = {probe for _, probe in self.wanted}
        self.wanted = self.wanted + [(plugin, probe) for plugin, probe in tower if probe not in known]
        self.retain = {probe for _, probe in tower}

    # -- hooks ----------------------------------------------------------------------------
    def install(self, timed: Timer) -> None:
        self._timed = timed
        for layers in self.towers:  # each tower's forward fills the captures of the projector call after it
            if len(layers) != len(self.layers):
                raise LayoutError(f"the vision towers of {type(self.model).__name__} have {len(self.layers)} and "
                                  f"{len(layers)} layers; a vision stage's probes index one depth")
            install_probes(Site(self.model, self.adapter, self._hooks, self.running, timed, vision_layers=layers),
                           self.wanted)
        self._hooks.add(self.projector.register_forward_pre_hook(self._projector_hook))
        self._hooks.add(self.projector.register_forward_hook(self._projected_hook))
        self._hooks.add(self.model.register_forward_pre_hook(self._expanded_images_hook, with_kwargs=True,
                                                             prepend=True))

    def remove(self) -> None:
        self._hooks.remove()

    def _projector_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        """Every image the model encodes while the pruner is installed is shortened (generate encodes
        images before its first forward, so this cannot wait for the model pre-hook)."""
        features = args[0]  # [n_images, patches, dim]
        record = self.running.vision_record()
        captures = record.captures
        record.captures = {probe: value for probe, value in captures.items() if probe in self.retain}
        with self._timed("vision stage"):
            out, record.kept_patches, record.lead = shorten_images(self.vision, features, captures, len(self.layers))
        return None if out is features else (out, *args[1:])  # a stage that leaves images this small whole

    def _projected_hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        """Keep the projected (shortened) images of this forward: ``[n_images, t, hidden]``."""
        self.running.vision_record().features = output

    def _expanded_images_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """``generate(num_beams>1 or num_return_sequences>1)`` encodes the images once, then repeats each
        sample's images for its copies by counting placeholders against feature rows; the shortened rows no
        longer match the prompt's placeholders, so the repeat goes wrong. Before the prefill this hook gives
        the model each copy's shortened images (and the record their kept patches) again."""
        record = self.running.vision
        input_ids = kwargs.get("input_ids")
        if record is None or record.features is None or input_ids is None:
            return None
        visual = self.adapter.token_layout(self.model, input_ids, kwargs.get("attention_mask")).visual
        frames = self.adapter.projected_video_frames(self.model, input_ids)
        kind = "video" if frames is not None and bool((frames[0] & visual).any()) else "image"
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get(kind)
        if encoded is None:
            return None
        rank, _ = self.unit_rank(input_ids, visual)
        images_per_row = (visual & (rank == 0)).sum(dim=1).tolist()  # [rows]
        n_encoded, rows = record.features.shape[0], len(images_per_row)
        copies, leftover = divmod(sum(images_per_row), n_encoded)
        if leftover or rows % copies:
            raise LayoutError(f"the prompt holds {sum(images_per_row)} images in {rows} rows, but {n_encoded} were "
                              "encoded; generate's repeat of pre-encoded images cannot be followed")
        index: list[int] = []  # which encoded image each image of the expanded prompt is
        first = 0
        for sample in range(rows // copies):  # rows are repeat-interleaved copies of each sample
            count = images_per_row[sample * copies]
            index += list(range(first, first + count)) * copies
            first += count
        chosen = torch.tensor(index, device=record.features.device)
        record.features, record.kept_patches = record.features[chosen], record.kept_patches[chosen]
        repeated = copy.copy(encoded)
        if isinstance(encoded.pooler_output, Tensor):  # [n_images, t, dim] (Video-LLaVA)
            repeated.pooler_output = record.features
        else:  # per image of the prompt: [t, dim] (LLaVA)
            repeated.pooler_output = list(record.features)
        return args, {**kwargs, "mm_encoder_outputs": {**kwargs["mm_encoder_outputs"], kind: repeated}}

    def unit_rank(self, input_ids: Tensor, visual: Tensor) -> tuple[Tensor, Tensor]:
        """Index of each visual token within the image or video frame the projector encoded it in, and that
        unit's length: two ``[batch, seq]`` long tensors (:func:`image_rank`, video frames split by their size)."""
        frames = self.adapter.projected_video_frames(self.model, input_ids)
        if frames is None:
            return image_rank(visual, self.per_image)
        video, per_frame = frames[0] & visual, frames[1]
        if bool(video.any()) and bool((visual & ~video).any()):
            raise LayoutError(f"{type(self.model).__name__}: a vision stage shortens the images or the videos of "
                              "one call, not both (this call holds image and video placeholders); run them in "
                              "separate calls")
        rank, length = image_rank(visual & ~video, self.per_image)
        frame_rank, frame_length = image_rank(video, per_frame)
        return torch.where(video, frame_rank, rank), torch.where(video, frame_length, length)

    # -- the prompt -------------------------------------------------------------------------
    def rewrite_prompt(self, input_ids: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None,
                       visual: Tensor, pad_id: int) -> tuple[Tensor, Tensor, Tensor | None, PromptRewrite]:
        """Shorten every image run of ``P`` placeholders to ``t``; returns ids, mask, positions and the rewrite."""
        batch, seq = input_ids.shape
        mask = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
        rank, image_length = self.unit_rank(input_ids, visual)  # [batch, seq] each: within one image or frame
        allowed = torch.zeros_like(rank)
        for length in image_length[visual].unique().tolist():
            kept, merged = vision_stage_tokens(self.vision, int(length))
            allowed = torch.where(image_length == length, kept + merged, allowed)
        keep = ~visual | (rank < allowed)
        index, fill = keep_in_order(keep)
        new_ids = input_ids.gather(1, index).masked_fill(fill, pad_id)
        new_mask = mask.gather(1, index) & ~fill
        new_positions = None
        if position_ids is not None:
            positions = position_ids.expand(batch, seq)
            first = positions.gather(1, new_mask.long().argmax(dim=1, keepdim=True))  # [batch, 1]
            new_positions = (first + new_mask.long().cumsum(dim=1) - 1).masked_fill(~new_mask, 0)
        flat_starts = (visual & (rank == 0)).flatten().nonzero().flatten()  # first token of each image
        rewrite = PromptRewrite(
            columns=index, fill=fill, shift=mask.sum(dim=1) - new_mask.sum(dim=1), original_length=seq,
            image_starts=flat_starts, sample_of_image=flat_starts // seq,
        )
        out_mask = new_mask.to(attention_mask.dtype) if attention_mask is not None else None
        return new_ids, out_mask, new_positions, rewrite


def rewrite_decode_kwargs(rewrite: PromptRewrite, attention_mask: Tensor | None, position_ids: Tensor | None
                          ) -> tuple[Tensor | None, Tensor | None]:
    """Map a decode step's mask and positions (over the original prompt) onto the shortened prompt."""
    mask = None
    if attention_mask is not None:
        length = rewrite.original_length
        if attention_mask.shape[1] < length:
            raise LayoutError(f"decode step: attention_mask covers {attention_mask.shape[1]} tokens, fewer than "
                              f"the {length}-token prompt")
        prompt = attention_mask[:, :length].gather(1, rewrite.columns).masked_fill(rewrite.fill, 0)
        mask = torch.cat([prompt, attention_mask[:, length:]], dim=1)
    positions = None if position_ids is None else position_ids - rewrite.shift[:, None]
    return mask, positions


def original_positions(rewrite: PromptRewrite, shortened_visual: Tensor, vision: VisionRecord | None) -> Tensor:
    """Original prompt column of each token of the shortened prompt [batch, new_len]; -1 for merged image tokens.

    Needs the patches the projector kept (``vision``, after the prefill's projector hook).
    """
    batch, new_len = rewrite.columns.shape
    origin = rewrite.columns.masked_fill(rewrite.fill, -1).clone()
    if vision is None or vision.kept_patches is None:
        return origin
    lead = vision.lead  # merged tokens before the kept patches in each image run
    kept = vision.kept_patches.shape[1]
    if kept == 0:  # a stage that keeps no patch by score: every image token is a merged one
        return torch.where(shortened_visual, torch.full_like(origin, -1), origin)
    n_images, n_runs = len(rewrite.image_starts), int(run_starts(shortened_visual).sum())
    per_image = None  # adjacent images: every image of a LLaVA prompt has the same shortened length
    if n_images > n_runs and int(shortened_visual.sum()) % n_images == 0:
        per_image = int(shortened_visual.sum()) // n_images
    rank, _ = image_rank(shortened_visual, per_image)  # [batch, new_len] within each image
    image_of_token = (shortened_visual & (rank == 0)).long().cumsum(dim=1) - 1  # image index within sample
    images_before = torch.bincount(rewrite.sample_of_image, minlength=batch).cumsum(0)
    images_before = torch.nn.functional.pad(images_before, (1, 0))[:-1]  # [batch] first image of each sample
    image = (images_before[:, None] + image_of_token).clamp(min=0, max=max(len(rewrite.image_starts) - 1, 0))
    patch_slot = rank - lead
    is_patch = shortened_visual & (patch_slot >= 0) & (patch_slot < kept)
    patch = vision.kept_patches[image, patch_slot.clamp(0, kept - 1)]  # [batch, new_len]
    start_column = rewrite.image_starts[image] - rewrite.sample_of_image[image] * rewrite.original_length
    origin = torch.where(is_patch, start_column + patch, origin)
    return torch.where(shortened_visual & ~is_patch, torch.full_like(origin, -1), origin)


def tower_depth(adapter: Adapter, model: nn.Module) -> int | None:
    """Layers of the vision tower whose patches reach the projector one to one (LLaVA-1.5, Video-LLaVA); None
    where a vision block runs at the language model's input instead (the tower is not read for decoder criteria)."""
    try:
        adapter.projector(model)
        return len(adapter.vision_layers(model))
    except (AdapterError, NotImplementedError):
        return None


class TowerProbes:
    """Vision-tower probes that decoder criteria declare (MustDrop's key set: the CLS attention of the last vision
    layer): installed on every tower, they fill the forward's vision record, which the criteria read through
    ``ctx.capture`` as ``[n_images, tokens, ...]``, images in prompt order, and ``ctx.vision_stage`` says what a
    vision block kept of each image. Only where :func:`tower_depth` finds the tower (``collect_probes`` refuses
    them elsewhere); with a vision block its :class:`VisionPruner` captures them (:meth:`VisionPruner.read_for_decoder`).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, wanted: list, running: Running, recipe: str) -> None:
        readers = ", ".join(sorted({f"{getattr(p, 'key', '')} ({type(probe).__name__})" for p, probe in wanted}))
        if adapter.vision_has_cls(model) is False and any(
                isinstance(probe, VisionAttention) and probe.query == 0 for _, probe in wanted):
            raise RecipeError(f"recipe {recipe!r}: {readers} read the vision tower's CLS attention (token 0), but "
                              f"{type(model).__name__}'s tower has no CLS token")
        self.model, self.adapter, self.wanted, self.running = model, adapter, wanted, running

    def install(self, hooks: HookSet, timed: Timer) -> None:
        for layers in self.adapter.vision_towers(self.model):
            install_probes(Site(self.model, self.adapter, hooks, self.running, timed, vision_layers=list(layers)),
                           self.wanted)

    def captures(self) -> dict:
        """This forward's tower captures (empty when no image was encoded)."""
        record = self.running.vision
        return {} if record is None else {probe: record.captures[probe] for _, probe in self.wanted
                                          if probe in record.captures}

    def vision_stage(self) -> tuple[Tensor, int] | None:
        """What this forward's vision block kept of each image: the kept patches ``[n_images, k]`` (ascending) and
        how many merged tokens lead each image; None without a vision block."""
        record = self.running.vision
        return None if record is None or record.kept_patches is None else (record.kept_patches, record.lead)
