"""HoliTom (Shao et al., NeurIPS 2025): holistic token merging of a clip, before and inside the language model.

The ``holitom`` criterion plans each video span from the projected frame features entering decoder
layer 0 (outer-LLM merging): a dynamic programme cuts the clip into the windows that remove the most
temporally redundant tokens; in a window of several frames the tokens similar at one grid place across
all its frames (*static*) become one token, their mean, and the static tokens are clustered (DPC-kNN) into
a share of them; the other (*dynamic*) tokens of each frame keep their most attended share. At an
optional second stage (inner-LLM merging, layer ``K``) it keeps the visual tokens the last prompt
token attends to most at layer ``K - 1``. Each stage scores what the method removes -inf and leaves
its plan in buffers; the ``holitom_merge`` merger merges into the kept tokens in place. The formulas
follow the official LLaVA-OneVision code (``cokeshao/HoliTom``, ``holitom/llava_arch.py`` and
``holitom/modeling_qwen2.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import ForwardContext, LayerInputCriterion, Merger
from prunekit.layout import TokenLayout
from prunekit.probes import AttentionRows, LayerInput, Probe

from .video import video_spans

_OUTSIDE = 3.0  # visual tokens in no frame (still images, OneVision's newline): always kept by the outer stage

# a kept token's role in the outer plan (the ``<key>/role`` buffer); 0: dropped
STATIC = 1  # a static centre: the first frame of its window holds the merged static token
DOMINANT = 2  # a dynamic token kept as it is (top attention in its frame)
CONTEXT = 3  # a dynamic density-peak centre (only with d > 0): merged with its frame's other dynamic tokens

_SCORE = {STATIC: 2.0, DOMINANT: 2.0, CONTEXT: 1.0}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def frame_similarity(frames: Tensor) -> Tensor:
    """``[F - 1, n]``: the cosine similarity of each token with the token at the same place of the next frame.

    frames: ``[F, n, dim]``. Clamped to 1 (rounding), so ``tau: 1`` never finds a static token.
    """
    x = frames.to(torch.float64)
    unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (unit[:-1] * unit[1:]).sum(dim=-1).clamp(max=1.0)


def static_windows(similarity: Tensor, tau: float, max_window: int) -> tuple[list[tuple[int, int]], int]:
    """The official global redundancy-aware segmentation: the windows ``(start, end)`` (inclusive, in order)
    covering the clip, and the tokens they remove.

    similarity: ``[F - 1, n]`` (:func:`frame_similarity`). A window ``[s, e]`` of ``L = e - s + 1 >= 2``
    frames removes ``(L - 1) * S(s, e)`` tokens, ``S`` the places whose similarity is above ``tau``
    for every consecutive pair of the window (they are kept once). A dynamic programme over the frames
    maximises the total: ``dp[i] = max(dp[i - 1], max over L in 2..min(i + 1, max_window) of dp[i - L] +
    removed(i - L + 1, i))`` (``dp[-1] = 0``), a strictly larger value replacing the best so far (so on
    ties the frame stays alone, then the shorter window wins).
    """
    frames = similarity.shape[0] + 1
    above = (similarity > tau).to(torch.long)  # [F - 1, n]
    runs = [torch.cumprod(above[s:], dim=0).sum(dim=1) for s in range(frames - 1)]  # [F - 1 - s]: [s, s + 1 ...]
    flat = torch.cat(runs).tolist() if runs else []  # one read from the device
    static = [[0] * frames for _ in range(frames)]  # static[s][e]: places static over [s, e]
    for s in range(frames - 1):
        offset = s * (frames - 1) - s * (s - 1) // 2  # runs before s hold (F - 1) + ... + (F - s) entries
        static[s][s + 1:] = flat[offset:offset + frames - 1 - s]
    best = [0] * frames
    start = [0] * frames
    for i in range(frames):
        value, begin = (best[i - 1] if i > 0 else 0), i
        for length in range(2, min(i + 1, max_window) + 1):
            j = i - length
            candidate = (best[j] if j >= 0 else 0) + static[j + 1][i] * (length - 1)
            if candidate > value:
                value, begin = candidate, j + 1
        best[i], start[i] = value, begin
    windows, i = [], frames - 1
    while i >= 0:
        windows.append((start[i], i))
        i = start[i] - 1
    return windows[::-1], best[-1]


def dpc_scores(x: Tensor, neighbours: int) -> tuple[Tensor, Tensor]:
    """DPC-kNN as HoliTom uses it on ``m`` tokens ``x`` ``[m, dim]``: their scores ``[m]`` (higher: a better centre)
    and the distances ``[m, m]``.

    ``d_ij = |x_i - x_j| / sqrt(dim)``; density ``rho_i = exp(-mean(d_ij^2))`` over the ``neighbours``
    nearest tokens (``i`` itself included); ``delta_i`` the distance to the nearest denser token (the
    largest ``d`` for the densest); score ``rho_i * delta_i``.
    """
    m, dim = x.shape
    x = x.to(torch.float64)
    distance = torch.cdist(x, x) / dim ** 0.5  # [m, m]
    nearest = torch.topk(distance, k=min(neighbours, m), dim=-1, largest=False).values  # [m, k]
    density = torch.exp(-(nearest ** 2).mean(dim=-1))  # [m]
    higher = density[None, :] > density[:, None]  # [m, m]: j denser than i
    delta = torch.where(higher, distance, distance.max()).min(dim=-1).values  # [m]
    return delta * density, distance


def cluster(x: Tensor, centres: int, neighbours: int) -> tuple[Tensor, Tensor]:
    """The official ``cluster_dpc_knn`` + assignment on tokens ``x`` ``[m, dim]``: the ``centres`` tokens of best
    DPC score (``k = min(neighbours, centres)``; ties to the earlier token), in index order ``[centres]``,
    and for every token the index of the centre it joins ``[m]`` (the nearest centre, the earlier on
    ties; a centre joins itself)."""
    score, distance = dpc_scores(x, min(neighbours, centres))
    chosen = torch.sort(score, descending=True, stable=True).indices[:centres].sort().values  # [centres]
    join = chosen[distance[:, chosen].argmin(dim=1)]  # [m]
    join[chosen] = chosen
    return chosen, join


def received_attention(x: Tensor) -> Tensor:
    """``[..., n]``: the stand-in for the vision tower's attention on one frame's tokens ``x`` ``[..., n, dim]``:
    the attention each token receives, mean over the frame's tokens as queries, of a parameter-free
    self-attention ``softmax(<x_i, x_j> / sqrt(dim))`` (the official code: the last used SigLIP layer's
    attention, mean over heads and queries)."""
    x = x.to(torch.float64)
    weights = torch.softmax(x @ x.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)  # [..., n, n]
    return weights.mean(dim=-2)


@dataclass
class ClipPlan:
    """One clip's outer HoliTom plan, per frame token ``[F, n]`` (flat index ``f * n + j``)."""

    role: Tensor  # long: 0 dropped, STATIC, DOMINANT or CONTEXT (kept)
    cell: Tensor  # long: the flat index of the row whose merged value the token's value goes into (-1: none)
    target: Tensor  # long: on a unit's row, the flat index of the centre it merges into (itself for a centre)
    windows: list[tuple[int, int]]
    retention: float  # the retention of the tokens left after the temporal merge


def plan_clip(frames: Tensor, retention: float, tau: float, d: float, neighbours: int, max_window: int) -> ClipPlan:
    """HoliTom's outer plan for one clip of frame tokens ``frames`` ``[F, n, dim]``.

    :func:`static_windows` cuts the clip; the retention of what is left is ``r' = min(retention * F n /
    (F n - removed), 1)``. In a window of ``L >= 2`` frames, the places static over the whole window
    become one unit each (the mean over the window's frames, on the window's first frame); of ``s``
    such units ``round(s r')`` are DPC centres (:func:`cluster`) and the others merge into them (none
    stays when that rounds to 0). Each frame's ``m`` other (dynamic) tokens keep ``c = ceil(m r')``:
    the ``round(c (1 - d))`` of most :func:`received_attention` (dominant) and ``c - round(c (1 - d))``
    DPC centres among the rest, which merge into them.
    """
    n_frames, n, _ = frames.shape
    device = frames.device
    similarity = frame_similarity(frames)  # [F - 1, n]
    windows, removed = static_windows(similarity, tau, max_window) if n_frames > 1 else ([(0, 0)], 0)
    total = n_frames * n
    kept_retention = min(retention / ((total - removed) / total), 1)
    role = torch.zeros(n_frames, n, dtype=torch.long, device=device)
    cell = torch.arange(total, device=device).reshape(n_frames, n)
    target = torch.full((n_frames, n), -1, dtype=torch.long, device=device)
    attention = received_attention(frames)  # [F, n]
    for start, end in windows:
        static = (similarity[start:end] > tau).all(dim=0) if end > start else torch.zeros(n, dtype=torch.bool,
                                                                                            device=device)
        places = static.nonzero().flatten()  # [s]
        if places.numel():
            cell[start:end + 1, places] = start * n + places
            centres = round(places.numel() * kept_retention)
            if centres > 0:
                means = frames[start:end + 1, places].to(torch.float64).mean(dim=0)  # [s, dim]
                chosen, join = cluster(means, centres, neighbours)
                role[start, places[chosen]] = STATIC
                target[start, places] = start * n + places[join]
        dynamic = (~static).nonzero().flatten()  # [m]
        count = math.ceil(dynamic.numel() * kept_retention)
        dominant = round(count * (1 - d))
        context = count - dominant
        for f in range(start, end + 1):
            order = torch.sort(attention[f, dynamic], descending=True, stable=True).indices
            role[f, dynamic[order[:dominant]]] = DOMINANT
            if context > 0:
                rest = dynamic[order[dominant:].sort().values]  # the other dynamic tokens, in order
                chosen, join = cluster(frames[f, rest], context, neighbours)
                role[f, rest[chosen]] = CONTEXT
                target[f, rest] = f * n + rest[join]
    return ClipPlan(role, cell, target, windows, kept_retention)


def video_span_tokens(layout: TokenLayout, b: int) -> list[Tensor]:
    """The positions (``[n]`` long, in order) of every visual token of each video span of sample ``b``: the spans
    holding frame tokens, with their tokens in no frame (OneVision's newline)."""
    framed = layout.visual[b] & (layout.frame_index[b] >= 0)  # [seq]
    spans = layout.image_index[b][framed].unique().tolist()
    return [(layout.visual[b] & (layout.image_index[b] == s)).nonzero().flatten() for s in spans]


def inner_keep(attention: Tensor, r: float) -> Tensor:
    """The official inner-LLM selection: of ``n`` visual tokens with attention ``[n]`` (the last prompt token's at
    layer ``K - 1``, mean over heads), the ``round(n (1 - r))`` most attended (ties to the earlier);
    ``[n]`` bool."""
    n = attention.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=attention.device)
    keep[torch.sort(attention, descending=True, stable=True).indices[:round(n * (1 - r))]] = True
    return keep


def merge_sequentially(kept: Tensor, dropped: Tensor) -> Tensor:
    """The official inner-LLM merge: ``[k, dim]`` kept tokens after the dropped ones ``[m, dim]`` (in sequence
    order) are folded in: each dropped token joins the kept token of largest cosine similarity (on the
    unmerged states; the earlier on ties) and, in order, ``kept <- (kept + dropped) / 2``; so a kept
    token with members ``x_1 .. x_c`` becomes ``x / 2^c + sum_i x_i / 2^(c - i + 1)``."""
    if dropped.shape[0] == 0 or kept.shape[0] == 0:
        return kept
    unit_k = kept / kept.norm(dim=-1, keepdim=True)
    unit_d = dropped / dropped.norm(dim=-1, keepdim=True)
    join = (unit_d @ unit_k.T).argmax(dim=1)  # [m]
    one_hot = torch.nn.functional.one_hot(join, kept.shape[0]).to(kept.dtype)  # [m, k]
    later = one_hot.flip(0).cumsum(0).flip(0) - one_hot  # [m, k]: members of the same token after each one
    weight = (0.5 ** ((later * one_hot).sum(dim=1) + 1))[:, None]  # [m, 1]
    size = one_hot.sum(dim=0)[:, None]  # [k, 1]
    return kept * 0.5 ** size + one_hot.T @ (weight * dropped)


@dataclass
class HoliTom(LayerInputCriterion):
    """HoliTom (Shao et al., NeurIPS 2025): temporal and spatial merging of each video span before decoder
    layer 0, and optionally the inner-LLM merge at a second stage (the plan :class:`HoliTomMerge` merges).

    Before layer 0, on the projected frame tokens: :func:`static_windows` cuts the clip into windows
    (a dynamic programme maximising the tokens removed, ``tau`` the cosine threshold of a static
    place); a window's static places become their mean on its first frame, clustered (DPC-kNN,
    ``neighbours``) into ``round(s r')`` centres; each frame's dynamic tokens keep ``ceil(m r')``, of
    which ``d`` go to DPC centres and the rest are the most attended (:func:`plan_clip`; ``r'`` is
    ``retention`` over what the temporal merge leaves). Kept tokens score 2 (context centres 1), every
    other frame token -inf. At a second stage before layer ``K``: of each video span's ``n`` visual
    tokens (its frames' and those in no frame, as OneVision's newline) the ``round(n (1 - r))`` the
    last prompt token attends to most at layer ``K - 1`` (mean over heads) score their attention, the
    others -inf. Run every stage keeping 1.0 (the counts are HoliTom's own). Still images are kept
    whole, and tokens in no frame by the first stage. ``retention: 1, tau: 1`` keeps every token
    before layer 0, ``r: 0`` at the second stage.

    Differences from the official code: the dominant tokens' attention (the vision tower's, mean over
    heads and queries) is replaced by :func:`received_attention` on the projected tokens; DPC adds no
    random tie noise (ties go to the earlier token); the kept tokens stay in sequence order (the
    official code puts a window's static tokens before its frames' dynamic tokens, and a frame's
    context centres after its dominant tokens); the inner stage takes each video span of each sample
    (the official code: the first visual span of the batch's first sample), and its positions follow
    the recipe's ``positions`` (the official code: compact before layer 0, original at layer ``K``).

    Example::

        criteria: {holitom: {type: holitom, retention: 0.10, tau: 0.65, r: 0.5}}
        merge: {type: holitom_merge, criterion: holitom}
        schedule: {type: stages, stages: [{layer: 0, keep: 1.0}, {layer: 18, keep: 1.0}]}
    """

    name: ClassVar[str] = "holitom"
    retention: float = 0.10  # RETAIN_RATIO: the share of the clip's tokens the outer merge keeps
    tau: float = 0.8  # T: a place is static when consecutive frames' tokens there are more similar than this
    d: float = 0.0  # D: the share of each frame's kept dynamic tokens that are DPC centres (0: all by attention)
    neighbours: int = 7  # K: DPC-kNN's k (at most the number of centres)
    max_window: int = 1024  # MAX_WINDOW_SIZE: the longest temporal window, in frames
    r: float = 0.5  # HOLITOM_r: the share of the visual tokens the inner stage merges away

    def validate(self) -> None:
        if not _is_number(self.retention) or not 0 < self.retention <= 1:
            raise ValueError(f"retention (the share of a clip's tokens HoliTom keeps) must be in (0, 1], got "
                             f"{self.retention!r}")
        if not _is_number(self.tau) or not -1 <= self.tau <= 1:
            raise ValueError(f"tau (the cosine threshold of a static token) must be in [-1, 1], got {self.tau!r}")
        if not _is_number(self.d) or not 0 <= self.d <= 1:
            raise ValueError(f"d (the share of kept dynamic tokens that are cluster centres) must be in [0, 1], "
                             f"got {self.d!r}")
        for field_name, meaning in (("neighbours", "DPC-kNN's k"), ("max_window", "the longest window, in frames")):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field_name} ({meaning}) must be an int >= 1, got {value!r}")
        if not _is_number(self.r) or not 0 <= self.r < 1:
            raise ValueError(f"r (the share of visual tokens the inner stage merges away) must be in [0, 1), got "
                             f"{self.r!r}")

    def _attention(self, layer: int) -> AttentionRows:
        return AttentionRows(layer=layer - 1, queries="last")

    def probes(self, stage_layers: Sequence[int], num_layers: int) -> Iterable[Probe]:
        layers = list(stage_layers)
        if not layers or layers[0] != 0 or len(layers) > 2 or (len(layers) == 2 and layers[1] < 2):
            raise ValueError(f"holitom merges the projected frame tokens at a stage at layer 0, then optionally "
                             f"merges inside the model at a second stage at a layer >= 2 (its attention is read "
                             f"at the layer before); got stages at layers {layers}")
        probes: list[Probe] = [LayerInput(layer=0)]
        if len(layers) == 2:
            probes.append(self._attention(layers[1]))
        return probes

    def score(self, ctx: ForwardContext) -> Tensor:
        if ctx.stage == 0:
            return self._outer(ctx)
        layout = ctx.layout
        attention = ctx.capture(self._attention(ctx.layer)).to(torch.float64)  # [batch, seq]
        score = torch.zeros(layout.visual.shape, dtype=torch.float64, device=attention.device)
        score = score.masked_fill(layout.visual, _OUTSIDE)  # still images: kept
        for b in range(layout.batch_size):
            for span in video_span_tokens(layout, b):  # [n]
                keep = inner_keep(attention[b, span], self.r)
                score[b, span] = torch.where(keep, attention[b, span], float("-inf"))
        return score.masked_fill(~layout.visual, 0)

    def _outer(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        hidden = self.stage_hidden(ctx)  # [batch, seq, hidden]
        shape = layout.visual.shape
        score = torch.full(shape, _OUTSIDE, dtype=torch.float64, device=hidden.device)  # [batch, seq]
        role = torch.zeros(shape, dtype=torch.long, device=hidden.device)
        cell = torch.full(shape, -1, dtype=torch.long, device=hidden.device)
        target = torch.full(shape, -1, dtype=torch.long, device=hidden.device)
        for b in range(layout.batch_size):
            for positions in video_spans(layout, b):
                frames = layout.frame_index[b, positions]  # [N]
                present = frames.unique()
                n = positions.numel() // len(present)
                if n * len(present) != positions.numel() or not bool((frames.bincount()[present] == n).all()):
                    raise ValueError(f"holitom needs every frame of a clip to hold the same number of tokens; sample "
                                     f"{b} has frames of {frames.bincount()[present].tolist()} tokens")
                plan = plan_clip(hidden[b, positions].reshape(len(present), n, -1), self.retention, self.tau,
                                 self.d, self.neighbours, self.max_window)
                flat_role = plan.role.flatten()
                role[b, positions] = flat_role
                cell[b, positions] = positions[plan.cell.flatten()]
                flat_target = plan.target.flatten()
                target[b, positions] = torch.where(flat_target >= 0, positions[flat_target.clamp(min=0)], -1)
                kept_score = torch.tensor([float("-inf"), _SCORE[STATIC], _SCORE[DOMINANT], _SCORE[CONTEXT]],
                                          dtype=torch.float64, device=hidden.device)[flat_role]
                score[b, positions] = kept_score
        ctx.buffers.update({f"{self.key}/role": role, f"{self.key}/cell": cell, f"{self.key}/target": target})
        return score.masked_fill(~layout.visual, 0)


@dataclass
class HoliTomMerge(Merger):
    """HoliTom's merges into the kept tokens, in place, at each stage of the ``holitom`` criterion.

    Before layer 0 (the plan the criterion keyed ``criterion`` left in its buffers): a static unit's
    value is the mean of its place over its window's frames, a dynamic token's its own; a centre with
    members becomes ``beta * centre + (1 - beta) * mean(members)`` (the official ``Beta`` weighting),
    one without its own value, written on the centre's row (the window's first frame for a static
    unit), so each merged token sits at its centre's place and position. At the second stage every
    dropped visual token of a video span is folded into its most cosine-similar kept token of the span
    (the stage's input), in order, ``(kept + dropped) / 2`` (:func:`merge_sequentially`).

    Example::

        merge: {type: holitom_merge, criterion: holitom, beta: 0.6}
    """

    name: ClassVar[str] = "holitom_merge"
    criterion: str = "holitom"  # the key of the holitom criterion in the recipe
    beta: float = 0.6  # BETA: a centre's weight against its members' mean

    in_place: ClassVar[bool] = True

    def validate(self) -> None:
        if not isinstance(self.criterion, str) or not self.criterion:
            raise ValueError(f"criterion (the recipe key of the holitom criterion) must be a name, got "
                             f"{self.criterion!r}")
        if not _is_number(self.beta) or not 0 <= self.beta <= 1:
            raise ValueError(f"beta (a centre's weight against its members' mean) must be in [0, 1], got "
                             f"{self.beta!r}")

    def count(self, dropped: int) -> int:
        return 0  # merged into the kept tokens: no token added

    def merge_into_kept(self, hidden: Tensor, kept: Tensor, scores: Tensor, ctx: ForwardContext) -> Tensor:
        work = hidden if hidden.dtype in (torch.float32, torch.float64) else hidden.float()
        if ctx.stage > 0:
            return self._inner(hidden, work, kept, ctx)
        names = [f"{self.criterion}/{part}" for part in ("cell", "target")]
        missing = [name for name in names if name not in ctx.buffers]
        if missing:
            raise ValueError(f"holitom_merge reads the plan of the holitom criterion keyed {self.criterion!r}, "
                             f"but the recipe has none (no buffer {missing[0]!r}); set merge.criterion to the "
                             f"key of its holitom criterion")
        cell, target = (ctx.buffers.pop(name) for name in names)
        out = hidden.clone()  # [batch, seq, dim]
        for b in range(hidden.shape[0]):
            framed = (cell[b] >= 0).nonzero().flatten()  # [N]
            if not framed.numel():
                continue
            seq, dim = hidden.shape[1], hidden.shape[2]
            total = torch.zeros(seq, dim, dtype=work.dtype, device=hidden.device).index_add_(
                0, cell[b, framed], work[b, framed])
            size = torch.zeros(seq, dtype=work.dtype, device=hidden.device).index_add_(
                0, cell[b, framed], torch.ones(framed.numel(), dtype=work.dtype, device=hidden.device))
            value = total / size.clamp(min=1)[:, None]  # [seq, dim]: each unit's value on its row
            rows = torch.arange(seq, device=hidden.device)
            centres = (target[b] == rows).nonzero().flatten()
            members = ((target[b] >= 0) & (target[b] != rows)).nonzero().flatten()
            joined = torch.zeros(seq, dim, dtype=work.dtype, device=hidden.device).index_add_(
                0, target[b, members], value[members])
            count = torch.zeros(seq, dtype=work.dtype, device=hidden.device).index_add_(
                0, target[b, members], torch.ones(members.numel(), dtype=work.dtype, device=hidden.device))
            mean = joined[centres] / count[centres].clamp(min=1)[:, None]
            merged = torch.where(count[centres, None] > 0, self.beta * value[centres] + (1 - self.beta) * mean,
                                 value[centres])
            out[b, centres] = merged.to(hidden.dtype)
        return out

    def _inner(self, hidden: Tensor, work: Tensor, kept: Tensor, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        dropped = layout.visual & layout.valid & ~kept  # [batch, seq]
        out = hidden.clone()
        for b in range(hidden.shape[0]):
            for span in video_span_tokens(layout, b):
                mine, theirs = span[kept[b, span]], span[dropped[b, span]]
                if theirs.numel():
                    out[b, mine] = merge_sequentially(work[b, mine], work[b, theirs]).to(hidden.dtype)
        return out
