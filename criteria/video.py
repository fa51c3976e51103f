"""Video criteria that read the frames of the token layout: two blind baselines and DyCoke's temporal merging.

Each reads ``ctx.layout.frame_index`` / ``grid_row`` / ``grid_col`` (filled by the adapter from the
family's processor facts). Visual tokens outside any frame (still images, OneVision's closing newline,
merged summary tokens) always score above frame tokens: these criteria choose among frames only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from prunekit.api import Criterion, ForwardContext, LayerInputCriterion
from prunekit.layout import TokenLayout

_OUTSIDE = 8.0  # score of visual tokens in no frame: above every frame score below


def video_spans(layout: TokenLayout, b: int) -> list[Tensor]:
    """The positions (``[n]`` long, in order) of each video span of sample ``b``: its visual tokens in frames."""
    framed = layout.visual[b] & (layout.frame_index[b] >= 0)  # [seq]
    spans = layout.image_index[b][framed].unique().tolist()
    return [(framed & (layout.image_index[b] == s)).nonzero().flatten() for s in spans]


def cell_keys(layout: TokenLayout, b: int, positions: Tensor) -> Tensor:
    """``[n]`` long: one key per grid cell (a frame's CLS, outside the grid, is cell -1, -1)."""
    row, col = layout.grid_row[b, positions], layout.grid_col[b, positions]
    return (row + 1) * (int(col.max()) + 2) + col + 1


def previous_cell(layout: TokenLayout, b: int, positions: Tensor) -> Tensor:
    """``[n]`` long: for each token of one video span, the position of the same grid cell in the nearest earlier
    frame of the current sequence that still holds it; -1 in the first frame and where no earlier frame does."""
    frames = layout.frame_index[b, positions]  # [n]
    keys = cell_keys(layout, b, positions)
    last = torch.full((int(keys.max()) + 1,), -1, dtype=torch.long, device=positions.device)  # cell -> position
    previous = torch.full_like(positions, -1)
    for f in frames.unique().tolist():  # frames in order
        here = frames == f
        previous[here] = last[keys[here]]
        last[keys[here]] = positions[here]
    return previous


def _fill_outside(layout: TokenLayout, score: Tensor) -> Tensor:
    """Visual tokens in no frame score :data:`_OUTSIDE`; everything but visual tokens 0."""
    outside = layout.visual & (layout.frame_index < 0)
    return score.masked_fill(outside, _OUTSIDE).masked_fill(~layout.visual, 0)


def evenly_spaced(frames: int, keep: int) -> list[int]:
    """``keep`` of ``frames`` frame ranks spread evenly: the middle of each of ``keep`` equal parts."""
    return [int((i + 0.5) * frames / keep) for i in range(keep)]


@dataclass
class UniformFrames(Criterion):
    """Uniform frame dropping (blind baseline): keep whole frames, evenly spaced, drop the others.

    Each video span of ``F`` frames keeps ``m = round(F * k / n)`` frames (at least one), ``k`` the
    stage's kept count and ``n`` the sample's visual tokens: the frames in the middle of ``m`` equal
    parts of the clip (:func:`evenly_spaced`). Their tokens score 2, the other frames' 1 (ties keep
    earlier tokens, so a count that is not a whole number of frames cuts the last kept frames short or
    takes the first tokens of the next one). Tokens in no frame score highest.

    Example::

        criteria: {frames: {type: uniform_frames}}
        schedule: {type: stages, stages: [{layer: 0, keep: 0.25}]}
    """

    name: ClassVar[str] = "uniform_frames"

    def score(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        score = torch.ones(layout.visual.shape, dtype=torch.float64, device=layout.visual.device)  # [batch, seq]
        n_visual = layout.visual_counts()  # [batch]
        for b in range(layout.batch_size):
            share = 1.0 if ctx.keep_counts is None else float(ctx.keep_counts[b]) / max(int(n_visual[b]), 1)
            for positions in video_spans(layout, b):
                frames = layout.frame_index[b, positions]  # [n]
                present = frames.unique()  # frame indices in order
                keep = min(max(round(len(present) * share), 1), len(present))
                chosen = present[evenly_spaced(len(present), keep)]
                score[b, positions] = torch.where(torch.isin(frames, chosen), 2.0, 1.0).to(score.dtype)
        return _fill_outside(layout, score)


_METRICS = ("cosine", "l2")


@dataclass
class FrameDifference(LayerInputCriterion):
    """Frame difference (blind baseline): a token scores its distance to the same grid cell in the previous frame.

    Distance on the hidden states entering the prune layer: ``1 - cos`` (``metric: cosine``) or the L2
    distance (``metric: l2``). The previous frame is the nearest earlier frame of the span whose cell is
    still in the sequence. Tokens of the first frame (and cells no earlier frame holds) score highest,
    above every distance; so a stage drops the tokens nearly equal to their previous-frame cell first.

    Example::

        criteria: {diff: {type: frame_difference, metric: cosine}}
        schedule: {type: stages, stages: [{layer: 0, keep: 0.3}]}
    """

    name: ClassVar[str] = "frame_difference"
    metric: str = "cosine"

    def validate(self) -> None:
        if self.metric not in _METRICS:
            raise ValueError(f"metric={self.metric!r} is unknown; valid: {', '.join(_METRICS)}")

    def score(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        hidden = self.stage_hidden(ctx).to(torch.float64)  # [batch, seq, hidden]
        score = torch.zeros(layout.visual.shape, dtype=torch.float64, device=hidden.device)  # [batch, seq]
        for b in range(layout.batch_size):
            for positions in video_spans(layout, b):
                previous = previous_cell(layout, b, positions)  # [n]
                x, y = hidden[b, positions], hidden[b, previous.clamp(min=0)]  # [n, hidden] each
                if self.metric == "cosine":
                    distance = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12)
                else:
                    distance = (x - y).norm(dim=-1)
                top = float(distance.max()) + 1 if distance.numel() else 1.0
                score[b, positions] = torch.where(previous >= 0, distance, torch.full_like(distance, top))
        top = score.amax(dim=1, keepdim=True) + 1  # [batch, 1]: tokens in no frame above everything
        outside = layout.visual & (layout.frame_index < 0)
        return torch.where(outside, top, score).masked_fill(~layout.visual, 0)


def dycoke_plan(frames: int) -> list[tuple[int, int]]:
    """DyCoke's temporal token merging as ``(pruned frame, reference frame)`` pairs over frames ``0..frames-1``.

    The official ``dycole_ttm``: in each pair ``(2j, 2j + 1)`` the odd frame is pruned against the even
    one; then for ``i`` in ``range(0, frames - 4, 4)`` frame ``i + 2`` is pruned against frame ``i`` (both
    compared on their unpruned features). The other frames stay whole.
    """
    plan = [(i + 1, i) for i in range(0, frames - 1, 2)]
    plan += [(i + 2, i) for i in range(0, frames - 4, 4)]
    return plan


@dataclass
class DyCokeTTM(LayerInputCriterion):
    """DyCoke's temporal token merging (TTM; Tao et al., CVPR 2025), the prefill part, on each video span.

    Frames are paired as :func:`dycoke_plan` says. In a pruned frame every token gets the cosine
    similarity to the token in the same place of its reference frame (features entering the prune layer;
    the official code runs on the projected, pooled frame features, i.e. before decoder layer 0) and the
    official code keeps the ``int((1 - k) * n)`` least similar of its ``n`` tokens. Here a pruned frame's
    token of similarity rank ``r`` (ascending, ties to the earlier token) scores ``2 - r / n``; tokens of
    whole frames (and tokens in no frame) score higher. A stage that keeps DyCoke's own count (whole
    frames plus ``int((1 - k) * n)`` per pruned frame, :func:`dycoke_keep_count`) keeps exactly the
    official set, in sequence order; other counts take ranks evenly across the pruned frames. With
    ``own_count: true`` the tokens DyCoke drops score -inf, so a stage keeping 1.0 keeps DyCoke's own
    count on every clip, whatever its frames and grid (recipe ``dycoke-own-count``).

    Two differences from the official code: the kept tokens stay in their original order (the
    official code orders a pruned frame's kept tokens by similarity), and with an odd number of frames
    the last frame stays whole (the official loop leaves it out of the sequence). DyCoke's
    decode-time dynamic KV pruning (``dycoke_l``, ``dycoke_p``) is not built.

    Example::

        criteria: {ttm: {type: dycoke_ttm, k: 0.7}}
        schedule: {type: stages, stages: [{layer: 0, keep: 0.494}]}
    """

    name: ClassVar[str] = "dycoke_ttm"
    k: float = 0.7  # the official dycoke_k: the share of a pruned frame's tokens that go
    own_count: bool = False  # score the tokens DyCoke drops -inf: each clip keeps DyCoke's own count (stage keep 1)

    def clip_count(self, frames: int, per_frame: int) -> int | None:
        return dycoke_keep_count(frames, per_frame, self.k) if self.own_count else None

    def validate(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0 <= self.k < 1:
            raise ValueError(f"k (the share of a pruned frame's tokens DyCoke drops) must be in [0, 1), got {self.k!r}")
        if not isinstance(self.own_count, bool):
            raise ValueError(f"own_count must be true or false, got {self.own_count!r}")

    def score(self, ctx: ForwardContext) -> Tensor:
        layout = ctx.layout
        hidden = self.stage_hidden(ctx)  # [batch, seq, hidden]
        score = torch.full(layout.visual.shape, 3.0, dtype=torch.float64, device=hidden.device)  # [batch, seq]
        for b in range(layout.batch_size):
            for positions in video_spans(layout, b):
                frames = layout.frame_index[b, positions]  # [n]
                present = frames.unique().tolist()
                keys = cell_keys(layout, b, positions)
                for pruned, reference in dycoke_plan(len(present)):
                    mine = positions[frames == present[pruned]]  # [n_f] positions of the pruned frame
                    theirs = positions[frames == present[reference]]
                    my_keys, their_keys = keys[frames == present[pruned]], keys[frames == present[reference]]
                    match = (my_keys[:, None] == their_keys[None, :]).long().argmax(dim=1)  # [n_f]
                    found = (my_keys[:, None] == their_keys[None, :]).any(dim=1)
                    x = hidden[b, mine].to(torch.float64)
                    y = hidden[b, theirs[match]].to(torch.float64)
                    similarity = torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-8)
                    similarity = torch.where(found, similarity, torch.full_like(similarity, -2.0))  # no partner: keep
                    rank = torch.empty_like(mine)
                    rank[torch.sort(similarity, stable=True).indices] = torch.arange(len(mine), device=mine.device)
                    score[b, mine] = 2 - rank.to(torch.float64) / len(mine)
                    if self.own_count:  # the official count: the int((1 - k) * n) least similar stay
                        score[b, mine[rank >= int((1 - self.k) * len(mine))]] = float("-inf")
        return score.masked_fill(~layout.visual, 0)


def dycoke_keep_count(frames: int, tokens_per_frame: int, k: float = 0.7, tail: int = 0) -> int:
    """The visual tokens DyCoke's TTM keeps of one video of ``frames`` frames of ``tokens_per_frame`` tokens
    (plus ``tail`` tokens in no frame, e.g. OneVision's newline): whole frames, and ``int((1 - k) * n)``
    per pruned frame (the official count)."""
    pruned = len(dycoke_plan(frames))
    return (frames - pruned) * tokens_per_frame + pruned * int((1 - k) * tokens_per_frame) + tail
