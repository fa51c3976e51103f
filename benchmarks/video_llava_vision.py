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

import sys

import torch

from prunekit.testing import IMAGE_ID, VIDEO_ID
from suite import table_main, vision_stage_table  # benchmarks/suite.py: the same timing loop and table

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
    title = (f"### Video-LLaVA vision stage (32 layers, width 256; one clip of {frames} frames x 257 = {n_visual} "
             f"visual tokens, {inputs['input_ids'].shape[1]} prompt tokens; median of {repeats})")
    return vision_stage_table(title, model, inputs, RECIPES, repeats, n_visual)


if __name__ == "__main__":
    sys.exit(table_main(__doc__, run, {"frames": (int, 8, "frames of the clip (Video-LLaVA samples 8)")}))
