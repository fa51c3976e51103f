"""MustDrop's prefill stages against none, FastV and SparseVLM on a LLaVA-1.5-shaped model.

    python benchmarks/mustdrop.py [--repeats 3]

A random-weight LLaVA-1.5-7B-shaped model at width 256 (32 layers, 576 visual tokens, a 2-layer CLIP-style tower).
``mustdrop`` runs its dual-attention filter after decoder layers 2, 6, 10 and 14 (the official 64-token setting's
thresholds, 0.011 / 0.01) and keeps a key set of 47 tokens by the tower's CLS attention; ``mustdrop-192-thresholds``
is the same recipe with the official 192-token setting's thresholds (0.001 / 0.001); ``mustdrop-3stage`` adds the
window merge before the language model (192 tokens enter it). Their counts depend on the
attention, so its visual tokens after each stage and the decoder TFLOPs come from the report of the run. Ratios
measured in one process (recipes interleaved per repeat after a warm-up): prefill time, decoder time, the pruning
work (``pruner.clock.total``: the attention-rows probes and the filter) as a share of the unpruned prefill. Not a
test.
"""

from __future__ import annotations

import statistics
import sys

import torch

import prunekit
from prunekit.bench import build_model
from prunekit.flops import DecoderDims, prefill_flops
from prunekit.testing import LLAVA15_SHAPED, llava_inputs
from suite import table_main, time_prefills  # benchmarks/suite.py: the same timing loop

THRESHOLDS_192 = ["criteria.mustdrop.global_thr=0.001", "criteria.mustdrop.individual_thr=0.001"]
RECIPES = {"none": None, "fastv": "fastv", "sparsevlm": "sparsevlm", "mustdrop": "mustdrop",
           "mustdrop-192-thresholds": prunekit.load_recipe("mustdrop", THRESHOLDS_192),
           "mustdrop-3stage": "mustdrop-3stage"}


def run(repeats: int) -> list[str]:
    model = build_model(LLAVA15_SHAPED, torch.float32, "sdpa", "cpu")
    inputs = llava_inputs(LLAVA15_SHAPED, batch=1, seed=0)
    dims = DecoderDims.from_config(model.config)
    timings = time_prefills(model, inputs, list(RECIPES), repeats, sources=RECIPES)
    base, base_decoder = statistics.median(timings["none"].total), statistics.median(timings["none"].decoder)
    length = inputs["input_ids"].shape[1]
    base_flops = prefill_flops([length] * dims.num_layers, dims)
    lines = [f"### MustDrop's prefill stages, LLaVA-1.5-shaped (32 layers, width 256, 576 visual tokens, {length} "
             f"prompt tokens; median of {repeats})", "",
             "| recipe | visual tokens after each stage | prefill ms | x none | decoder ms | x none | pruning work (% "
             "of unpruned prefill) | decoder TFLOPs x none |", "|---|---|---|---|---|---|---|---|"]
    for name, source in RECIPES.items():
        counts, flops = "-", base_flops
        if source is not None:
            with prunekit.apply(model, source) as pruner, torch.no_grad():
                model(**inputs, use_cache=True)
            report = pruner.last_report
            counts = " / ".join(f"{int(s.kept_counts[0] + s.merged_counts[0])} (layer {s.layer})" for s in report)
            flops = prefill_flops(report.tokens_per_layer, dims)
        total, decoder = statistics.median(timings[name].total), statistics.median(timings[name].decoder)
        lines.append(f"| {name} | {counts} | {total * 1e3:.0f} | {total / base:.3f} | {decoder * 1e3:.0f} | "
                     f"{decoder / base_decoder:.3f} | {100 * statistics.median(timings[name].overhead) / base:.2f} | "
                     f"{flops / base_flops:.3f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(table_main(__doc__, run, {}))
