"""Shared fixtures: tiny random-weight LLaVA models built from config classes (no download)."""

from __future__ import annotations

import pytest
import torch
from transformers.utils import logging as hf_logging

from prunekit.testing import LlavaShape, llava_inputs, tiny_llava

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

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
