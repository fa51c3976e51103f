"""Tiny checkpoints for tests/test_vllm.py: a random LLaVA-NeXT on the toy's vocabulary, saved with
``save_pretrained`` (weights, config, tokenizer, processor) so that vLLM and transformers load the same files."""

from __future__ import annotations

from pathlib import Path

import torch

from prunekit.testing import _spread_weights
from prunekit.toy.model import build_tokenizer
from prunekit.toy.task import VOCAB

NEXT_IMAGE_SIZE, NEXT_PATCH = 24, 4  # a 6 x 6 grid per tile
NEXT_PINPOINTS = [[24, 24], [24, 48], [48, 24], [48, 48]]


def save_tiny_llava_next(folder: Path, seed: int = 0) -> Path:
    """A random-weight LLaVA-NeXT (CLIP tower of 2 layers, Llama decoder of 4 with head_dim 32, the smallest
    vLLM's CPU attention runs) with the toy's tokenizer, saved
    to ``folder`` with its processor; returns ``folder``."""
    import transformers as tf

    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=NEXT_IMAGE_SIZE, patch_size=NEXT_PATCH, projection_dim=32)
    text = tf.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(VOCAB), max_position_embeddings=1024, pad_token_id=0,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=VOCAB.index("<image>"),
                                image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_layer=-2,
                                vision_feature_select_strategy="default", tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = tf.LlavaNextForConditionalGeneration(config).eval()
    _spread_weights(model, seed)  # logits that separate the answers, not a near-uniform random init
    with torch.no_grad():
        model.model.image_newline.normal_(generator=torch.Generator().manual_seed(seed))
        model.lm_head.weight.mul_(4.0)  # wide margins between answers: float32 kernel noise flips no argmax
    image_processor = tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": NEXT_IMAGE_SIZE}, crop_size={"height": NEXT_IMAGE_SIZE, "width": NEXT_IMAGE_SIZE},
        image_grid_pinpoints=NEXT_PINPOINTS)
    processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                                      patch_size=NEXT_PATCH, vision_feature_select_strategy="default",
                                      image_token="<image>", num_additional_image_tokens=1)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def next_images(questions: list) -> list:
    """The toy's images at three aspect ratios (square, wide, tall), so LLaVA-NeXT picks different tile grids."""
    sizes = [(64, 64), (64, 36), (36, 64)]
    return [q.image.resize(sizes[i % 3]) for i, q in enumerate(questions)]
