"""The Video-LLaVA vision-stage row: one 8-frame clip shortened frame by frame before the projector, against none.

    python benchmarks/video_llava_vision.py [--frames 8] [--repeats 3]

A random-weight Video-LLaVA-7B-shaped model at width 256: a 32-layer Llama decoder (MLP 2.7x) and a 2-layer CLIP
video tower at 224 px, patch 14 (each frame is CLS + 16x16 patches = 257 tokens, as Video-LLaVA feeds its video
frames). Each vision-stage recipe keeps its count per frame; `divprune` (a layer-0 stage, 9.8 % of the clip) is the
decoder-side comparison. Ratios measured in one process (recipes interleaved per repeat after a warm-up): prefill
time, decoder time, and the pruning work (``pruner.clock.total``) as a share of the unpruned prefill, plus the
analytic decoder TFLOPs from the report's tokens per layer. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from prunekit.flops import DecoderDims, prefill_flops
from prunekit.testing import IMAGE_ID, VIDEO_ID
from suite import _pruner, time_prefills  # benchmarks/suite.py: the same timing loop

RECIPES = ("none", "fastervlm-64", "visionzip-64", "vispruner-64", "divprune")


def video_llava_model(num_layers: int = 32):
    """Video-LLaVA-7B's decoder shape at width 256 (Vicuna: MLP 11008 / 4096), a small CLIP tower, random weights."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=224, patch_size=14, projection_dim=64)
    text = tf.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=num_layers, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=320, max_position_embeddings=4096)
    config = tf.VideoLlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                 video_token_id=VIDEO_ID, vision_feature_layer=-2)
    torch.manual_seed(0)
    return tf.VideoLlavaForConditionalGeneration(config).eval()


def clip_inputs(model, frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt ``<bos> words <video> question`` with a ``frames``-frame 224 px clip."""
    g = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    per_frame = 1 + (vision.image_size // vision.patch_size) ** 2
    words = torch.randint(3, 250, (24,), generator=g).tolist()
    ids = torch.tensor([[1, *words[:8], *([VIDEO_ID] * (frames * per_frame)), *words[8:]]])
    pixel = torch.randn(1, frames, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixel}


def run(frames: int, repeats: int) -> list[str]:
    model = video_llava_model()
    inputs = clip_inputs(model, frames)
    n_visual = int((inputs["input_ids"] == VIDEO_ID).sum())
    dims = DecoderDims.from_config(model.config)
    timings = time_prefills(model, inputs, RECIPES, repeats)
    base = statistics.median(timings["none"].total)
    base_decoder = statistics.median(timings["none"].decoder)
    lines = [f"### Video-LLaVA vision stage (32 layers, width 256; one clip of {frames} frames x 257 = {n_visual} "
             f"visual tokens, {inputs['input_ids'].shape[1]} prompt tokens; median of {repeats})", "",
             "| recipe | where | kept visual | prefill ms | x none | decoder ms | x none | pruning work (% of unpruned "
             "prefill) | decoder TFLOPs | x none |", "|---|---|---|---|---|---|---|---|---|---|"]
    base_flops = None
    for name in RECIPES:
        with _pruner(model, name, measure=False) as pruner, torch.no_grad():
            model(**inputs, use_cache=True)
            report = pruner.last_report if pruner is not None else None
        length = inputs["input_ids"].shape[1]
        tokens = [length] * dims.num_layers if report is None else report.tokens_per_layer
        flops = prefill_flops(tokens, dims)
        base_flops = base_flops or flops
        kept = n_visual if report is None else int(report[0].kept_counts[0] + report[0].merged_counts[0])
        where = "-" if report is None else report[0].where
        total, decoder = statistics.median(timings[name].total), statistics.median(timings[name].decoder)
        work = statistics.median(timings[name].overhead)
        lines.append(f"| {name} | {where} | {kept} | {total * 1e3:.0f} | {total / base:.3f} | {decoder * 1e3:.0f} | "
                     f"{decoder / base_decoder:.3f} | {100 * work / base:.2f} | {flops / 1e12:.4f} | "
                     f"{flops / base_flops:.3f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="frames of the clip (Video-LLaVA samples 8)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lines = run(args.frames, args.repeats)
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
