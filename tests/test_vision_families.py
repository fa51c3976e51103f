"""A recipe's stage before the language model on families that have none: a clear error, nothing left behind."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.errors import AdapterError
from prunekit.testing import family_inputs, tiny_family_model

VISION_RANDOM = {"name": "vision-random", "vision": {"criteria": {"r": {"type": "random"}}, "keep": 0.5}}


@pytest.mark.parametrize("family", ["llava_next", "qwen2_5_vl", "gemma3", "llava_onevision", "internvl"])
def test_a_vision_stage_on_a_family_without_one_says_why_and_what_runs_instead(family):
    model = tiny_family_model(family, num_layers=4)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with pytest.raises(AdapterError, match=rf"{type(model).__name__} \(adapter '\w+'\) has no stage before the "
                                           r"language model.*a stage at layer 0 \(divprune"):
        prunekit.apply(model, VISION_RANDOM)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    with prunekit.apply(model, "divprune") as pruner, torch.no_grad():  # the alternative the message names runs
        model.generate(**family_inputs(model, family, seed=2), max_new_tokens=2, do_sample=False)
    assert int(pruner.last_report.stages[0].kept_counts[0]) < int(pruner.last_report.visual_tokens[0])
