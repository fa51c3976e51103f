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

from clip_layout import DIM, FRAMES, PER_FRAME, SCENES, TEXT, clip_layout  # benchmarks/clip_layout.py
from prunekit.testing import forward_context


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layout, seq, n_video = clip_layout()
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
