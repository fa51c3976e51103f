"""Property-based tests (hypothesis) on score invariants, combiners, selection and schedules."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunekit.api import ForwardContext, Stage
from prunekit.attention import attention_rows, query_weights
from prunekit.criteria.combiners import Maximum, Product, RankFusion, WeightedSum
from prunekit.criteria.diversity import L2Norm, Redundancy, max_min_order
from prunekit.criteria.ttv import transition_variation
from prunekit.layout import layout_from_ids
from prunekit.normalize import NORMALIZATIONS
from prunekit.sequence import select

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def token_batch(draw, min_seq=3, max_seq=12, dim=(2, 6)):
    """Random hidden-state pairs [batch, seq, dim] as float64 from a seed (fast to generate)."""
    batch = draw(st.integers(1, 3))
    seq = draw(st.integers(min_seq, max_seq))
    d = draw(st.integers(*dim))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-6, 1.0, 1e6]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, d, generator=g, dtype=torch.float64) * scale
    y = torch.randn(batch, seq, d, generator=g, dtype=torch.float64) * scale
    return x, y


def _permutation(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


# -- criteria ---------------------------------------------------------------------------------
@SETTINGS
@given(token_batch(), st.integers(0, 1000), st.sampled_from(["one_minus_cos", "one_minus_abs_cos"]))
def test_ttv_permuting_tokens_permutes_scores(pair, seed, direction):
    x, y = pair
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    perm = _permutation(x.shape[1], seed)
    base = transition_variation(x, y, valid, direction)
    permuted = transition_variation(x[:, perm], y[:, perm], valid, direction)
    torch.testing.assert_close(permuted, base[:, perm])


@SETTINGS
@given(token_batch(), st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_ttv_direction_term_ignores_token_scale(pair, a, b):
    x, y = pair
    valid = torch.ones(x.shape[:2], dtype=torch.bool)
    scale_in = torch.full(x.shape[:2] + (1,), a, dtype=torch.float64)
    scale_out = torch.full(x.shape[:2] + (1,), b, dtype=torch.float64)
    scale_in[:, ::2] *= 7.0  # different tokens scaled differently
    direction_only = transition_variation(x, y, valid, magnitude=False)
    scaled = transition_variation(x * scale_in, y * scale_out, valid, magnitude=False)
    torch.testing.assert_close(scaled, direction_only)
    # and the full TTV scales exactly by the norm ratio's factor
    full = transition_variation(x, y, valid)
    torch.testing.assert_close(transition_variation(x * scale_in, y * scale_out, valid),
                               full * (scale_out / scale_in)[..., 0])


def test_ttv_direction_is_exact_for_tiny_norms():
    """Shrunk counterexample: outputs of norm ~1e-8 once fell under F.cosine_similarity's eps."""
    x = torch.tensor([[[1.5410e-06, -2.9343e-07], [-2.1788e-06, 5.6843e-07], [-1.0845e-06, -1.3986e-06]]],
                     dtype=torch.float64)
    y = torch.tensor([[[4.0335e-07, 8.3803e-07], [-7.1926e-07, -4.0334e-07], [-5.9664e-07, 1.8204e-07]]],
                     dtype=torch.float64)
    valid = torch.ones(1, 3, dtype=torch.bool)
    torch.testing.assert_close(transition_variation(x, y / 64, valid, magnitude=False),
                               transition_variation(x, y, valid, magnitude=False))


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1e-30, 1e-12, 1e12, 1e30]))
def test_ttv_is_finite_on_extreme_but_finite_inputs(seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float64):
        x = (torch.randn(2, 6, 4, generator=g) * magnitude).to(dtype)
        y = (torch.randn(2, 6, 4, generator=g) * magnitude).to(dtype)
        x[0, 0] = 0  # a zero vector
        out = transition_variation(x, y, torch.ones(2, 6, dtype=torch.bool))
        assert torch.isfinite(out).all()


@st.composite
def attention_case(draw):
    """q/k over [prefix | visual block | instruction]; instruction queries see every visual key."""
    batch = draw(st.integers(1, 2))
    heads, kv_heads = draw(st.sampled_from([(2, 2), (4, 2), (4, 1)]))
    prefix, n_visual, n_instr = draw(st.integers(0, 3)), draw(st.integers(2, 8)), draw(st.integers(1, 4))
    dim = draw(st.sampled_from([4, 8]))
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, heads, kv_heads, prefix, n_visual, n_instr, dim, seed


@SETTINGS
@given(attention_case(), st.integers(0, 1000))
def test_attention_rows_permute_with_the_visual_keys(case, perm_seed):
    batch, heads, kv_heads, prefix, n_visual, n_instr, dim, seed = case
    seq = prefix + n_visual + n_instr
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=torch.float64)
    selected = torch.zeros(batch, seq, dtype=torch.bool)
    selected[:, prefix + n_visual:] = True
    valid = torch.ones(batch, seq, dtype=torch.bool)
    rows = attention_rows(q, k, dim**-0.5, query_weights(selected), valid)
    order = torch.arange(seq)
    order[prefix:prefix + n_visual] = prefix + _permutation(n_visual, perm_seed)
    permuted = attention_rows(q[:, :, order], k[:, :, order], dim**-0.5, query_weights(selected), valid)
    torch.testing.assert_close(permuted[:, prefix:prefix + n_visual], rows[:, order][:, prefix:prefix + n_visual])
    torch.testing.assert_close(rows.sum(dim=1), torch.ones(batch, dtype=torch.float64))  # a distribution


def _feature_ctx(hidden, visual):
    ids = torch.where(visual, 5, 1)
    layout = layout_from_ids(ids, visual, None)
    ctx = ForwardContext(layout=layout, stage_layers=(2,), num_layers=4, stage=0)
    return ctx


@SETTINGS
@given(token_batch(min_seq=4), st.integers(0, 1000), st.sampled_from([L2Norm, Redundancy]))
def test_feature_criteria_permute_with_the_tokens(pair, seed, cls):
    hidden, _ = pair
    batch, seq, _ = hidden.shape
    visual = torch.ones(batch, seq, dtype=torch.bool)
    perm = _permutation(seq, seed)
    scores = []
    for h in (hidden, hidden[:, perm]):
        crit = cls()
        crit.key = "c"
        ctx = _feature_ctx(h, visual)
        ctx.buffers["c/hidden2"] = h
        scores.append(crit.score(ctx))
    torch.testing.assert_close(scores[1], scores[0][:, perm])
    assert torch.isfinite(scores[0]).all()


@SETTINGS
@given(st.integers(3, 12), st.integers(2, 6), st.integers(0, 2**31 - 1), st.integers(0, 1000))
def test_divprune_choice_permutes_with_the_tokens(n, dim, seed, perm_seed):
    features = torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    valid = torch.ones(1, n, dtype=torch.bool)
    perm = _permutation(n, perm_seed)
    picks = max(1, n // 2)
    # DivPrune's first pick always ties: the farthest nearest-neighbour pair is mutual, and the official
    # code takes the lower index. Keep that pair's order under the permutation; then ids must follow.
    unit = features[0] / features[0].norm(dim=-1, keepdim=True)
    distance = (1 - unit @ unit.T).fill_diagonal_(float("inf"))
    first = int(distance.min(dim=0).values.argmax())
    partner = int(distance[:, first].argmin())
    a, b = sorted((first, partner))
    where_a, where_b = int((perm == a).nonzero()), int((perm == b).nonzero())
    if where_a > where_b:
        perm[where_a], perm[where_b] = b, a
    chosen = max_min_order(features, valid, picks)[0]
    chosen_permuted = perm[max_min_order(features[:, perm], valid, picks)[0]]
    assert chosen_permuted.tolist() == chosen.tolist()


# -- normalisations and combiners --------------------------------------------------------------
@st.composite
def scores_and_visual(draw):
    batch, seq = draw(st.integers(1, 3)), draw(st.integers(2, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    visual = torch.rand(batch, seq, generator=g) < 0.7
    visual[:, 0] = True
    visual[:, 1] = True
    a = torch.rand(batch, seq, generator=g, dtype=torch.float64) + 0.01
    b = torch.rand(batch, seq, generator=g, dtype=torch.float64) + 0.01
    return a, b, visual


INVARIANCES = {
    "sum": lambda x: 3.7 * x,
    "minmax": lambda x: 2.5 * x + 11.0,
    "zscore": lambda x: 0.3 * x - 4.0,
    "rank": lambda x: torch.exp(5 * x) + x**3,
    "softmax": lambda x: x + 9.0,
}


@SETTINGS
@given(scores_and_visual(), st.sampled_from(sorted(INVARIANCES)))
def test_each_normalisation_is_invariant_to_what_it_claims(data, name):
    a, _, visual = data
    norm = NORMALIZATIONS[name]
    torch.testing.assert_close(norm(INVARIANCES[name](a), visual), norm(a, visual))


@SETTINGS
@given(scores_and_visual(), st.sampled_from(["weighted_sum", "rank_fusion", "product", "max"]))
def test_combiners_are_invariant_to_what_their_normalisation_claims(data, combiner):
    a, b, visual = data
    make = {
        "weighted_sum": (lambda: WeightedSum(weights={"a": 0.3, "b": 0.7}, normalize="sum"), INVARIANCES["sum"]),
        "rank_fusion": (lambda: RankFusion(), INVARIANCES["rank"]),
        "product": (lambda: Product(normalize="sum"), INVARIANCES["sum"]),
        "max": (lambda: Maximum(normalize="minmax"), INVARIANCES["minmax"]),
    }
    build, transform = make[combiner]
    base = build().combine({"a": a, "b": b}, visual)
    moved = build().combine({"a": transform(a), "b": b}, visual)
    torch.testing.assert_close(moved, base)
    assert torch.all(base[~visual] == 0) and torch.isfinite(base).all()


# -- selection and schedules -----------------------------------------------------------------
@st.composite
def selection_case(draw):
    batch, seq = draw(st.integers(1, 4), st.integers(1, 16)) if False else (draw(st.integers(1, 4)), draw(st.integers(1, 16)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    visual = torch.rand(batch, seq, generator=g) < draw(st.floats(0.0, 1.0))
    scores = torch.rand(batch, seq, generator=g)
    if draw(st.booleans()):
        scores = (scores * 3).floor()  # many ties
    n_visual = visual.sum(dim=1)
    counts = (torch.rand(batch, generator=g) * (n_visual + 1).float()).floor().long().clamp(max=n_visual)
    return scores, visual, counts


@SETTINGS
@given(selection_case())
def test_the_kept_set_has_the_scheduled_size_and_never_drops_text(case):
    scores, visual, counts = case
    selection = select(scores, visual, counts)
    index, fill = selection.index, selection.fill
    for b in range(visual.shape[0]):
        kept = index[b][~fill[b]]
        assert len(set(kept.tolist())) == len(kept), "duplicates"
        assert torch.all(kept[1:] > kept[:-1]), "order"
        kept_visual = kept[visual[b, kept]]
        assert len(kept_visual) == int(counts[b]), "size"
        text = (~visual[b]).nonzero().flatten()
        assert set(text.tolist()) <= set(kept.tolist()), "text dropped"
        dropped = selection.dropped[b].nonzero().flatten()
        assert torch.all(visual[b, dropped]) and len(dropped) == int(visual[b].sum() - counts[b])
        if len(dropped) and len(kept_visual):  # every kept visual token scores at least as high as any dropped
            assert scores[b, kept_visual].min() >= scores[b, dropped].max()


@SETTINGS
@given(st.lists(st.floats(0.01, 1.0), min_size=1, max_size=5), st.integers(1, 2000))
def test_valid_schedules_never_grow(keeps, n):
    keeps = sorted(keeps, reverse=True)
    stages = [Stage(layer=i, keep=k) for i, k in enumerate(keeps)]
    counts = [int(s.keep_counts(torch.tensor([n]))[0]) for s in stages]
    assert counts == sorted(counts, reverse=True)
    assert all(0 <= c <= n for c in counts)
    assert counts == [int(n * k) for k in keeps]  # Python's int() truncation, as the official code


def test_growing_schedules_are_rejected():
    import prunekit

    with pytest.raises(prunekit.RecipeError, match="more than the stage before"):
        from prunekit.recipe import check_stages

        recipe = prunekit.load_recipe("transprune-high", ["schedule.stages.2.keep=0.7"])
        check_stages(recipe, 16, "LlavaForConditionalGeneration")


def test_ttv_of_a_zero_input_token_is_finite():
    """Shrunk counterexample: a zero input vector with a 1e12 output once gave an infinite norm ratio."""
    x = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(0)) * 1e12
    y = torch.randn(1, 4, 3, generator=torch.Generator().manual_seed(1)) * 1e12
    x[0, 0] = 0
    out = transition_variation(x, y, torch.ones(1, 4, dtype=torch.bool))
    assert torch.isfinite(out).all() and out[0, 0] > out[0, 1:].max()


def test_divprune_breaks_the_first_tie_by_index_as_the_official_code():
    """Shrunk counterexample: tokens 0 and 3 are mutual nearest neighbours, so both could start."""
    features = torch.randn(1, 6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    chosen = max_min_order(features, torch.ones(1, 6, dtype=torch.bool), 3)[0].tolist()
    assert chosen[0] == 0
    swapped = features[:, [3, 1, 2, 0, 4, 5]]
    assert max_min_order(swapped, torch.ones(1, 6, dtype=torch.bool), 3)[0].tolist()[0] == 0
