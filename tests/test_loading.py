"""A checkpoint that lacks weights is an error, not a randomly initialised model that answers at chance."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file, save_file

from prunekit.errors import PrunekitError
from prunekit.toy.model import WEIGHTS_DIR, load_toy


def _copy_without(tmp_path, prefix: str):
    folder = tmp_path / "toy"
    shutil.copytree(WEIGHTS_DIR, folder)
    weights = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    assert len(kept) < len(weights)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, len(weights) - len(kept)


def test_the_toy_loads_strictly_and_names_the_missing_weights(tmp_path):
    model, _ = load_toy()  # the shipped checkpoint is complete
    folder, dropped = _copy_without(tmp_path, "vision_tower.")
    with pytest.raises(PrunekitError, match=rf"does not fit LlavaForConditionalGeneration: {dropped} weight\(s\) "
                                            r"missing \(model\.vision_tower\."):
        load_toy(folder)


def test_run_model_refuses_a_checkpoint_with_missing_weights(tmp_path):
    from prunekit.run import run_model

    folder, _ = _copy_without(tmp_path, "multi_modal_projector.")
    with pytest.raises(PrunekitError, match=r"weight\(s\) missing \(model\.multi_modal_projector\."):
        run_model(str(folder), "unused.png", "what color is the circle ?", "fastv")
