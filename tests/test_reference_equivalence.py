"""Hooks against the slow hand-written reference (tests/reference.py), in float64."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.compat import cache_of, with_cache
from reference import RefModel, greedy_reference, run_reference

TRANSPRUNE_STAGES = [(7, 0.875), (9, 0.625), (12, 0.125)]
FASTV_STAGES = [(2, 0.5)]


def _prefill(model, inputs, recipe, overrides=None):
    with prunekit.apply(model, recipe, overrides) as pruner, torch.no_grad():
        logits = model(**inputs).logits[0]
    return logits, pruner.last_report


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_transprune_prefill_matches_reference(llava64, single_inputs64, positions):
    logits, report = _prefill(llava64, single_inputs64, "transprune-high", [f"positions={positions}"])
    ref = run_reference(RefModel(llava64), single_inputs64["input_ids"][0], single_inputs64["pixel_values"],
                        TRANSPRUNE_STAGES, "transprune", positions)
    for stage, kept in zip(report, ref.kept):
        assert torch.equal(stage.kept[0], kept), f"stage before layer {stage.layer} kept other tokens"
    assert logits.shape == ref.logits.shape
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-8)


def test_fastv_prefill_matches_reference(llava64, single_inputs64):
    logits, report = _prefill(llava64, single_inputs64, "fastv")
    ref = run_reference(RefModel(llava64), single_inputs64["input_ids"][0], single_inputs64["pixel_values"],
                        FASTV_STAGES, "fastv", "original")
    assert report[0].layer == 2
    assert torch.equal(report[0].kept[0], ref.kept[0])
    assert report[0].kept.shape[1] == int(36 * 0.5)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-8)


@pytest.mark.parametrize("recipe,stages,positions", [
    ("transprune-high", TRANSPRUNE_STAGES, "compact"),
    ("transprune-high", TRANSPRUNE_STAGES, "original"),
    ("fastv", FASTV_STAGES, "original"),
])
def test_greedy_generation_with_cache_matches_reference(llava64, single_inputs64, recipe, stages, positions):
    steps = 6
    with prunekit.apply(llava64, recipe, [f"positions={positions}"]) as pruner, torch.no_grad():
        out = llava64.generate(**single_inputs64, max_new_tokens=steps, do_sample=False)
        # the same decode by hand, to read float64 logits (generate casts them to float32)
        step_logits = []
        result = llava64(**single_inputs64, use_cache=True)
        mask = single_inputs64["attention_mask"]
        for _ in range(steps):
            step_logits.append(result.logits[0, -1])
            next_id = result.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            result = llava64(input_ids=next_id, attention_mask=mask, **with_cache(llava64, cache_of(result)),
                             use_cache=True)
    generated = out[0, single_inputs64["input_ids"].shape[1]:]
    kept = [stage.kept[0] for stage in pruner.last_report]
    expected, expected_logits = greedy_reference(RefModel(llava64), single_inputs64["input_ids"][0],
                                                 single_inputs64["pixel_values"], stages, kept, positions, steps)
    assert generated.tolist() == expected.tolist()
    # every decode step (KV cache of pruned layers, shifted positions) agrees with the cache-free reference
    torch.testing.assert_close(torch.stack(step_logits), expected_logits, rtol=0, atol=1e-8)


def test_reference_reproduces_the_bare_model(llava64, single_inputs64):
    """The reference itself is right: with no stage it gives the unhooked model's logits."""
    with torch.no_grad():
        bare = llava64(**single_inputs64).logits[0]
    ref = run_reference(RefModel(llava64), single_inputs64["input_ids"][0], single_inputs64["pixel_values"],
                        [], "given", given_kept=[])
    torch.testing.assert_close(ref.logits, bare, rtol=0, atol=1e-10)


@pytest.mark.parametrize("policies", [["compact", "original", "compact"], ["original", "compact", "original"]])
def test_a_stage_of_its_own_position_policy_matches_the_reference_in_prefill_and_cached_decode(
        llava64, single_inputs64, policies):
    """``positions`` on a stage overrides the recipe's there: the reference re-indexes after the compact stages
    only, and the decoded tokens continue where the last compact stage (or none) left the prompt."""
    overrides = [f"schedule.stages.{i}.positions={policy}" for i, policy in enumerate(policies)]
    steps = 5
    with prunekit.apply(llava64, "transprune-high", overrides) as pruner, torch.no_grad():
        logits = llava64(**single_inputs64).logits[0]
        out = llava64.generate(**single_inputs64, max_new_tokens=steps, do_sample=False,
                               return_dict_in_generate=True, output_logits=True)
    ref_model = RefModel(llava64)
    ref = run_reference(ref_model, single_inputs64["input_ids"][0], single_inputs64["pixel_values"],
                        TRANSPRUNE_STAGES, "transprune", policies)
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-8)
    kept = [stage.kept[0] for stage in pruner.last_report]
    expected, expected_logits = greedy_reference(ref_model, single_inputs64["input_ids"][0],
                                                 single_inputs64["pixel_values"], TRANSPRUNE_STAGES, kept, policies,
                                                 steps)
    generated = out.sequences[0, single_inputs64["input_ids"].shape[1]:]
    assert generated.tolist() == expected.tolist()
    torch.testing.assert_close(torch.stack([s[0] for s in out.logits]), expected_logits.float(), rtol=0, atol=1e-5)
    mixed = run_reference(ref_model, single_inputs64["input_ids"][0], single_inputs64["pixel_values"],
                          TRANSPRUNE_STAGES, "transprune", "compact")
    assert not torch.allclose(mixed.logits, ref.logits)  # the policies change the result


def test_a_stage_position_policy_outside_the_two_is_named():
    with pytest.raises(prunekit.RecipeError, match=r"stages\.1\.positions must be 'compact' or 'original'.*'kept'"):
        prunekit.load_recipe("transprune-high", ["schedule.stages.1.positions=kept"])
