"""The token layout the video-method timing scripts share: one LLaVA-OneVision-7B-shaped clip between two texts."""

from __future__ import annotations

import torch

from prunekit.layout import TokenLayout, layout_from_ids

FRAMES, PER_FRAME, DIM, TEXT = 32, 196, 3584, 20  # 32 frames of 14 x 14 tokens, 3584 wide
SCENES = [4, 8, 2, 6, 7, 5]  # frames per scene


def clip_layout() -> tuple[TokenLayout, int, int]:
    """``TEXT`` text tokens, the clip's frames (then OneVision's newline), ``TEXT`` more: the layout with its frame
    fields filled, the sequence length and the clip's frame tokens."""
    n_video = FRAMES * PER_FRAME
    seq = 2 * TEXT + n_video + 1
    visual = torch.zeros(1, seq, dtype=torch.bool)
    visual[0, TEXT:TEXT + n_video + 1] = True
    layout = layout_from_ids(torch.zeros(1, seq, dtype=torch.long), visual, None)
    index = torch.arange(n_video)
    layout.frame_index[0, TEXT:TEXT + n_video] = index // PER_FRAME
    layout.grid_row[0, TEXT:TEXT + n_video] = (index % PER_FRAME) // 14
    layout.grid_col[0, TEXT:TEXT + n_video] = index % 14
    return layout, seq, n_video
