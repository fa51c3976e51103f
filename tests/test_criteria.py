"""Criterion scores against references computed another way (transformers' eager attention weights,
per-token loops), plus the combiner and normalisations."""

from __future__ import annotations

import pytest
import torch

from conftest import SHAPE
from criteria_helpers import capture_scores
from prunekit.normalize import NORMALIZATIONS
from prunekit.testing import llava_inputs, tiny_llava
from prunekit.criteria.ttv import transition_variation


def test_iga_equals_the_eager_attention_weights_of_the_prune_layer():
    """IGA from the sdpa model's tap == mean over instruction rows of eager output_attentions."""
    sdpa = tiny_llava(SHAPE, seed=0, dtype=torch.float64)
    eager = tiny_llava(SHAPE, seed=0, dtype=torch.float64, attn_implementation="eager")
    inputs = llava_inputs(SHAPE, batch=1, seed=4, dtype=torch.float64)
    scores = capture_scores(sdpa, "transprune-high", inputs)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions  # per layer [1, heads, seq, seq]
    ids = inputs["input_ids"][0]
    visual = ids == SHAPE.image_token_id
    last_visual = int(visual.nonzero()[-1])
    probs = attentions[7][0].mean(0)  # layer 7 (the first prune) sees the unpruned prompt
    expected = probs[last_visual + 1:].mean(0)  # instruction rows: after the image to the end
    got = scores[0]["iga"][0]
    torch.testing.assert_close(got[visual], expected[visual], rtol=0, atol=1e-6)  # eager softmax is float32


def test_fastv_score_is_the_last_row_of_layer_one_attention():
    sdpa = tiny_llava(SHAPE, seed=2, dtype=torch.float64)
    eager = tiny_llava(SHAPE, seed=2, dtype=torch.float64, attn_implementation="eager")
    inputs = llava_inputs(SHAPE, batch=1, seed=1, dtype=torch.float64)
    scores = capture_scores(sdpa, "fastv", inputs)
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    visual = inputs["input_ids"][0] == SHAPE.image_token_id
    expected = attentions[1][0].mean(0)[-1]
    torch.testing.assert_close(scores[0]["fastv"][0][visual], expected[visual], rtol=0, atol=1e-6)


def _ttv_loop(inp: torch.Tensor, out: torch.Tensor, abs_cos: bool) -> torch.Tensor:
    """TTV written token by token: ratio of norms times a softmax over the sequence of 1 - cos."""
    seq = inp.shape[0]
    change = []
    ratio = []
    for i in range(seq):
        a, b = inp[i].tolist(), out[i].tolist()
        dot = sum(x * y for x, y in zip(a, b))
        na = sum(x * x for x in a) ** 0.5
        nb = sum(y * y for y in b) ** 0.5
        cos = dot / (na * nb)
        change.append(1 - (abs(cos) if abs_cos else cos))
        ratio.append(nb / na)
    exp = [2.718281828459045 ** c for c in change]
    total = sum(exp)
    return torch.tensor([r * e / total for r, e in zip(ratio, exp)], dtype=torch.float64)


@pytest.mark.parametrize("direction", ["one_minus_cos", "one_minus_abs_cos"])
def test_transition_variation_matches_a_token_loop(direction):
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(1, 9, 6, generator=g, dtype=torch.float64)
    out = torch.randn(1, 9, 6, generator=g, dtype=torch.float64)
    valid = torch.ones(1, 9, dtype=torch.bool)
    got = transition_variation(inp, out, valid, direction)
    torch.testing.assert_close(got[0], _ttv_loop(inp[0], out[0], direction == "one_minus_abs_cos"))


def test_transition_variation_ignores_padding():
    g = torch.Generator().manual_seed(1)
    inp = torch.randn(1, 7, 4, generator=g, dtype=torch.float64)
    out = torch.randn(1, 7, 4, generator=g, dtype=torch.float64)
    valid = torch.tensor([[False, False, True, True, True, True, True]])
    padded = transition_variation(inp, out, valid)
    alone = transition_variation(inp[:, 2:], out[:, 2:], torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(padded[:, 2:], alone)
    assert torch.all(padded[:, :2] == 0)


def test_accumulated_ttv_sums_layers_6_to_l_minus_1(llava64):
    """The score at each stage is the sum of per-layer TTV over layers 6..L-1 of the kept tokens."""
    inputs = llava_inputs(SHAPE, batch=1, seed=4, dtype=torch.float64)
    single = {"name": "per-layer", "criteria": {"t": {"type": "ttv"}},
              "schedule": {"type": "stages", "stages": [{"layer": 7, "keep": 1.0}]}}
    per_layer = capture_scores(llava64, single, inputs)[0]["t"]  # TTV of layer 6 alone
    acc = capture_scores(llava64, "transprune-high", inputs)
    torch.testing.assert_close(acc[0]["ttv"], per_layer)  # before layer 7 only layer 6 has accumulated


def test_weighted_sum_normalises_each_criterion_to_sum_one_over_visual_tokens():
    from prunekit.criteria.combiners import WeightedSum

    visual = torch.tensor([[False, True, True, True, False]])
    a = torch.tensor([[5.0, 1.0, 2.0, 1.0, 9.0]])
    b = torch.tensor([[3.0, 0.2, 0.2, 0.6, 7.0]])
    combined = WeightedSum(weights={"a": 0.5, "b": 0.5}, normalize="sum").combine({"a": a, "b": b}, visual)
    expected = 0.5 * torch.tensor([0, 0.25, 0.5, 0.25, 0]) + 0.5 * torch.tensor([0, 0.2, 0.2, 0.6, 0])
    torch.testing.assert_close(combined[0], expected, check_dtype=False)


@pytest.mark.parametrize("name", sorted(NORMALIZATIONS))
def test_normalisations_ignore_non_visual_tokens(name):
    visual = torch.tensor([[True, False, True, True]])
    x = torch.tensor([[0.3, 100.0, 0.1, 0.7]])
    y = torch.tensor([[0.3, -5.0, 0.1, 0.7]])
    fn = NORMALIZATIONS[name]
    torch.testing.assert_close(fn(x, visual), fn(y, visual))
    assert fn(x, visual)[0, 1] == 0


def test_random_scores_do_not_depend_on_batch_or_padding():
    from prunekit.api import ForwardContext
    from prunekit.criteria.random import RandomScore
    from prunekit.layout import layout_from_ids

    crit = RandomScore(seed=3)
    crit.key = "r"
    ids = torch.tensor([[0, 0, 9, 5, 5, 5, 5, 1], [0, 9, 9, 5, 5, 5, 5, 1]])
    layout = layout_from_ids(ids, ids == 5, (torch.arange(8) >= torch.tensor([[2], [1]])).long())
    ctx = ForwardContext(layout=layout, stage_layers=(2,), num_layers=4, stage=0)
    scores = crit.score(ctx)
    torch.testing.assert_close(scores[0, 3:7], scores[1, 3:7])
    assert len(set(scores[0, 3:7].tolist())) == 4
