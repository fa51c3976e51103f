"""What ordinary and hostile users do to the engine: train through it, pass labels, call it from threads.

- Gradients: a backward through a pruned forward gives every parameter the bare model's gradient
  when the recipe keeps everything (scoring stays out of the graph, the kept tokens stay in it), and
  a pruned training step changes the parameters before the first prune too.
- ``labels=``: labels of dropped positions are dropped with them; the loss equals the bare model's
  when everything is kept; ``PruneReport.output_positions`` maps each output row to its origin.
- Threads: many threads calling one pruned model each get the answer of a lone call.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPE

import prunekit
from prunekit.errors import PrunekitError
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


# ---- labels (issue point 1, second half) ----

def _labels(inputs, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(3, SHAPE.vocab_size - 1, inputs["input_ids"].shape, generator=g)
    labels[inputs["input_ids"] == SHAPE.image_token_id] = -100
    return labels.masked_fill(inputs["attention_mask"] == 0, -100)


@pytest.mark.parametrize("recipe", sorted(KEEP_ALL))
def test_keep_all_loss_and_its_gradients_equal_the_bare_model(llava64, recipe):
    inputs = llava_inputs(SHAPE, batch=3, seed=9, dtype=torch.float64)
    labels = _labels(inputs)
    bare_loss, bare = _gradients(llava64, inputs, labels=labels)
    loss, pruned = _gradients(llava64, inputs, recipe, KEEP_ALL[recipe], labels=labels)
    torch.testing.assert_close(loss, bare_loss, rtol=0, atol=1e-12)
    _assert_same_gradients(bare, pruned)


def _expected_loss(logits, labels, positions):
    gathered = labels.gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), gathered[:, 1:].flatten(), ignore_index=-100)


@pytest.mark.parametrize("recipe, overrides", [("fastv", None), ("transprune-high", None), VISION])
def test_labels_of_dropped_positions_are_dropped_with_them(llava64, recipe, overrides):
    inputs = llava_inputs(SHAPE, batch=3, seed=10, dtype=torch.float64)
    labels = _labels(inputs, seed=1)
    with prunekit.apply(llava64, recipe, overrides) as pruner, torch.no_grad():
        out = llava64(**inputs, labels=labels)
        report = pruner.last_report
    positions = report.output_positions  # [batch, seq_out]
    assert positions.shape == out.logits.shape[:2]
    assert positions.shape[1] < inputs["input_ids"].shape[1]
    torch.testing.assert_close(out.loss, _expected_loss(out.logits, labels, positions), rtol=0, atol=1e-12)
    ids = inputs["input_ids"]
    for row in range(ids.shape[0]):
        real = positions[row][positions[row] >= 0]
        assert torch.equal(real, real.sort().values)  # in order
        text = (ids[row] != SHAPE.image_token_id) & (inputs["attention_mask"][row] == 1)
        assert set(text.nonzero().flatten().tolist()) <= set(real.tolist())  # every text token kept
        visual = real[ids[row, real] == SHAPE.image_token_id]
        kept = report.stages[-1].kept[row]
        if report.stages[-1].where == "decoder":
            assert torch.equal(visual, kept[kept >= 0])


def test_output_positions_without_pruning_are_the_columns(llava64):
    inputs = llava_inputs(SHAPE, batch=2, seed=12, dtype=torch.float64)
    with prunekit.apply(llava64, "fastv", KEEP_ALL["fastv"]) as pruner, torch.no_grad():
        llava64(**inputs)
    width = inputs["input_ids"].shape[1]
    assert torch.equal(pruner.last_report.output_positions, torch.arange(width).expand(2, width))


def test_labels_that_do_not_fit_the_prompt_are_a_clear_error(llava64):
    inputs = llava_inputs(SHAPE, batch=1, seed=13, dtype=torch.float64)
    with prunekit.apply(llava64, "fastv"), torch.no_grad():
        with pytest.raises(PrunekitError, match=r"labels has shape \(1, 5\)"):
            llava64(**inputs, labels=torch.zeros(1, 5, dtype=torch.long))


# ---- threads (issue point 2) ----

def _call(model, inputs, pruner):
    with torch.no_grad():
        logits = model(**inputs).logits
        report = pruner.last_report
        ids = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return logits, [s.kept for s in report.stages], ids


DECODE_STEPS = ({"name": "decode-steps", "positions": "original", "criteria": {"n": {"type": "l2_norm"}},
                 "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 0.75},
                                                           {"layer": 3, "keep": 0.4, "cut_earlier": True}]},
                 "decode": {"layer": 5, "prune": 0.7, "similar": 0.99}}, None)  # per-step state in decode


@pytest.mark.parametrize("recipe", ["transprune-high", "fastv", VISION, DECODE_STEPS],
                         ids=["transprune-high", "fastv", "vision", "decode-steps"])
def test_threads_calling_one_pruned_model_each_get_the_lone_answer(llava32, recipe):
    recipe, overrides = recipe if isinstance(recipe, tuple) else (recipe, None)
    n_threads, calls = 8, 20
    prompts = [llava_inputs(SHAPE, batch=1 + t % 2, seed=100 + t) for t in range(n_threads)]
    with prunekit.apply(llava32, recipe, overrides) as pruner:
        alone = [_call(llava32, p, pruner) for p in prompts]
        failures: list[str] = []
        start = threading.Barrier(n_threads)

        def worker(t: int) -> None:
            start.wait()
            for i in range(calls):
                try:
                    logits, kept, ids = _call(llava32, prompts[t], pruner)
                except Exception as error:  # noqa: BLE001 - every failure is reported
                    failures.append(f"thread {t} call {i}: {type(error).__name__}: {error}")
                    continue
                want_logits, want_kept, want_ids = alone[t]
                if not (torch.equal(logits, want_logits) and torch.equal(ids, want_ids)
                        and all(torch.equal(a, b) for a, b in zip(kept, want_kept))):
                    failures.append(f"thread {t} call {i}: a different answer")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, f"{len(failures)} of {n_threads * calls} calls went wrong: {failures[:3]}"


def test_last_report_seen_from_another_thread_is_the_last_one(llava32):
    inputs = llava_inputs(SHAPE, batch=1, seed=21)
    with prunekit.apply(llava32, "fastv") as pruner:
        thread = threading.Thread(target=lambda: llava32(**inputs))
        with torch.no_grad():
            thread.start()
            thread.join()
        assert pruner.last_report is not None
        assert pruner.last_report.stages[0].kept.shape == (1, SHAPE.visual_tokens // 2)



# ---- use_cache=False (issue point 6) ----

def test_use_cache_false_warns_once_and_is_documented(llava32):
    inputs = llava_inputs(SHAPE, batch=1, seed=30)
    with prunekit.apply(llava32, "fastv"), torch.no_grad():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            llava32.generate(**inputs, max_new_tokens=3, do_sample=False)  # cached: no warning
            assert not [w for w in caught if "use_cache=False" in str(w.message)]
            llava32.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
            llava32.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
    ours = [w for w in caught if "use_cache=False" in str(w.message)]
    assert len(ours) == 1 and "pruned afresh" in str(ours[0].message)
    assert "docs/concepts.md" in str(ours[0].message)
    concepts = (Path(__file__).resolve().parents[1] / "docs" / "concepts.md").read_text()
    assert "## Without a KV cache (`use_cache=False`)" in concepts


# ---- adjacent images (issue point 4) ----

def _two_images(separated: bool) -> dict:
    """One sample with two images, ``<image><image>`` or ``<image> 9 <image>``: the same pixels either way."""
    inputs = llava_inputs(SHAPE, prefix=[[5, 6]], question=[[7, 8, 9]], images=2, seed=4)
    if not separated:
        return inputs
    ids = inputs["input_ids"][0].tolist()
    cut = ids.index(SHAPE.image_token_id) + SHAPE.visual_tokens
    ids = ids[:cut] + [9] + ids[cut:]
    return {**inputs, "input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}


@pytest.mark.parametrize("count", [10, 20])
def test_adjacent_images_are_two_images_to_the_vision_stage(llava64, count):
    """Each image of ``<image><image>`` keeps the patches it keeps when a token separates the two."""
    recipe, overrides = "visionzip-64", [f"vision.count={count}"]
    reports = {}
    for separated in (False, True):
        inputs = _two_images(separated)
        with prunekit.apply(llava64, recipe, overrides) as pruner:
            out = llava64.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        report = pruner.last_report
        first = inputs["input_ids"][0].tolist().index(SHAPE.image_token_id)
        second = first + SHAPE.visual_tokens + int(separated)
        kept = report.stages[0].kept[0].tolist()
        per_image = [sorted(p - first for p in kept if p < second), sorted(p - second for p in kept if p >= second)]
        reports[separated] = (per_image, report.stages[0].merged_counts.tolist())
        assert [len(p) for p in per_image] == [count, count]
        assert all(0 <= p < SHAPE.visual_tokens for image in per_image for p in image)
        origin = [p for p in report.output_positions[0].tolist() if p >= 0]  # output rows -> prompt columns
        assert origin == sorted(origin) and set(kept) <= set(origin)
    assert reports[False][0] == reports[True][0]  # the same patches of each image
    assert reports[False][1] == reports[True][1]  # merged tokens: the same per image, two images' worth


# ---- vision stages under beam search and several returned sequences (issue point 5) ----

@pytest.mark.parametrize("generate_kwargs", [{"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2},
                                             {"do_sample": True, "num_return_sequences": 2}],
                         ids=["beams", "beams-and-returns", "sampled-returns"])
def test_each_copy_of_a_sample_sees_its_own_shortened_images(llava64, generate_kwargs):
    """generate repeats each sample's pre-encoded images for its beams or returned sequences: every copy's
    first-step logits equal that sample's pruned prefill, computed alone in one plain forward."""
    recipe, overrides = VISION
    inputs = llava_inputs(SHAPE, seed=11, batch=2)
    with prunekit.apply(llava64, recipe, overrides) as pruner:
        with torch.no_grad():
            alone = llava64(**inputs).logits[:, -1]  # [2, vocab]
        kept_alone = pruner.last_report.stages[0].kept
        torch.manual_seed(0)
        out = llava64.generate(**inputs, max_new_tokens=3, output_logits=True, return_dict_in_generate=True,
                               **generate_kwargs)
        kept_copies = pruner.last_report.stages[0].kept
    copies = out.logits[0].shape[0] // 2
    assert copies > 1 and out.sequences.shape[0] == 2 * generate_kwargs.get("num_return_sequences", 1)
    torch.testing.assert_close(out.logits[0].to(alone.dtype), alone.repeat_interleave(copies, dim=0), rtol=1e-4,
                               atol=1e-4)
    assert torch.equal(kept_copies, kept_alone.repeat_interleave(copies, dim=0))


def test_changing_the_attention_implementation_while_pruning_is_named(llava32):
    inputs = llava_inputs(SHAPE, seed=2)
    with prunekit.apply(llava32, "transprune-high", ["reference_depth=16"]):
        llava32.set_attn_implementation("eager")
        try:
            with pytest.raises(PrunekitError, match=r"attention implementation is 'eager', not prunekit's tap: it was "
                                                    r"changed \(set_attn_implementation\) while prunekit.apply"):
                llava32(**inputs)
        finally:
            llava32.set_attn_implementation("sdpa")
    assert llava32.config._attn_implementation == "sdpa"


def test_a_vision_stage_that_keeps_no_patch_by_score_reports_merged_tokens_only(llava32):
    """``count: 0`` with a merger: every image token is a merged one (-1 in output_positions)."""
    recipe = {"name": "pooled-only", "vision": {"criteria": {"none": {"type": "uniform"}}, "count": 0,
                                                "merge": {"type": "grid_pool", "size": 3}}}
    inputs = llava_inputs(SHAPE, seed=5, batch=2)
    with prunekit.apply(llava32, recipe) as pruner:
        out = llava32.generate(**inputs, max_new_tokens=2, do_sample=False)
    stage = pruner.last_report.stages[0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2  # generate returns the prompt as given
    assert stage.kept_counts.tolist() == [0, 0] and stage.merged_counts.tolist() == [9, 9]
    for row in range(2):
        positions = pruner.last_report.output_positions[row]
        text = inputs["input_ids"].shape[1] - SHAPE.visual_tokens  # text and padding columns keep their origin
        assert (positions == -1).sum().item() == 9 and (positions >= 0).sum().item() == text
