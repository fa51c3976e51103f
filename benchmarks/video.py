"""The video row: a Qwen2.5-VL-shaped model with one 16-frame clip, pruned by each video recipe against none.

    python benchmarks/video.py [--frames 16] [--side 24] [--repeats 3]

A random-weight Qwen2.5-VL-7B-shaped decoder (28 layers, GQA 4:1, MLP 5.3x) at width 256, one clip
of ``frames`` temporal patches of ``side x side`` patches (``frames * (side / 2)^2`` visual tokens after
the 2x2 merge). Ratios measured in one process: prefill time (median of the repeats, recipes
interleaved) and peak prefill memory against no pruning, the pruning work (``pruner.clock.total``) as
a share of the unpruned prefill, and the KV cache after the prefill against the prediction from the
kept counts (tokens per layer x 2 x KV heads x head_dim x bytes). Not a test.
"""

from __future__ import annotations

import statistics
import sys

import torch

from prunekit.bench import _kv_bytes, _peak_memory
from prunekit.compat import cache_of
from prunekit.testing import END_ID, START_ID, family_config
from suite import _pruner, table_main, time_prefills  # benchmarks/suite.py: the same timing loop

RECIPES = ("none", "uniform-frames", "frame-difference", "dycoke", "fastvid", "prunevid", "holitom")


def qwen_video_model(num_layers: int = 28):
    """Qwen2.5-VL-7B's decoder shape at width 256 (as benchmarks/suite.py's qwen_shaped), random weights."""
    import transformers as tf

    config = family_config("qwen2_5_vl", num_layers)
    text = config.text_config
    text.hidden_size, text.intermediate_size = 256, 1352
    text.num_attention_heads, text.num_key_value_heads = 8, 2
    text.head_dim = 32
    text.rope_parameters["mrope_section"] = [4, 6, 6]
    config.vision_config.out_hidden_size = 256
    torch.manual_seed(0)
    return tf.AutoModelForImageTextToText.from_config(config).eval()


def clip_inputs(model, frames: int, side: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt ``<bos> words <video> question`` with a ``frames x side x side`` patch grid clip."""
    g = torch.Generator().manual_seed(seed)
    merge = model.config.vision_config.spatial_merge_size ** 2
    n_video = frames * side * side // merge
    words = torch.randint(3, 250, (20,), generator=g).tolist()
    ids = torch.tensor([[1, *words[:8], START_ID, *([model.config.video_token_id] * n_video), END_ID, *words[8:]]])
    patch = 3 * model.config.vision_config.temporal_patch_size * model.config.vision_config.patch_size ** 2
    pixel = torch.randn(frames * side * side, patch, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixel,
            "video_grid_thw": torch.tensor([[frames, side, side]]),
            "mm_token_type_ids": (ids == model.config.video_token_id).long() * 2}


def run(frames: int, side: int, repeats: int) -> list[str]:
    model = qwen_video_model()
    inputs = clip_inputs(model, frames, side)
    n_visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
    config = model.config.text_config
    per_token = 2 * config.num_key_value_heads * config.head_dim * model.dtype.itemsize  # K and V, one layer
    timings = time_prefills(model, inputs, RECIPES, repeats)  # recipes interleaved per repeat, one warm-up round
    totals = {name: timing.total for name, timing in timings.items()}
    work = {name: timing.overhead for name, timing in timings.items()}
    base = statistics.median(totals["none"])
    lines = [f"### Video (Qwen2.5-VL-shaped, 28 layers, width 256; one clip of {frames} frames x {side // 2}x{side // 2} "
             f"= {n_visual} visual tokens, {inputs['input_ids'].shape[1]} prompt tokens; median of {repeats})", "",
             "| recipe | kept visual | prefill ms | x none | peak prefill MB | x none | pruning work (% of unpruned "
             "prefill) | KV MB after prefill | KV / predicted |",
             "|---|---|---|---|---|---|---|---|---|"]
    base_peak = None
    for name in RECIPES:
        with _pruner(model, name, measure=False) as pruner, torch.no_grad():
            peak = _peak_memory(lambda: model(**inputs, use_cache=True), "cpu")
            out = model(**inputs, use_cache=True)
            report = pruner.last_report if pruner is not None else None
        base_peak = base_peak or peak
        kv = _kv_bytes(cache_of(out))
        tokens = [inputs["input_ids"].shape[1]] * config.num_hidden_layers if report is None \
            else report.tokens_per_layer
        predicted = sum(tokens) * per_token
        kept = n_visual if report is None else int(report[0].kept_counts[0])
        t = statistics.median(totals[name])
        lines.append(f"| {name} | {kept} | {t * 1e3:.0f} | {t / base:.3f} | {peak / 2**20:.1f} | {peak / base_peak:.3f} | "
                     f"{100 * statistics.median(work[name]) / base:.2f} | {kv / 2**20:.2f} | {kv / predicted:.4f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(table_main(__doc__, run, {"frames": (int, 16, "temporal patches of the clip"),
                                       "side": (int, 24, "patches per side of a frame (even)")}))
