"""Shared fixtures: tiny random-weight LLaVA models built from config classes (no download)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from transformers.utils import logging as hf_logging

from prunekit.testing import LlavaShape, llava_inputs, tiny_llava

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# Property tests draw the same examples on every run (a CI run is reproducible; no deadline on a shared CPU).
# HYPOTHESIS_PROFILE=explore draws fresh ones each run, to look for new counterexamples.
settings.register_profile("fixed", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

SHAPE = LlavaShape()  # 16 decoder layers, 36 visual tokens per image


@pytest.fixture(scope="session")
def shape() -> LlavaShape:
    return SHAPE


@pytest.fixture(scope="session")
def llava64():
    """float64 tiny LLaVA (sdpa) for numeric comparisons."""
    return tiny_llava(SHAPE, seed=0, dtype=torch.float64)


@pytest.fixture(scope="session")
def llava32():
    return tiny_llava(SHAPE, seed=1, dtype=torch.float32)


@pytest.fixture()
def single_inputs64():
    return llava_inputs(SHAPE, batch=1, seed=3, dtype=torch.float64)


def unpad(inputs: dict, row: int) -> dict:
    """One sample of a left-padded batch, without its padding."""
    mask = inputs["attention_mask"][row].bool()
    return {
        "input_ids": inputs["input_ids"][row][mask][None],
        "attention_mask": inputs["attention_mask"][row][mask][None],
        "pixel_values": inputs["pixel_values"][row:row + 1],
    }


# LLaVA-1.5's depth (32 layers) and visual tokens (576), narrow: every built-in recipe runs as published.
SHAPE576 = LlavaShape(num_layers=32, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=4,
                      image_size=48, patch_size=2, vision_hidden=16, vision_layers=3)


@pytest.fixture(scope="session")
def llava576():
    return tiny_llava(SHAPE576, seed=5, dtype=torch.float64)


@pytest.fixture(scope="session")
def llava576_eager():
    """The same weights with eager attention (for output_attentions references)."""
    return tiny_llava(SHAPE576, seed=5, dtype=torch.float64, attn_implementation="eager")


@pytest.fixture(scope="session")
def toy_weights(tmp_path_factory) -> Path:
    """The shipped toy model, or (before it is trained) random weights of the same architecture."""
    from prunekit.toy.model import WEIGHTS_DIR, build_config, build_processor

    if (WEIGHTS_DIR / "model.safetensors").is_file():
        return WEIGHTS_DIR
    from transformers import LlavaForConditionalGeneration

    folder = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(build_config()).save_pretrained(folder)
    build_processor().save_pretrained(folder)
    return folder
