"""The vision block at the language model's input: one large Qwen2.5-VL image shortened per image, against none.

    python benchmarks/qwen_vision_input.py [--side 896] [--repeats 3]

A random-weight Qwen2.5-VL-7B-shaped model at width 256: a 28-layer Qwen2 decoder (MLP 5.3x, M-RoPE) and a
2-layer vision tower (patch 14, 2x2 merge). One ``side`` x ``side`` image gives (side / 28)^2 tokens (1024 at
896 px). ``divprune-per-image`` (a vision block: 9.8 % of each image, before layer 0) is compared with
``divprune`` (a layer-0 decoder stage keeping 9.8 % of the sample's visual tokens: the same tokens for one image),
``visionzip-received`` (LightCompress's VisionZip for Qwen2.5-VL: the tower's attention received, 1/3 of each
image) and ``pooling-64``. Ratios measured in one process (recipes interleaved per repeat after a warm-up): prefill
time, decoder time, the pruning work (``pruner.clock.total``) as a share of the unpruned prefill, and the analytic
decoder TFLOPs from the report's tokens per layer. Not a test.
"""

from __future__ import annotations

import sys

import torch

from prunekit.testing import END_ID, IMAGE_ID, START_ID, VIDEO_ID
from suite import table_main, vision_stage_table  # benchmarks/suite.py: the same timing loop and table

RECIPES = ("none", "divprune-per-image", "divprune", "visionzip-received", "pooling-64")


def qwen_model(num_layers: int = 28):
    """Qwen2.5-VL-7B's decoder shape at width 256 (MLP 18944 / 3584), a small tower, random weights."""
    import transformers as tf

    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=256, window_size=112, fullatt_block_indexes=[1])
    text = dict(hidden_size=256, intermediate_size=1353, num_hidden_layers=num_layers, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=320, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID,
                                 video_token_id=VIDEO_ID, vision_start_token_id=START_ID, vision_end_token_id=END_ID)
    torch.manual_seed(0)
    return tf.Qwen2_5_VLForConditionalGeneration(config).eval()


def image_inputs(side: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One prompt ``<bos> words <vision_start> <image> <vision_end> question`` with a ``side`` px image."""
    g = torch.Generator().manual_seed(seed)
    patches = side // 14
    tokens = (patches // 2) ** 2
    words = torch.randint(3, 250, (24,), generator=g).tolist()
    ids = torch.tensor([[1, *words[:8], START_ID, *([IMAGE_ID] * tokens), END_ID, *words[8:]]])
    pixel = torch.randn(patches * patches, 3 * 2 * 14 * 14, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel,
            "image_grid_thw": torch.tensor([[1, patches, patches]]), "mm_token_type_ids": (ids == IMAGE_ID).long()}


def run(side: int, repeats: int) -> list[str]:
    model = qwen_model()
    inputs = image_inputs(side)
    n_visual = int((inputs["input_ids"] == IMAGE_ID).sum())
    title = (f"### Qwen2.5-VL vision block at the language model's input (28 layers, width 256; one {side} px image "
             f"= {n_visual} visual tokens, {inputs['input_ids'].shape[1]} prompt tokens; median of {repeats})")
    return vision_stage_table(title, model, inputs, RECIPES, repeats, n_visual)


if __name__ == "__main__":
    sys.exit(table_main(__doc__, run, {"side": (int, 896, "image side in pixels (a multiple of 28)")}))
