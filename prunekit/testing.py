"""Tiny random-weight models of real architectures, for tests, examples and benchmarks (no download).

Each builder makes a config from the transformers config classes, saves random weights with
``save_pretrained`` and loads them back through the real ``from_pretrained`` path.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.utils import logging as hf_logging


@dataclass(frozen=True)
class LlavaShape:
    """Sizes of a LLaVA-1.5-style model: CLIP tower, MLP projector, Llama decoder."""

    num_layers: int = 16
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    vocab_size: int = 256
    image_size: int = 24
    patch_size: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2

    @property
    def visual_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_token_id(self) -> int:
        return self.vocab_size - 1


# LLaVA-1.5-7B's decoder depth and visual tokens (336 px / 14 px patches = 576), narrow enough for a CPU.
LLAVA15_SHAPED = LlavaShape(
    num_layers=32, hidden_size=256, intermediate_size=688, num_heads=8, num_kv_heads=8, vocab_size=1024,
    image_size=336, patch_size=14, vision_hidden=64, vision_layers=2,
)


def llava_config(shape: LlavaShape = LlavaShape()) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=2 * shape.vision_hidden,
        num_hidden_layers=shape.vision_layers, num_attention_heads=4, image_size=shape.image_size,
        patch_size=shape.patch_size, projection_dim=shape.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, vocab_size=shape.vocab_size, max_position_embeddings=4096,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=shape.image_token_id,
        image_seq_length=shape.visual_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )


def tiny_llava(
    shape: LlavaShape = LlavaShape(),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    directory: str | Path | None = None,
) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA of ``shape``, saved and reloaded with ``from_pretrained``."""
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(shape))
    _spread_weights(model, seed)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(directory) if directory is not None else Path(tmp)
            model.save_pretrained(path)
            loaded = LlavaForConditionalGeneration.from_pretrained(
                path, dtype=dtype, attn_implementation=attn_implementation
            )
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return loaded.eval()


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Re-draw weights with a larger scale than the default init, so scores and answers vary."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                fan_in = param.shape[1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)


def llava_inputs(
    shape: LlavaShape = LlavaShape(),
    prefix: list[list[int]] | None = None,
    question: list[list[int]] | None = None,
    images: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    batch: int = 1,
) -> dict[str, Tensor]:
    """Left-padded LLaVA inputs: ``prefix + <image> * n + question`` per sample.

    Samples get different random prompt lengths unless ``prefix``/``question`` are given.
    """
    generator = torch.Generator().manual_seed(seed)
    n_samples = len(prefix) if prefix is not None else batch

    def random_tokens(low: int, high: int) -> list[int]:
        length = int(torch.randint(low, high + 1, (1,), generator=generator))
        return torch.randint(3, shape.vocab_size - 1, (length,), generator=generator).tolist()

    prefix = prefix or [random_tokens(3, 6) for _ in range(n_samples)]
    question = question or [random_tokens(4, 9) for _ in range(n_samples)]
    rows = [[1, *p, *([shape.image_token_id] * shape.visual_tokens * images), *q] for p, q in zip(prefix, question)]
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    pixel_values = torch.randn(len(rows) * images, 3, shape.image_size, shape.image_size, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values.to(dtype)}
