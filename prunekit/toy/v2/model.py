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
)

from prunekit.toy import model as toy_v1_model
from prunekit.toy.v2.task import GRID, IMAGE_SIZE, PATCH, VOCAB

WEIGHTS_DIR = Path(__file__).parent / "weights"  # package data: config, safetensors, tokenizer, processor
NUM_LAYERS = 16  # deep enough for TransPrune's layers 7, 9, 12


def build_processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    tokenizer = toy_v1_model.build_tokenizer(VOCAB)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def build_config() -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=96)
    text = LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=NUM_LAYERS, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=24, vocab_size=len(VOCAB), max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB.index("<image>"),
                       image_seq_length=GRID * GRID, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", tie_word_embeddings=False)


def load_toy(path: str | Path | None = None, dtype=None) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The trained LLaVA-layout toy and its processor (``prunekit/toy/v2/weights`` by default, offline)."""
    folder = WEIGHTS_DIR if path is None else Path(path)
    if not (folder / "model.safetensors").is_file():
        from prunekit.errors import PrunekitError

        raise PrunekitError(f"no trained toy model in {folder}; train it with "
                            f"`python -m prunekit.toy.v2.train --out {folder}`")
    return toy_v1_model.load_toy(folder, dtype)
