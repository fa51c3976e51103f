"""The toy model's config, tokenizer and processor, and where its trained weights live."""

from __future__ import annotations

from pathlib import Path

from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from prunekit.toy.task import GRID, IMAGE_SIZE, PATCH, VOCAB

WEIGHTS_DIR = Path(__file__).parent / "weights"  # package data: config, safetensors, tokenizer, processor
NUM_LAYERS = 16  # deep enough for TransPrune's layers 7, 9, 12


def build_tokenizer(vocab: list[str] = VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's vocabulary (``<image>`` splits out without spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"])
    tokenizer.padding_side = "left"
    return tokenizer


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def build_config() -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=96)
    text = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(VOCAB), max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB.index("<image>"),
                       image_seq_length=GRID * GRID, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def load_toy(path: str | Path | None = None, dtype=None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained toy model and its processor (from the package, offline)."""
    import torch

    from prunekit.errors import PrunekitError
    from prunekit.loading import load_pretrained

    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "model.safetensors").is_file():
        raise PrunekitError(f"no trained toy model in {folder}; train it with `python -m prunekit.toy.train`")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 3.6 M-parameter load needs none, and ``--json`` output stays clean
    try:
        model = load_pretrained(LlavaForConditionalGeneration, folder, dtype=dtype or torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), LlavaProcessor.from_pretrained(folder)
