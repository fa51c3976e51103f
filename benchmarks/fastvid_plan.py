"""FastVID's own work on a LLaVA-OneVision-7B-shaped clip: the fastvid criterion's plan and fastvid_merge's merge.

A 32-frame clip of 196 tokens per frame (3584 wide, plus OneVision's newline) in 6 scenes, on one CPU
thread; prints the best of 5 runs per retention and the tokens kept and merged. Run:

    python benchmarks/fastvid_plan.py
"""

from __future__ import annotations

import time

import torch
from prunekit.criteria.fastvid import FastVID, FastVIDMerge

from clip_layout import DIM, FRAMES, PER_FRAME, SCENES, TEXT, clip_layout  # benchmarks/clip_layout.py
from prunekit.testing import forward_context


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    layout, seq, n_video = clip_layout()
    scenes = torch.randn(len(SCENES), 1, DIM).repeat_interleave(torch.tensor(SCENES), dim=0)  # [frames, 1, dim]
    hidden = torch.randn(1, seq, DIM)  # [batch, seq, dim]
    hidden[0, TEXT:TEXT + n_video] = (scenes + torch.randn(FRAMES, PER_FRAME, DIM)).reshape(-1, DIM)
    for retention in (0.25, 0.10):
        criterion, merger = FastVID(retention=retention), FastVIDMerge()
        criterion.key = "fastvid"
        plan, merge = [], []
        for _ in range(5):
            ctx = forward_context(layout, stage_layers=(0,), buffers={"fastvid/hidden0": hidden})
            start = time.perf_counter()
            score = criterion.score(ctx)  # [batch, seq]
            planned = time.perf_counter()
            merger.merge_into_kept(hidden, layout.visual & (score > float("-inf")), score, ctx)
            plan.append(planned - start)
            merge.append(time.perf_counter() - planned)
        kept = int((layout.visual & (score > float("-inf"))).sum())
        centres = int((ctx.buffers["fastvid/centre"] > 0).sum())
        print(f"retention {retention}: plan {1e3 * min(plan):.0f} ms, merge {1e3 * min(merge):.0f} ms (1 CPU thread); "
              f"kept {kept} of {n_video + 1} visual tokens ({centres} of them centres merged into in place)")


if __name__ == "__main__":
    main()
