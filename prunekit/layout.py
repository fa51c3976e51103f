"""Where the visual tokens and the instruction are in the sequence of one forward pass."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class TokenLayout:
    """Per-token facts of the current (possibly already pruned) sequence of a batch.

    Every field is a ``[batch, seq]`` tensor aligned with the hidden states the next decoder
    layer receives. Adapters build the first layout from ``input_ids``; the engine gathers it
    whenever it drops tokens, so criteria always see the layout of the sequence they score.
    """

    visual: Tensor  # [batch, seq] bool: a visual (image or video) token
    instruction: Tensor  # [batch, seq] bool: a prompt token after the last visual token of its sample
    valid: Tensor  # [batch, seq] bool: a real token (not padding, not a fill slot after pruning)
    original_index: Tensor  # [batch, seq] long: index of the token in the prefill input; -1 on fill slots
    image_index: Tensor  # [batch, seq] long: which visual span of the sample the token belongs to; -1 for text
    # Frames of a video span (filled by the adapter from the family's processor facts; -1 elsewhere):
    frame_index: Tensor | None = None  # [batch, seq] long: frame (temporal patch) within its video span; -1 for
    # text, still images and video tokens that sit in no frame (OneVision's closing newline)
    grid_row: Tensor | None = None  # [batch, seq] long: row of the token's cell in its frame's grid; -1 off grids
    grid_col: Tensor | None = None  # [batch, seq] long: column of the token's cell; -1 off grids (a frame's CLS)
    attention_block: Tensor | None = None  # [batch, seq] long: in the prefill, tokens of one block (>= 0) attend
    # to each other both ways (Gemma 3's images, PaliGemma's prefix); -1: causal only

    def __post_init__(self) -> None:
        for name in ("frame_index", "grid_row", "grid_col", "attention_block"):
            if getattr(self, name) is None:
                setattr(self, name, torch.full_like(self.original_index, -1))

    @property
    def batch_size(self) -> int:
        return self.visual.shape[0]

    @property
    def seq_len(self) -> int:
        return self.visual.shape[1]

    @property
    def has_frames(self) -> bool:
        """Whether any token of the batch sits in a video frame."""
        return bool((self.frame_index >= 0).any())

    def visual_counts(self) -> Tensor:
        """Visual tokens per sample, ``[batch]`` long."""
        return self.visual.sum(dim=1)

    def gather(self, index: Tensor, fill: Tensor) -> TokenLayout:
        """The layout of the sequence ``index`` selects; ``fill`` marks slots that hold no token.

        index: [batch, new_seq] long positions in the current sequence; fill: [batch, new_seq] bool.
        """
        out = {}
        for f in fields(self):
            value: Tensor = getattr(self, f.name).gather(1, index)
            if value.dtype == torch.bool:
                value = value & ~fill
            else:
                value = value.masked_fill(fill, -1)
            out[f.name] = value
        return TokenLayout(**out)


def run_starts(mask: Tensor) -> Tensor:
    """``[batch, seq]`` bool: the first token of each contiguous run of ``mask`` (``[batch, seq]`` bool)."""
    return mask & ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)


def last_index(mask: Tensor) -> Tensor:
    """``[batch]`` long: index of the last true entry of each row of ``mask`` (``[batch, seq]``), -1 for none."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, positions, -1).amax(dim=1)


def spans_from_mask(visual: Tensor) -> Tensor:
    """Number each contiguous run of visual tokens within a sample: ``[batch, seq]`` long, -1 off runs."""
    run_id = run_starts(visual).long().cumsum(dim=1) - 1
    return run_id.masked_fill(~visual, -1)


def layout_from_ids(input_ids: Tensor, visual: Tensor, attention_mask: Tensor | None) -> TokenLayout:
    """The layout for a prompt whose visual tokens are ``visual`` (``[batch, seq]`` bool).

    The instruction of a sample is every valid token after its last visual token (the question
    and the assistant prefix of a chat template); samples without visual tokens have none.
    """
    batch, seq = input_ids.shape
    valid = torch.ones_like(visual) if attention_mask is None else attention_mask.to(torch.bool)
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    last_visual = last_index(visual)  # [batch]
    has_visual = last_visual >= 0
    instruction = valid & ~visual & (positions > last_visual[:, None]) & has_visual[:, None]
    return TokenLayout(
        visual=visual & valid,
        instruction=instruction,
        valid=valid,
        original_index=positions.clone(),
        image_index=spans_from_mask(visual & valid),
    )


def _runs(mask_row: Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` of each contiguous run of true entries of a ``[seq]`` bool row."""
    starts = run_starts(mask_row[None])[0].nonzero().flatten().tolist()
    ends = run_starts(mask_row.flip(0)[None])[0].flip(0).nonzero().flatten().tolist()
    return [(s, e + 1) for s, e in zip(starts, ends)]


def frames_from_runs(layout: TokenLayout, video: Tensor, per_frame: int, cols: int, lead: int = 0,
                     tail: int = 0) -> TokenLayout:
    """Fill the frame fields of ``layout`` for prompts whose video spans are runs of ``video`` tokens.

    video: ``[batch, seq]`` bool. Each run holds whole frames of ``per_frame`` tokens, then ``tail``
    tokens that belong to no frame (OneVision's newline). A frame's first ``lead`` tokens have no grid
    cell (Video-LLaVA's CLS); the rest fill a row-major grid ``cols`` wide. A run whose length does not
    fit this shape is left at -1 (its frames cannot be told apart). Returns ``layout``, filled in place.
    """
    if per_frame < 1 or cols < 1 or lead < 0 or tail < 0 or lead >= per_frame:
        raise ValueError(f"frame shape needs per_frame >= 1 > lead >= 0, cols >= 1, tail >= 0; got "
                         f"per_frame={per_frame}, cols={cols}, lead={lead}, tail={tail}")
    video = video & layout.valid
    for b in range(video.shape[0]):
        for start, end in _runs(video[b]):
            framed = end - start - tail
            if framed <= 0 or framed % per_frame:
                continue
            k = torch.arange(framed, device=video.device)  # [framed] place in the run
            cell = k % per_frame - lead  # [framed]; < 0 on lead tokens
            layout.frame_index[b, start:start + framed] = k // per_frame
            layout.grid_row[b, start:start + framed] = torch.where(cell >= 0, cell // cols, -1)
            layout.grid_col[b, start:start + framed] = torch.where(cell >= 0, cell % cols, -1)
    return layout


def frames_from_grids(layout: TokenLayout, video: Tensor, grids: list[tuple[int, int, int]]) -> TokenLayout:
    """Fill the frame fields for prompts whose video spans are whole ``frames x rows x cols`` grids, frame-major
    (Qwen2-VL / Qwen2.5-VL: ``video_grid_thw`` after the spatial merge), one grid per run of ``video`` tokens
    (``[batch, seq]`` bool) in batch order. A run whose length is not its grid's size is left at -1. Returns
    ``layout``, filled in place."""
    runs = [(b, start, end) for b in range(video.shape[0]) for start, end in _runs((video & layout.valid)[b])]
    for (b, start, end), (frames, rows, cols) in zip(runs, grids):
        if end - start != frames * rows * cols:
            continue
        k = torch.arange(end - start, device=video.device)  # [run] place in the run
        layout.frame_index[b, start:end] = k // (rows * cols)
        layout.grid_row[b, start:end] = k % (rows * cols) // cols
        layout.grid_col[b, start:end] = k % cols
    return layout


def frames_from_frame_runs(layout: TokenLayout, video: Tensor, grids: list[tuple[int, int, int]] | None = None,
                           positions: Tensor | None = None) -> TokenLayout:
    """Fill the frame fields for prompts that put each frame of a video in a run of its own, between timestamps
    (Qwen3-VL). ``video``: ``[batch, seq]`` bool. With ``grids`` (the ``(frames, rows, cols)`` of each video in
    batch order, merged grid) each video is its next ``frames`` runs; without, every run that follows another
    of its sample with text only between (timestamps, vision start / end) continues the clip, and each run's
    cells are read from the M-RoPE ``positions`` (``[3, batch, seq]``, as :func:`frames_from_mrope`). The
    frames of one video share the ``image_index`` of its first run, so criteria see one clip. A run whose
    length does not fit its grid is left at -1. Returns ``layout``, filled in place."""
    video = video & layout.valid
    if grids is None:
        if positions is None:
            return layout
        frames_from_mrope(layout, video, positions)  # each run: one frame, its cells from its own positions
    per_video = iter([frames for frames, _, _ in grids or []])
    cells = iter([(rows, cols) for frames, rows, cols in grids or [] for _ in range(frames)])
    for b in range(video.shape[0]):
        runs = _runs(video[b])
        remaining, frame, span = 0, 0, -1
        for index, (start, end) in enumerate(runs):
            if grids is not None:
                if remaining == 0:
                    remaining, frame, span = next(per_video, 0), 0, int(layout.image_index[b, start])
                remaining -= 1
                rows, cols = next(cells, (0, 0))
                if rows * cols != end - start:
                    layout.frame_index[b, start:end] = -1
                    frame += 1
                    continue
                k = torch.arange(end - start, device=video.device)
                layout.grid_row[b, start:end] = k // cols
                layout.grid_col[b, start:end] = k % cols
            elif index == 0 or bool(layout.visual[b, runs[index - 1][1]:start].any()):  # a new clip
                frame, span = 0, int(layout.image_index[b, start])
            layout.frame_index[b, start:end] = frame
            layout.image_index[b, start:end] = span
            frame += 1
    return layout


def frames_from_mrope(layout: TokenLayout, video: Tensor, positions: Tensor) -> TokenLayout:
    """Fill the frame fields from M-RoPE positions (Qwen2-VL / Qwen2.5-VL): ``positions`` ``[3, batch, seq]``.

    A video span's token at temporal patch ``t``, merged-grid cell ``(r, c)`` has positions
    ``(s + int(t * interval), s + r, s + c)`` with ``s`` the span's first position (the model's
    ``get_rope_index``); frames are frame-major and each starts at cell ``(0, 0)``, so a token opens
    a frame where its row and column offsets are both 0. Returns ``layout``, filled in place.
    """
    video = video & layout.valid
    for b in range(video.shape[0]):
        for start, end in _runs(video[b]):
            origin = positions[0, b, start]
            row = positions[1, b, start:end] - origin  # [run]
            col = positions[2, b, start:end] - origin
            opens = (row == 0) & (col == 0)
            layout.frame_index[b, start:end] = opens.long().cumsum(0) - 1
            layout.grid_row[b, start:end] = row
            layout.grid_col[b, start:end] = col
    return layout
