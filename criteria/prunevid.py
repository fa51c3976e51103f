"""PruneVid (Huang et al., ACL 2025 Findings): spatial-temporal token merging, then question-guided pruning in the LLM.

The ``prunevid`` criterion runs on two stages. Before decoder layer 0 it plans each video span from
the projected frame tokens: the frames are cut into segments (DPC-kNN clustering of the frames' mean
tokens, refined into contiguous runs); in a segment a grid cell whose tokens stay alike over its
frames is *static* and all its frames become one token, the others stay per frame (*dynamic*); each
segment's static tokens, and each frame's dynamic tokens, are clustered by DPC-kNN into a share of
their count. It keeps one row per cluster (score -inf for the rest) and leaves, per token, the row it
merges into; the ``prunevid_merge`` merger averages each cluster into its kept row, in place. At the
second stage (after the layer the attention is read from) each segment's static tokens and each
frame's dynamic tokens keep their top ``alpha`` share by the largest attention any head of any
question token pays them. The formulas follow the official PLLaVA code (``Visual-AI/PruneVid``,
``models/pllava/modeling_pllava.py`` ``merge_frames_dynamic`` and ``models/pllava/elastic_cache.py``
``VTPWindowCache``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import ForwardContext, LayerInputCriterion, Merger
from prunekit.probes import AttentionRows, LayerInput, Probe

from .video import video_spans

_OUTSIDE = 2.0  # visual tokens in no frame (still images, OneVision's newline): always kept
_KEPT = 1.0  # a cluster's kept row at the merging stage


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dpc_knn(x: Tensor, clusters: int, k: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN clustering of ``m`` tokens ``x`` ``[..., m, dim]`` into ``clusters`` clusters, each group of ``m`` on
    its own (PruneVid's ``cluster_dpc_knn``).

    ``d_ij = |x_i - x_j| / sqrt(dim)``; the density ``rho_i = exp(-mean(d_ij^2))`` over the ``k`` nearest
    tokens (``i`` itself included; all ``m`` when ``m < k``); ``delta_i`` the distance to the nearest
    denser token (the group's largest ``d`` for the densest); the centres are the ``clusters`` tokens of
    largest ``rho_i * delta_i`` (ties to the earlier token) and every other token joins its nearest
    centre (the earlier centre on ties). Returns the centres ``[..., clusters]`` (best first: the official
    cluster order) and each token's cluster ``[..., m]`` (a centre's is its own).
    """
    m, dim = x.shape[-2:]
    x = x.to(torch.float64)
    distance = torch.cdist(x, x) / dim ** 0.5  # [..., m, m]
    nearest = torch.topk(distance, k=min(k, m), dim=-1, largest=False).values  # [..., m, k]
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [..., m]
    denser = density[..., None, :] > density[..., :, None]  # [..., m, m]: j denser than i
    top = distance.flatten(-2).max(dim=-1).values[..., None, None]  # [..., 1, 1]
    delta = torch.where(denser, distance, top).min(dim=-1).values  # [..., m]
    centres = torch.sort(delta * density, dim=-1, descending=True, stable=True).indices[..., :clusters]  # [..., c]
    to_centres = distance.gather(-2, centres[..., :, None].expand(*centres.shape, m))  # [..., c, m]
    assign = to_centres.argmin(dim=-2)  # [..., m]: the first nearest centre
    order = torch.arange(centres.shape[-1], device=x.device).expand_as(centres)
    return centres, assign.scatter(-1, centres, order)


def refine_segments(labels: Sequence[int]) -> list[int]:
    """PruneVid's ``refine_clusters``: frame cluster labels made into contiguous runs.

    A label keeps its longest runs (every run of the longest length); its shorter runs, and every run
    of a label whose runs are all one frame long, are relabelled. Going left to right, each relabelled
    run takes the label of the longer of the runs beside it as they stand by then (the left one on a
    tie; label 0 when it has none).
    """
    n = len(labels)
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for i in range(1, n + 1):
        if i == n or labels[i] != labels[start]:
            runs.setdefault(labels[start], []).append((start, i))
            start = i
    out = list(labels)
    for spans in runs.values():
        longest = max(end - begin for begin, end in spans)
        for begin, end in spans:
            if longest == 1 or end - begin < longest:
                out[begin:end] = [-1] * (end - begin)

    def run_length(at: int, step: int) -> int:
        length, j = 0, at
        while 0 <= j < n and out[j] == out[at]:
            length, j = length + 1, j + step
        return length

    i = 0
    while i < n:
        if out[i] != -1:
            i += 1
            continue
        begin = i
        while i < n and out[i] == -1:
            i += 1
        left = (out[begin - 1], run_length(begin - 1, -1)) if begin > 0 else None
        right = (out[i], run_length(i, 1)) if i < n else None
        if left is not None and (right is None or left[1] >= right[1]):
            label = left[0]
        else:
            label = right[0] if right is not None else 0
        out[begin:i] = [label] * (i - begin)
    return out


def segment_sizes(global_features: Tensor, ratio: float, k: int) -> list[int]:
    """PruneVid's temporal segments: the lengths of the runs a clip's frames are cut into, in order.

    global_features: ``[frames, dim]`` (each frame's mean token). The frames are clustered by
    :func:`dpc_knn` into ``max(int(frames * ratio), 1)`` clusters, the labels made contiguous by
    :func:`refine_segments`, and each run of one label is a segment.
    """
    frames = global_features.shape[0]
    _, assign = dpc_knn(global_features, max(int(frames * ratio), 1), k)
    labels = refine_segments(assign.tolist())
    sizes, start = [], 0
    for i in range(1, frames + 1):
        if i == frames or labels[i] != labels[start]:
            sizes.append(i - start)
            start = i
    return sizes


def static_cells(window: Tensor, tau: float) -> Tensor:
    """``[n]`` bool: the grid cells of a segment's frames ``window`` ``[W, n, dim]`` whose tokens are static.

    A cell is static when the mean cosine similarity of its tokens over every ordered pair of distinct
    frames exceeds ``tau``; a one-frame segment has none.
    """
    frames = window.shape[0]
    if frames < 2:
        return torch.zeros(window.shape[1], dtype=torch.bool, device=window.device)
    unit = torch.nn.functional.normalize(window.to(torch.float64), dim=-1)  # [W, n, dim]
    similarity = torch.einsum("wlc,tlc->l", unit, unit)  # [n]: summed over all W x W pairs
    return (similarity - frames) / (frames * (frames - 1)) > tau


@dataclass
class ClipPlan:
    """One clip's PruneVid merge, per frame-token ``[frames, n]`` (frames in order, tokens in sequence order)."""

    target: Tensor  # long: the flat index ``f * n + j`` of the row the token merges into (its own when kept)
    group: Tensor  # long: the token's group at the attention stage (0, 1, ...: a segment's static part, a frame's dynamic part)
    static: Tensor  # bool: the token's cell is static in its segment
    sizes: list[int]  # the segments' lengths


def _cluster_targets(features: Tensor, rows: Tensor, cluster_ratio: float, k: int, min_cluster: int) -> Tensor:
    """The kept row each of ``rows`` ``[..., m]`` merges into: a cluster's centre row (:func:`dpc_knn` on ``features``
    ``[..., m, dim]``, ``max(int(m * cluster_ratio), 1)`` clusters per group) when ``m > min_cluster``, else its own."""
    m = rows.shape[-1]
    if m <= min_cluster:
        return rows
    centres, assign = dpc_knn(features, max(int(m * cluster_ratio), 1), k)
    return rows.gather(-1, centres.gather(-1, assign))


def plan_clip(frames: Tensor, tau: float, temporal_segment_ratio: float, cluster_ratio: float, k: int,
              min_cluster: int) -> ClipPlan:
    """PruneVid's spatial-temporal merge of one clip of frame tokens ``frames`` ``[F, n, dim]``.

    Segments by :func:`segment_sizes` of the frames' mean tokens; in each segment of ``W`` frames the
    static cells (:func:`static_cells`) merge over the segment's frames into its first frame, and
    their time-averaged tokens are clustered (:func:`dpc_knn`, ``int(S * cluster_ratio)`` clusters when
    there are more than ``min_cluster`` of them); each frame's dynamic tokens are clustered the same
    way. Each cluster merges into the row of its centre (a static centre's row in the segment's first
    frame).
    """
    n_frames, n, _ = frames.shape
    device = frames.device
    frames = frames.to(torch.float64)
    flat = torch.arange(n_frames * n, device=device).reshape(n_frames, n)  # [F, n]
    target, group = flat.clone(), torch.zeros(n_frames, n, dtype=torch.long, device=device)
    static = torch.zeros(n_frames, n, dtype=torch.bool, device=device)
    sizes = segment_sizes(frames.mean(dim=1), temporal_segment_ratio, k)
    start, groups = 0, 0
    for size in sizes:
        window, rows = frames[start:start + size], flat[start:start + size]  # [W, n, dim], [W, n]
        cells = static_cells(window, tau)  # [n]
        static[start:start + size] = cells
        if bool(cells.any()):  # one group: the cells' tokens averaged over the frames, merged on the first frame
            averaged = window[:, cells].mean(dim=0)  # [S, dim]
            target[start:start + size, cells] = _cluster_targets(averaged, rows[0, cells], cluster_ratio, k,
                                                                 min_cluster)
            group[start:start + size, cells] = groups
            groups += 1
        # each frame's dynamic tokens: one group per frame, clustered together (every frame has the same cells)
        target[start:start + size, ~cells] = _cluster_targets(window[:, ~cells], rows[:, ~cells], cluster_ratio, k,
                                                              min_cluster)
        group[start:start + size, ~cells] = torch.arange(groups, groups + size, device=device)[:, None]
        groups += size
        start += size
    return ClipPlan(target, group, static, sizes)


def attention_keep(attention: Tensor, group: Tensor, alpha: float) -> Tensor:
    """``[m]`` bool: PruneVid's second stage on ``m`` tokens: in each ``group`` ``[m]`` of ``c`` tokens the
    ``int(c * alpha)`` of largest ``attention`` ``[m]`` stay (ties to the earlier token)."""
    keep = torch.zeros_like(group, dtype=torch.bool)
    for g in group.unique().tolist():
        members = (group == g).nonzero().flatten()
        order = torch.sort(attention[members], descending=True, stable=True).indices
        keep[members[order[:int(members.numel() * alpha)]]] = True
    return keep


@dataclass
class PruneVid(LayerInputCriterion):
    """PruneVid (Huang et al., ACL 2025 Findings) on each video span: merge before layer 0, then keep what the
    question attends to.

    Stage 1 (at layer 0, on the projected frame tokens): the frames are cut into segments (DPC-kNN of
    the frames' mean tokens into ``int(F * temporal_segment_ratio)`` clusters, made contiguous); a grid
    cell whose tokens have mean pairwise cosine above ``tau`` over a segment's frames is static and its
    frames merge into one token; a segment's static tokens and each frame's dynamic tokens are
    clustered by DPC-kNN (``k`` neighbours) into ``cluster_ratio`` of their count when there are more
    than ``min_cluster``. One row per cluster stays (score 1; a static cluster's in the segment's first
    frame), every other frame token scores -inf, and the ``prunevid_merge`` merger averages each
    cluster into its row. Stage 2 (optional, at a later layer ``L``): with the attention of layer
    ``L - 1`` (the instruction's queries, max over heads and queries), each segment's static tokens and
    each frame's dynamic tokens keep their top ``int(c * alpha)`` of ``c``; the rest score -inf. Run both
    stages keeping 1.0. Tokens in no frame (still images, OneVision's newline) are kept.
    ``tau: 1.0, cluster_ratio: 1.0, alpha: 1.0`` keeps every token. Defaults: the official scripts'.

    Differences from the official code: merged tokens sit at their centres' rows in sequence order
    (the official code lays a segment out as its static clusters, then each frame's dynamic ones,
    each in DPC order); DPC has no random tie noise (ties go to the earlier token); a clip of fewer
    than ``k`` frames uses all its frames as neighbours and at least one cluster is made (the
    official code fails there); a one-frame segment has no static cells (the official 0 / 0). After
    the second stage positions follow the recipe's ``positions`` (the official code keeps them) and the
    layers before it keep the stage-1 tokens in their KV cache (the official code cuts those too).

    Example::

        criteria: {prunevid: {type: prunevid, tau: 0.8, alpha: 0.4}}
        merge: {type: prunevid_merge, criterion: prunevid}
        schedule: {type: stages, stages: [{layer: 0, keep: 1.0}, {layer: 11, keep: 1.0}]}
    """

    name: ClassVar[str] = "prunevid"
    tau: float = 0.8  # taus: a cell whose mean pairwise cosine over a segment's frames exceeds this is static
    temporal_segment_ratio: float = 0.25  # temporal_segment_ratios: frame clusters per frame of the clip
    cluster_ratio: float = 0.5  # cluster_ratios: the share of a group's tokens that its clusters number
    alpha: float = 0.4  # alphas: the share of each group's tokens the attention stage keeps
    k: int = 7  # the DPC-kNN neighbours (the official k=7, temporal and spatial)
    min_cluster: int = 14  # groups of more tokens than this are clustered (the official 14)

    def validate(self) -> None:
        if not _is_number(self.tau) or not -1 <= self.tau <= 1:
            raise ValueError(f"tau (the cosine above which a cell is static) must be in [-1, 1], got {self.tau!r}")
        for field, what in (("temporal_segment_ratio", "frame clusters per frame"),
                            ("cluster_ratio", "the share of a group's tokens its clusters number"),
                            ("alpha", "the share of each group's tokens the attention stage keeps")):
            value = getattr(self, field)
            if not _is_number(value) or not 0 < value <= 1:
                raise ValueError(f"{field} ({what}) must be in (0, 1], got {value!r}")
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"k (the DPC-kNN neighbours) must be an int >= 1, got {self.k!r}")
        if not _is_int(self.min_cluster) or self.min_cluster < 0:
            raise ValueError(f"min_cluster (groups of more tokens are clustered) must be an int >= 0, got "
                             f"{self.min_cluster!r}")

    def _attention(self, stage_layers: Sequence[int]) -> AttentionRows:
        return AttentionRows(layer=stage_layers[1] - 1, queries="instruction", per_head=True, per_query=True)

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        layers = list(stage_layers)
        if layers[0] != 0 or len(layers) > 2 or (len(layers) == 2 and layers[1] < 2):
            raise ValueError(f"prunevid merges the projected frame tokens at layer 0 and may prune again at a "
                             f"layer L >= 2 (with layer L - 1's attention): its recipe needs a stage at layer 0 "
                             f"and at most one more; got stages at layers {layers}")
        return [LayerInput(layer=0), *([self._attention(layers)] if len(layers) == 2 else [])]

    def score(self, ctx: ForwardContext) -> Tensor:
        return self._merge_plan(ctx) if ctx.stage == 0 else self._attention_stage(ctx)

    def _merge_plan(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        hidden = self.stage_hidden(ctx)  # [batch, seq, hidden]
        shape = layout.visual.shape
        score = torch.full(shape, _OUTSIDE, dtype=torch.float64, device=hidden.device)  # [batch, seq]
        target = torch.full(shape, -1, dtype=torch.long, device=hidden.device)
        group = torch.zeros(shape, dtype=torch.long, device=hidden.device)  # 0: in no frame
        static = torch.zeros(shape, dtype=torch.bool, device=hidden.device)
        for b in range(layout.batch_size):
            first_group = 1
            for positions in video_spans(layout, b):
                frames = layout.frame_index[b, positions]  # [N]
                present = frames.unique()
                n = positions.numel() // len(present)
                if n * len(present) != positions.numel() or not bool((frames.bincount()[present] == n).all()):
                    raise ValueError(f"prunevid needs every frame of a clip to hold the same number of tokens; sample "
                                     f"{b} has frames of {frames.bincount()[present].tolist()} tokens")
                plan = plan_clip(hidden[b, positions].reshape(len(present), n, -1), self.tau,
                                 self.temporal_segment_ratio, self.cluster_ratio, self.k, self.min_cluster)
                into = plan.target.flatten()  # [N]
                target[b, positions] = positions[into]
                group[b, positions] = plan.group.flatten() + first_group
                static[b, positions] = plan.static.flatten()
                first_group += int(plan.group.max()) + 1
                kept = into == torch.arange(into.numel(), device=into.device)
                score[b, positions] = torch.where(kept, _KEPT, float("-inf")).to(score.dtype)
        ctx.buffers.update({f"{self.key}/target": target, f"{self.key}/group": group, f"{self.key}/static": static})
        return score.masked_fill(~layout.visual, 0)

    def _attention_stage(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        rows = ctx.capture(self._attention(ctx.stage_layers))  # [batch, seq, n_q, heads]
        attention = rows.to(torch.float64).amax(dim=(2, 3))  # [batch, seq]: max over queries and heads
        group = ctx.buffers[f"{self.key}/group"]  # [batch, seq]: 0 in no frame (and on fill slots)
        framed = layout.visual & layout.valid & (group > 0)
        score = torch.where(framed, attention, torch.full_like(attention, _OUTSIDE))
        for b in range(layout.batch_size):
            mine = framed[b].nonzero().flatten()
            if mine.numel():
                keep = attention_keep(attention[b, mine], group[b, mine], self.alpha)
                score[b, mine[~keep]] = float("-inf")
        return score.masked_fill(~layout.visual, 0)


@dataclass
class PruneVidMerge(Merger):
    """PruneVid's token merging: each cluster of the ``prunevid`` criterion's plan averaged into its kept row.

    Reads the plan the criterion keyed ``criterion`` left in its buffers at the layer-0 stage (each
    token's target row); each kept row with members becomes their mean (a static cluster: its cells'
    tokens over the segment's frames, the official mean of time-averaged tokens), on the stage's input
    (the projected tokens). An ``in_place`` merger: each merged token keeps its row's place and position;
    a later stage merges nothing.

    Example::

        merge: {type: prunevid_merge, criterion: prunevid}
    """

    name: ClassVar[str] = "prunevid_merge"
    criterion: str = "prunevid"  # the key of the prunevid criterion in the recipe

    in_place: ClassVar[bool] = True

    def validate(self) -> None:
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ValueError(f"criterion (the recipe key of the prunevid criterion) must be a name, got "
                             f"{self.criterion!r}")

    def count(self, dropped: int) -> int:
        return 0  # merged into the kept rows: no token added

    def merge_into_kept(self, hidden: Tensor, kept: Tensor, scores: Tensor, ctx: ForwardContext) -> Tensor:
        if ctx.stage != 0:
            return hidden  # the attention stage merges nothing
        name = f"{self.criterion}/target"
        if name not in ctx.buffers:
            raise ValueError(f"prunevid_merge reads the plan of the prunevid criterion keyed {self.criterion!r}, "
                             f"but the recipe has none (no buffer {name!r}); set merge.criterion to the key of its "
                             f"prunevid criterion")
        target = ctx.buffers.pop(name)  # [batch, seq]: the row each frame token merges into, -1 elsewhere
        out = hidden.clone()  # [batch, seq, dim]
        for b in range(hidden.shape[0]):
            members = (target[b] >= 0).nonzero().flatten()  # [m]
            rows, inverse, size = torch.unique(target[b, members], return_inverse=True, return_counts=True)
            many = size > 1  # kept rows with members beside themselves
            if not bool(many.any()):
                continue
            values = hidden[b, members]  # [m, dim]
            values = values if values.dtype in (torch.float32, torch.float64) else values.float()
            sums = torch.zeros(len(rows), values.shape[-1], dtype=values.dtype, device=values.device)
            sums = sums.index_add(0, inverse, values)  # [rows, dim]
            out[b, rows[many]] = (sums[many] / size[many, None].to(values.dtype)).to(hidden.dtype)
        return out
