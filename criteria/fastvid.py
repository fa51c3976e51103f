"""FastVID (Shen et al., NeurIPS 2025): dynamic temporal segmentation and density spatiotemporal pruning of a clip.

The ``fastvid`` criterion plans each video span from the projected frame features entering decoder
layer 0: it cuts the clip into segments (DySeg), keeps each frame's salient tokens (ATS) and scores
every other frame token -inf; it leaves the plan (salient tokens, density-peak centres, segments) in
its buffers. The ``fastvid_merge`` merger reads that plan and builds each centre's merged token from
the segment's non-salient tokens (DTM). The formulas follow the official LLaVA-OneVision code
(``LunarShen/FastVID``, ``fastvid_llavaonevision/.../modeling_qwen2.py``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import ForwardContext, LayerInputCriterion, Merger
from prunekit.probes import Probe

from .video import video_spans

_OUTSIDE = 3.0  # visual tokens in no frame (still images, OneVision's newline): always kept
_SALIENT = 2.0
_CENTRE = 1.0  # a density-peak centre: kept, its row replaced by its merged token (fastvid_merge)
_NEIGHBOURS = 4  # the official DPC-kNN's k (the token itself included)

# a token's role in the plan (the ``<key>/centre`` buffer)
SINGLE = 1  # a centre of a frame whose segment's context stays in the frame (merged with its own frame's tokens)
MULTI = 2  # a centre of an anchor frame of a multi-frame segment (merged with the whole segment's tokens)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def segment_sizes(global_features: Tensor, segments: int, tau: float) -> list[int]:
    """DySeg: the lengths of the segments a clip's frames are cut into, in order.

    global_features: ``[frames, dim]``. With ``s_i`` the cosine similarity of frames ``i`` and ``i + 1``,
    the clip is cut after frame ``i`` for the ``segments - 1`` smallest ``s_i`` (all of them on a
    clip of fewer frames; ties to the earlier pair) and for every ``s_i < tau``.
    """
    frames = global_features.shape[0]
    unit = global_features / global_features.norm(dim=1, keepdim=True)  # [frames, dim]
    similarity = (unit[:-1] * unit[1:]).sum(dim=1)  # [frames - 1]
    smallest = torch.sort(similarity, stable=True).indices[: max(segments - 1, 0)]
    cuts = sorted(set(smallest.tolist()) | set((similarity < tau).nonzero().flatten().tolist()))
    bounds = [-1, *cuts, frames - 1]
    return [b - a for a, b in itertools.pairwise(bounds)]


def frame_context_counts(sizes: Sequence[int], context: int, period: int) -> list[int]:
    """The official anchor-token distribution: per frame, how many context (merged) tokens it holds.

    A segment of ``L`` frames holds ``context * L`` context tokens on its anchor frames: its last frame
    and every ``period``-th frame before it (``ceil(L / period)`` frames), ``(context * L) //
    ceil(L / period)`` each; its other frames hold none.
    """
    counts = []
    for length in sizes:
        anchors = (length + period - 1) // period
        each = context * length // anchors
        counts += [each if (length - 1 - j) % period == 0 else 0 for j in range(length)]
    return counts


def density_scores(x: Tensor) -> Tensor:
    """DPC-kNN as FastVID uses it: ``[..., m]`` scores of the ``m`` tokens ``x`` ``[..., m, dim]`` (higher: a better
    centre), each group of ``m`` on its own.

    ``d_ij = |x_i - x_j| / sqrt(dim)``; the density ``rho_i = exp(-mean(d_ij^2))`` over the ``k = 4``
    nearest tokens (``i`` itself included; fewer when ``m < 4``); ``delta_i`` the distance to the nearest
    token of higher density (the largest ``d`` of the group for the densest); score ``rho_i * delta_i``.
    """
    m, dim = x.shape[-2:]
    x = x.to(torch.float64)
    distance = torch.cdist(x, x) / dim ** 0.5  # [..., m, m]
    nearest = torch.topk(distance, k=min(_NEIGHBOURS, m), dim=-1, largest=False).values  # [..., m, k]
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [..., m]
    higher = density[..., None, :] > density[..., :, None]  # [..., m, m]: j denser than i
    top = distance.flatten(-2).max(dim=-1).values[..., None, None]  # [..., 1, 1]
    delta = torch.where(higher, distance, top).min(dim=-1).values  # [..., m]
    return delta * density


def salient_weights(x: Tensor) -> Tensor:
    """``[..., n]``: the stand-in for ATS's attention weights on one frame's tokens ``x`` ``[..., n, dim]``: the softmax
    of the frame's mean token (its global feature) against each token, ``<g, x_i> / sqrt(dim)``."""
    x = x.to(torch.float64)
    logits = (x @ x.mean(dim=-2)[..., None])[..., 0] / x.shape[-1] ** 0.5  # [..., n]
    return torch.softmax(logits, dim=-1)


@dataclass
class ClipPlan:
    """One clip's FastVID plan, per frame-token ``[frames, n]`` (frames in order, tokens in sequence order)."""

    salient: Tensor  # bool: kept as they are (ATS)
    centre: Tensor  # long: 0, SINGLE or MULTI (DTM centres; their merged tokens replace them)
    density: Tensor  # float64: the frame's DPC-kNN score on non-salient tokens (0 on salient ones)
    segment: Tensor  # long: the frame's segment (0, 1, ...), the same for every token of a frame
    sizes: list[int]


def plan_clip(frames: Tensor, retention: float, segments: int, tau: float, d: float, period: int) -> ClipPlan:
    """FastVID's plan for one clip of frame tokens ``frames`` ``[F, n, dim]``.

    Each frame retains ``R = int(n * retention)``: ``S = R - int(R * d)`` salient tokens (the top ``S``
    by :func:`salient_weights`, ties to the earlier token) and ``C = R - S`` context tokens per frame on
    average, placed on anchor frames by :func:`frame_context_counts` over :func:`segment_sizes` of the
    frames' mean tokens. A frame holding exactly ``C`` takes the top ``C`` of its non-salient tokens by
    :func:`density_scores` as centres merged within the frame (``SINGLE``); an anchor frame holding more
    takes that many (at most its non-salient tokens) as centres merged over its whole segment (``MULTI``).
    """
    n_frames, n, _ = frames.shape
    retain = int(n * retention)
    context = int(retain * d)
    salient_count = retain - context
    sizes = segment_sizes(frames.to(torch.float64).mean(dim=1), segments, tau)
    counts = frame_context_counts(sizes, context, period)
    salient = torch.zeros(n_frames, n, dtype=torch.bool, device=frames.device)
    centre = torch.zeros(n_frames, n, dtype=torch.long, device=frames.device)
    density = torch.zeros(n_frames, n, dtype=torch.float64, device=frames.device)
    segment = torch.repeat_interleave(torch.arange(len(sizes), device=frames.device),
                                      torch.tensor(sizes, device=frames.device))[:, None].expand(n_frames, n)
    order = torch.sort(salient_weights(frames), dim=1, descending=True, stable=True).indices  # [F, n]
    salient.scatter_(1, order[:, :salient_count], True)
    rest = (~salient).nonzero()[:, 1].reshape(n_frames, n - salient_count)  # [F, n - S] in order
    anchors = [f for f in range(n_frames) if context > 0 and counts[f] >= context and n > salient_count]
    if anchors:
        chosen_frames = torch.tensor(anchors, device=frames.device)
        rest_a = rest[chosen_frames]  # [A, n - S]
        scores = density_scores(frames[chosen_frames[:, None], rest_a])  # [A, n - S]
        density[chosen_frames[:, None], rest_a] = scores
        best = torch.sort(scores, dim=1, descending=True, stable=True).indices  # [A, n - S]
        for a, f in enumerate(anchors):
            k = min(counts[f], n - salient_count)
            centre[f, rest_a[a, best[a, :k]]] = SINGLE if counts[f] == context else MULTI
    return ClipPlan(salient, centre, density, segment.clone(), sizes)


def merge_into_centres(centres: Tensor, members: Tensor, beta: float) -> Tensor:
    """DTM: ``[k, dim]`` merged tokens of ``centres`` ``[k, dim]`` (in the official order: best centre first) from
    ``members`` ``[m, dim]`` (the centres among them).

    Each member joins the centre of largest cosine similarity (the first on ties); a centre with ``c``
    members becomes ``w * centre + (1 - w) * mean(members)``, ``w = max(1 / (c + 1), beta)`` (the centre
    itself when ``c = 0``).
    """
    unit_c = centres / centres.norm(dim=-1, keepdim=True)
    unit_m = members / members.norm(dim=-1, keepdim=True)
    assign = (unit_m @ unit_c.T).argmax(dim=1)  # [m]
    one_hot = torch.nn.functional.one_hot(assign, centres.shape[0]).to(members.dtype)  # [m, k]
    size = one_hot.sum(dim=0)[:, None]  # [k, 1]
    mean = one_hot.T @ members / size.clamp(min=1)  # [k, dim]
    weight = (1 / (size + 1)).clamp(min=beta)
    return weight * centres + (1 - weight) * mean


@dataclass
class FastVID(LayerInputCriterion):
    """FastVID (Shen et al., NeurIPS 2025) on each video span, before decoder layer 0: segments, salient tokens
    and density-peak centres (the plan :class:`FastVIDMerge` merges).

    On the projected frame tokens: DySeg cuts the clip where consecutive frames' mean tokens have cosine
    below ``tau`` and at the ``segments - 1`` least similar pairs; each frame keeps ``S = R - int(R * d)``
    salient tokens of ``R = int(n * retention)`` (score 2); the ``C = R - S`` context tokens per frame
    go to the anchor frames of each segment (its last frame and every ``p``-th before) as density-peak
    (DPC-kNN) centres, kept (score 1) for the ``fastvid_merge`` merger to merge their segment's tokens
    into, in place; every other frame token scores -inf (dropped whatever the stage keeps: run it on a
    stage keeping 1.0).
    Tokens in no frame (still images, OneVision's newline) are kept. ``retention: 1.0, d: 0`` keeps
    every token. Defaults: the official lmms-eval entry (``retention`` the paper's 25% setting).

    Differences from the official code: a frame's global feature is the mean of its projected tokens
    (the official Qwen2.5-VL code; on OneVision the official code uses SigLIP's attention-pooling head,
    which Hugging Face checkpoints do not ship), and ATS's attention weights (that head's) are
    replaced by the softmax of the frame mean against each token (:func:`salient_weights`); DPC has
    no random tie noise (ties go to the earlier token); an anchor frame takes at most its non-salient
    tokens as centres and a short clip at most ``frames - 1`` cuts (the official code fails there).

    Example::

        criteria: {fastvid: {type: fastvid, retention: 0.25}}
        merge: {type: fastvid_merge, criterion: fastvid}
        schedule: {type: stages, stages: [{layer: 0, keep: 1.0}]}
    """

    name: ClassVar[str] = "fastvid"
    retention: float = 0.25  # fastvid_retention_ratio: the share of each frame's tokens that stays
    segments: int = 8  # DySeg_c: the clip is cut at least this many times minus one
    tau: float = 0.9  # DySeg_tau: consecutive frames less similar than this are cut apart
    d: float = 0.4  # STPrune_d: the share of the retained tokens that are merged context tokens
    p: int = 4  # DTM_p: every p-th frame of a segment (from its end) is an anchor frame

    def validate(self) -> None:
        if not _is_number(self.retention) or not 0 < self.retention <= 1:
            raise ValueError(f"retention (the share of each frame's tokens FastVID keeps) must be in (0, 1], "
                             f"got {self.retention!r}")
        if not isinstance(self.segments, int) or isinstance(self.segments, bool) or self.segments < 1:
            raise ValueError(f"segments (DySeg's least number of segments, c) must be an int >= 1, got "
                             f"{self.segments!r}")
        if not _is_number(self.tau) or not -1 <= self.tau <= 1:
            raise ValueError(f"tau (DySeg's cosine threshold) must be in [-1, 1], got {self.tau!r}")
        if not _is_number(self.d) or not 0 <= self.d < 1:
            raise ValueError(f"d (the share of retained tokens that are merged context tokens) must be in "
                             f"[0, 1), got {self.d!r}")
        if not isinstance(self.p, int) or isinstance(self.p, bool) or self.p < 1:
            raise ValueError(f"p (the anchor-frame period of DTM) must be an int >= 1, got {self.p!r}")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        if list(stage_layers) != [0]:
            raise ValueError(f"fastvid plans the projected frame tokens: its recipe needs one stage, at layer 0; "
                             f"got stages at layers {list(stage_layers)}")
        return super().probes(stage_layers, num_layers)

    def score(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        hidden = self.stage_hidden(ctx)  # [batch, seq, hidden]
        shape = layout.visual.shape
        score = torch.full(shape, _OUTSIDE, dtype=torch.float64, device=hidden.device)  # [batch, seq]
        salient = torch.zeros(shape, dtype=torch.bool, device=hidden.device)
        centre = torch.zeros(shape, dtype=torch.long, device=hidden.device)
        density = torch.zeros(shape, dtype=torch.float64, device=hidden.device)
        segment = torch.full(shape, -1, dtype=torch.long, device=hidden.device)
        for b in range(layout.batch_size):
            first_segment = 0
            for positions in video_spans(layout, b):
                frames = layout.frame_index[b, positions]  # [N]
                present = frames.unique()
                n = positions.numel() // len(present)
                if n * len(present) != positions.numel() or not bool((frames.bincount()[present] == n).all()):
                    raise ValueError(f"fastvid needs every frame of a clip to hold the same number of tokens; sample "
                                     f"{b} has frames of {frames.bincount()[present].tolist()} tokens")
                plan = plan_clip(hidden[b, positions].reshape(len(present), n, -1), self.retention, self.segments,
                                 self.tau, self.d, self.p)
                salient[b, positions] = plan.salient.flatten()
                centre[b, positions] = plan.centre.flatten()
                density[b, positions] = plan.density.flatten()
                segment[b, positions] = plan.segment.flatten() + first_segment
                first_segment += len(plan.sizes)
                kept_score = torch.where(plan.centre.flatten() > 0, _CENTRE, float("-inf"))
                score[b, positions] = torch.where(plan.salient.flatten(), _SALIENT, kept_score).to(score.dtype)
        ctx.buffers.update({f"{self.key}/salient": salient, f"{self.key}/centre": centre,
                            f"{self.key}/density": density, f"{self.key}/segment": segment})
        return score.masked_fill(~layout.visual, 0)


@dataclass
class FastVIDMerge(Merger):
    """FastVID's density-based token merging (DTM): the merged tokens of the ``fastvid`` criterion's centres.

    Reads the plan the criterion keyed ``criterion`` left in its buffers. A ``SINGLE`` centre's members
    are its frame's non-salient tokens, a ``MULTI`` centre's those of every frame of its segment; each
    group of centres (one frame's) is merged by :func:`merge_into_centres` with ``beta`` on the stage's
    input (before layer 0: the projected tokens). Each merged token replaces its centre's row (an
    ``in_place`` merger), so it sits at its centre's place and position, as in the official code.

    Example::

        merge: {type: fastvid_merge, criterion: fastvid, beta: 0.6}
    """

    name: ClassVar[str] = "fastvid_merge"
    criterion: str = "fastvid"  # the key of the fastvid criterion in the recipe
    beta: float = 0.6  # DTM_beta: a centre keeps at least this weight against its members' mean

    def validate(self) -> None:
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ValueError(f"criterion (the recipe key of the fastvid criterion) must be a name, got "
                             f"{self.criterion!r}")
        if not _is_number(self.beta) or not 0 <= self.beta <= 1:
            raise ValueError(f"beta (DTM's least weight of a centre) must be in [0, 1], got {self.beta!r}")

    in_place: ClassVar[bool] = True

    def count(self, dropped: int) -> int:
        return 0  # merged into the kept centres: no token added

    def merge_into_kept(self, hidden: Tensor, kept: Tensor, scores: Tensor, ctx: ForwardContext) -> Tensor:
        names = [f"{self.criterion}/{part}" for part in ("salient", "centre", "density", "segment")]
        missing = [name for name in names if name not in ctx.buffers]
        if missing:
            raise ValueError(f"fastvid_merge reads the plan of the fastvid criterion keyed {self.criterion!r}, "
                             f"but the recipe has none (no buffer {missing[0]!r}); set merge.criterion to the "
                             f"key of its fastvid criterion")
        salient, centre, density, segment = (ctx.buffers[name] for name in names)
        layout = ctx.layout
        work = hidden if hidden.dtype in (torch.float32, torch.float64) else hidden.float()
        out = hidden.clone()  # [batch, seq, dim]
        for b in range(hidden.shape[0]):
            framed = layout.visual[b] & (layout.frame_index[b] >= 0) & ~salient[b]  # [seq]: non-salient frame tokens
            is_centre = centre[b] > 0
            for span, frame in {(int(layout.image_index[b, j]), int(layout.frame_index[b, j]))
                                for j in is_centre.nonzero().flatten().tolist()}:
                in_frame = is_centre & (layout.image_index[b] == span) & (layout.frame_index[b] == frame)
                mine = in_frame.nonzero().flatten()
                mine = mine[torch.sort(density[b, mine], descending=True, stable=True).indices]  # the official order
                members = framed & (layout.image_index[b] == span)
                if int(centre[b, mine[0]]) == SINGLE:
                    members &= layout.frame_index[b] == frame
                else:
                    members &= segment[b] == segment[b, mine[0]]
                out[b, mine] = merge_into_centres(work[b, mine], work[b, members], self.beta).to(hidden.dtype)
        return out
