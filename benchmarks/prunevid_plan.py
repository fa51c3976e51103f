"""PruneVid's own work on a LLaVA-OneVision-7B-shaped clip: the prunevid criterion's merge plan and prunevid_merge.

A 32-frame clip of 196 tokens per frame (3584 wide, plus OneVision's newline) in 6 scenes, in each of
which half of the cells barely move, on one CPU thread; prints the best of 5 runs and the tokens kept.
Run:

    python benchmarks/prunevid_plan.py
"""

from __future__ import annotations

import time

import torch
from prunekit.criteria.prunevid import PruneVid, PruneVidMerge

from prunekit.layout import layout_from_ids
from prunekit.testing import forward_context

FRAMES, PER_FRAME, DIM, TEXT = 32, 196, 3584, 20
SCENES = [4, 8, 2, 6, 7, 5]  # frames per scene


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n_video = FRAMES * PER_FRAME
    seq = 2 * TEXT + n_video + 1
    visual = torch.zeros(1, seq, dtype=torch.bool)
    visual[0, TEXT:TEXT + n_video + 1] = True
    layout = layout_from_ids(torch.zeros(1, seq, dtype=torch.long), visual, None)
    index = torch.arange(n_video)
    layout.frame_index[0, TEXT:TEXT + n_video] = index // PER_FRAME
    layout.grid_row[0, TEXT:TEXT + n_video] = (index % PER_FRAME) // 14
    layout.grid_col[0, TEXT:TEXT + n_video] = index % 14
    scenes = torch.randn(len(SCENES), PER_FRAME, DIM).repeat_interleave(torch.tensor(SCENES), dim=0)  # [F, n, dim]
    moving = (torch.arange(PER_FRAME) >= PER_FRAME // 2)[None, :, None]  # half of the cells change every frame
    noise = torch.randn(FRAMES, PER_FRAME, DIM) * torch.where(moving, 2.0, 0.3)
    hidden = torch.randn(1, seq, DIM)  # [batch, seq, dim]
    hidden[0, TEXT:TEXT + n_video] = (scenes + noise).reshape(-1, DIM)
    criterion, merger = PruneVid(), PruneVidMerge()
    criterion.key = "prunevid"
    plan, merge = [], []
    for _ in range(5):
        ctx = forward_context(layout, stage_layers=(0,), buffers={"prunevid/hidden0": hidden})
        start = time.perf_counter()
        score = criterion.score(ctx)  # [batch, seq]
        planned = time.perf_counter()
        merger.merge_into_kept(hidden, layout.visual & (score > float("-inf")), score, ctx)
        plan.append(planned - start)
        merge.append(time.perf_counter() - planned)
    kept = int((layout.visual & (score > float("-inf"))).sum())
    static = int(ctx.buffers["prunevid/static"].sum())
    print(f"plan {1e3 * min(plan):.0f} ms, merge {1e3 * min(merge):.0f} ms (1 CPU thread); kept {kept} of "
          f"{n_video + 1} visual tokens ({static} frame tokens in static cells)")


if __name__ == "__main__":
    main()
