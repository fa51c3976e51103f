"""What ordinary and hostile users do to the engine: train through it, pass labels, call it from threads.

- Gradients: a backward through a pruned forward gives every parameter the bare model's gradient
  when the recipe keeps everything (scoring stays out of the graph, the kept tokens stay in it), and
  a pruned training step changes the parameters before the first prune too.
- ``labels=``: labels of dropped positions are dropped with them; the loss equals the bare model's
  when everything is kept; ``PruneReport.output_positions`` maps each output row to its origin.
- Threads: many threads calling one pruned model each get the answer of a lone call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prunekit
from conftest import SHAPE
from prunekit.testing import llava_inputs, tiny_llava

KEEP_ALL = {
    "fastv": ["schedule.stages.0.keep=1.0"],
    "transprune-high": [f"schedule.stages.{i}.keep=1.0" for i in range(3)],
}
VISION = ("visionzip-64", ["vision.count=20"])  # a vision stage that really shortens the tiny model's 36 tokens


def _gradients(model, inputs, recipe=None, overrides=None, labels=None):
    model.zero_grad(set_to_none=True)
    extra = {} if labels is None else {"labels": labels}
    if recipe is None:
        out = model(**inputs, **extra)
    else:
        with prunekit.apply(model, recipe, overrides):
            out = model(**inputs, **extra)
    objective = out.loss if labels is not None else (out.logits.pow(2).mean() + out.logits[:, -1].sum())
    objective.backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return objective.detach(), grads


def _assert_same_gradients(bare: dict, pruned: dict) -> None:
    missing = [n for n, g in bare.items() if g is not None and pruned[n] is None]
    assert not missing, f"{len(missing)} parameters lost their gradient, e.g. {missing[:4]}"
    for name, g in bare.items():
        if g is not None:
            torch.testing.assert_close(pruned[name], g, rtol=0, atol=1e-6, msg=name)


# ---- gradients (issue point 1) ----

@pytest.mark.parametrize("recipe", sorted(KEEP_ALL))
def test_keep_all_gradients_equal_the_bare_model_on_every_parameter(llava64, recipe):
    inputs = llava_inputs(SHAPE, batch=2, seed=3, dtype=torch.float64)
    _, bare = _gradients(llava64, inputs)
    _, pruned = _gradients(llava64, inputs, recipe, KEEP_ALL[recipe])
    for part in ("vision_tower", "multi_modal_projector", "embed_tokens", "layers.0.", "lm_head"):
        assert any(part in n and g is not None for n, g in bare.items()), part
    _assert_same_gradients(bare, pruned)


def test_keep_all_vision_stage_gradients_equal_the_bare_model(llava64):
    inputs = llava_inputs(SHAPE, batch=2, seed=4, dtype=torch.float64)
    _, bare = _gradients(llava64, inputs)
    recipe = {"name": "vision-keep-all", "vision": {"criteria": {"d": {"type": "visionzip"}}, "keep": 1.0},
              "criteria": {"fastv": {"type": "fastv_attention"}},
              "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 1.0}]}}
    _, pruned = _gradients(llava64, inputs, recipe)
    _assert_same_gradients(bare, pruned)


@pytest.mark.parametrize("recipe, overrides", [("fastv", None), ("transprune-high", None), VISION])
def test_a_pruned_training_step_changes_every_part_of_the_model(recipe, overrides):
    model = tiny_llava(SHAPE, seed=2).train()
    inputs = llava_inputs(SHAPE, batch=2, seed=6)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with prunekit.apply(model, recipe, overrides) as pruner:
        out = model(**inputs)
        assert pruner.last_report.stages[-1].kept_counts.max() < SHAPE.visual_tokens  # a real prune
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), out.logits[:, 1:].argmax(-1).flatten())
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():  # the vision tower's last layer and norm are unused (feature layer -2)
        assert (p.grad is not None and torch.isfinite(p.grad).all()) or "vision_tower" in name, name
    for part in ("vision_tower.embeddings", "multi_modal_projector", "embed_tokens", "layers.0.", "layers.15.",
                 "lm_head"):
        changed = [n for n, p in model.named_parameters() if part in n and not torch.equal(p, before[n])]
        assert changed, f"no parameter of {part} changed"
