"""Every baseline recipe end to end, and each method's scores against its official formula recomputed another way."""

from __future__ import annotations

import math

import pytest
import torch

import prunekit
from conftest import SHAPE, SHAPE576
from criteria_helpers import capture_scores, embeddings_with_images, inputs576
from prunekit.criteria.diversity import max_min_order
from prunekit.criteria.sparsevlm import density_peak_merge, select_raters
from prunekit.flops import DecoderDims, recipe_estimate

ALL_RECIPES = prunekit.builtin_recipe_names()


_inputs = inputs576
_embeddings = embeddings_with_images


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_builtin_recipe_runs_through_generate(llava576, name):
    from prunekit.toy.oracle import ground_truth

    inputs = _inputs(batch=2, seed=1)
    with prunekit.apply(llava576, name) as pruner, ground_truth([[0, 1, 2], [300, 301]]):  # read by `oracle` only
        out = llava576.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    report = pruner.last_report
    # the tokens every layer ran on are what the analytic FLOPs model predicts
    analytic = recipe_estimate(prunekit.load_recipe(name), DecoderDims.from_config(llava576.config), 576)
    if analytic.bound:  # a threshold's counts depend on the input: never above the bound, and dropping some here
        assert all(got <= bound for got, bound in zip(report.visual_tokens_per_layer[0].tolist(),
                                                        analytic.visual_tokens))
        assert report.visual_tokens_per_layer[0].tolist() != analytic.visual_tokens
    else:
        assert report.visual_tokens_per_layer[0].tolist() == analytic.visual_tokens
    for stage in report:
        for row in range(2):
            kept = stage.kept[row][stage.kept[row] >= 0]  # -1 pads a row that kept fewer
            assert len(kept) == int(stage.kept_counts[row])
            assert torch.all(kept[1:] > kept[:-1])
            assert torch.all(inputs["input_ids"][row, kept] == SHAPE576.image_token_id)


def test_pdrop_score_is_the_last_token_row_at_the_prune_layer(llava576, llava576_eager):
    inputs = _inputs(seed=2)
    scores = capture_scores(llava576, "pdrop", inputs)
    with torch.no_grad():
        attentions = llava576_eager(**inputs, output_attentions=True).attentions
    visual = inputs["input_ids"][0] == SHAPE576.image_token_id
    expected = attentions[8][0].mean(0)[-1]  # layer 8 is the first prune: it sees the whole prompt
    torch.testing.assert_close(scores[0]["pdrop"][0][visual], expected[visual], rtol=0, atol=1e-6)


def _raters_loop(embeds, visual, text):
    v = [embeds[i] for i in range(len(visual)) if visual[i]]
    t_index = [i for i in range(len(text)) if text[i]]
    t = [embeds[i] for i in t_index]
    per_text = [0.0] * len(t)
    for vi in v:
        dots = [float(vi @ tj) for tj in t]
        top = max(dots)
        exps = [math.exp(d - top) for d in dots]
        total = sum(exps)
        for j, e in enumerate(exps):
            per_text[j] += e / total / len(v)
    mean = sum(per_text) / len(per_text)
    return {t_index[j] for j, p in enumerate(per_text) if p > mean}


def test_sparsevlm_raters_and_scores_follow_the_official_formula(llava576, llava576_eager):
    inputs = _inputs(seed=3)
    ids = inputs["input_ids"][0]
    visual = ids == SHAPE576.image_token_id
    text = torch.arange(len(ids)) > visual.nonzero().max()
    with torch.no_grad():
        embeds = _embeddings(llava576, inputs)
        raters = select_raters(embeds, visual[None], text[None])[0]
    assert set(raters.nonzero().flatten().tolist()) == _raters_loop(embeds[0], visual.tolist(), text.tolist())
    scores = capture_scores(llava576, "sparsevlm", inputs)
    with torch.no_grad():
        attentions = llava576_eager(**inputs, output_attentions=True).attentions
    expected = attentions[2][0].mean(0)[raters].mean(0)  # layer 2's attention, rater rows
    torch.testing.assert_close(scores[0]["sparsevlm"][0][visual], expected[visual], rtol=0, atol=1e-6)


def _density_peak_loop(x, clusters):
    """DPC-kNN written with lists: density, delta, centers, nearest-center assignment, means."""
    n, dim = x.shape
    d = [[float((x[i] - x[j]).norm()) / dim**0.5 for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(v**2 for v in sorted(row)[:clusters]) / clusters) for row in d]
    big = max(max(row) for row in d)
    delta = []
    for i in range(n):
        denser = [d[i][j] for j in range(n) if density[j] > density[i] or (density[j] == density[i] and j < i)]
        delta.append(min(denser) if denser else big)
    score = [delta[i] * density[i] for i in range(n)]
    centers = sorted(range(n), key=lambda i: (-score[i], i))[:clusters]
    groups = {c: [] for c in range(clusters)}
    for i in range(n):
        if i in centers:
            groups[centers.index(i)].append(i)
        else:
            groups[min(range(clusters), key=lambda c: (d[centers[c]][i], c))].append(i)
    return torch.stack([x[groups[c]].mean(0) for c in range(clusters)])


@pytest.mark.parametrize("n,clusters", [(7, 2), (20, 3), (31, 4)])
def test_density_peak_merge_matches_a_loop(n, clusters):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    torch.testing.assert_close(density_peak_merge(x, clusters), _density_peak_loop(x, clusters))


def test_sparsevlm_recycles_into_the_officially_counted_tokens(llava576):
    with prunekit.apply(llava576, "sparsevlm") as pruner, torch.no_grad():
        llava576(**_inputs(seed=4))
    merged = [int(s.merged_counts[0]) for s in pruner.last_report]
    kept = [int(s.kept_counts[0]) + int(s.merged_counts[0]) for s in pruner.last_report]
    assert merged[0] == 9 and kept == [309, 204, 113]  # 300 + 9, 200 + 4, 110 + 3 as the official code counts


def _max_min_loop(features):
    x = [f / f.norm() for f in features]
    n = len(x)
    dist = [[1 - float(x[i] @ x[j]) for j in range(n)] for i in range(n)]
    first = max(range(n), key=lambda j: (sorted(dist[i][j] for i in range(n))[1], -j))
    chosen = [first]
    while len(chosen) < n:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[i][j] for i in chosen), -j)))
    return chosen


def test_divprune_order_matches_a_greedy_loop():
    features = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    valid = torch.ones(1, 12, dtype=torch.bool)
    assert max_min_order(features, valid, 12)[0].tolist() == _max_min_loop(features[0])


def test_divprune_keeps_the_greedy_subset_of_the_projected_tokens(llava576):
    inputs = _inputs(seed=5)
    with prunekit.apply(llava576, "divprune") as pruner, torch.no_grad():
        llava576(**inputs)
    ids = inputs["input_ids"][0]
    visual = (ids == SHAPE576.image_token_id).nonzero().flatten()
    with torch.no_grad():
        features = _embeddings(llava576, inputs)[0, visual]
    expected = sorted(visual[_max_min_loop(features)[:56]].tolist())
    assert pruner.last_report[0].kept[0].tolist() == expected


@pytest.mark.parametrize("recipe,reduce", [("similarity", "mean"), ("l2norm", None)])
def test_feature_baselines_score_the_layer_input(llava576, recipe, reduce):
    inputs = _inputs(seed=6)
    scores = capture_scores(llava576, recipe, inputs)[0]
    with torch.no_grad():
        hidden = llava576(**inputs, output_hidden_states=True).hidden_states[2][0]  # input of layer 2
    visual = inputs["input_ids"][0] == SHAPE576.image_token_id
    feats = hidden[visual]
    if reduce is None:
        expected = feats.norm(dim=-1)
    else:
        unit = feats / feats.norm(dim=-1, keepdim=True)
        sim = unit @ unit.T
        expected = 1 - (sim.sum(1) - sim.diagonal()) / (len(feats) - 1)
    got = next(iter(scores.values()))[0][visual]
    torch.testing.assert_close(got, expected)


def test_visionzip_matches_the_official_selection_and_merge(llava576, llava576_eager):
    inputs = _inputs(seed=7)
    with prunekit.apply(llava576, "visionzip-64"), torch.no_grad():
        features = llava576.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert features.shape[0] == 64
    # reference from the eager vision tower: CLS attention of layer -2, keys of layer -2, hidden of layer -2
    tower = llava576_eager.model.vision_tower
    keys = {}
    handle = tower.encoder.layers[-2].self_attn.k_proj.register_forward_hook(lambda m, a, o: keys.setdefault("k", o))
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    handle.remove()
    cls_attention = out.attentions[-2][0].sum(0)[0, 1:]  # [576]
    hidden = out.hidden_states[-2][0]  # [577, dim]
    dominant = sorted(cls_attention.topk(53).indices.tolist())
    rest = [i for i in range(576) if i not in dominant]
    heads = tower.config.num_attention_heads
    metric = keys["k"][0].view(577, heads, -1).mean(1)[1:]  # head-mean keys of the patches
    metric = metric[rest] / metric[rest].norm(dim=-1, keepdim=True)
    step = len(rest) // 10
    targets = list(range(0, len(rest), step))[:10]
    others = [j for j in range(len(rest)) if j not in targets]
    assign = (metric[others] @ metric[targets].T).argmax(1)
    patch_hidden = hidden[1:][rest]
    contextual = []
    for c in range(10):
        members = [others[i] for i in range(len(others)) if assign[i] == c]
        mean = patch_hidden[members].mean(0) if members else torch.zeros_like(patch_hidden[0])
        contextual.append(patch_hidden[targets[c]] + mean)
    expected = torch.cat([hidden[:1], hidden[1:][dominant], torch.stack(contextual)])
    projected = llava576.model.multi_modal_projector(expected[None])[0]
    torch.testing.assert_close(features, projected, rtol=1e-6, atol=1e-6)


def test_a_vision_stage_keeping_everything_is_identical_to_the_bare_model(llava576):
    recipe = {"name": "vision-keep-all", "vision": {"criteria": {"d": {"type": "visionzip"}}, "keep": 1.0}}
    inputs = _inputs(batch=2, seed=8)
    with torch.no_grad():
        bare = llava576(**inputs).logits
        bare_ids = llava576.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunekit.apply(llava576, recipe), torch.no_grad():
        logits = llava576(**inputs).logits
        ids = llava576.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(logits, bare, rtol=0, atol=1e-10)
    assert torch.equal(ids, bare_ids)


@pytest.mark.parametrize("name", ["visionzip", "visionzip+transprune", "divprune"])
def test_cached_decoding_equals_recomputing_the_whole_prompt(llava576, name):
    """With a KV cache or without one (every step re-prunes the whole prompt), the answer is the same."""
    inputs = _inputs(batch=2, seed=9)
    with prunekit.apply(llava576, name), torch.no_grad():
        cached = llava576.generate(**inputs, max_new_tokens=5, do_sample=False,
                                   return_dict_in_generate=True, output_logits=True)
        fresh = llava576.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False,
                                  return_dict_in_generate=True, output_logits=True)
    if name == "visionzip+transprune":  # IGA re-reads the prompt with the new tokens: compare the first step
        torch.testing.assert_close(cached.logits[0], fresh.logits[0], rtol=1e-5, atol=1e-5)
        return
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.logits, fresh.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vision_stage_reports_original_patch_positions(llava576):
    inputs = _inputs(batch=2, seed=10)
    with prunekit.apply(llava576, "visionzip+transprune") as pruner, torch.no_grad():
        llava576(**inputs)
    report = pruner.last_report
    assert [s.where for s in report] == ["vision", "decoder", "decoder", "decoder"]
    assert report.visual_tokens.tolist() == [576, 576]
    assert report[0].kept_counts.tolist() == [161, 161] and report[0].merged_counts.tolist() == [31, 31]
    for stage in report:
        for row in range(2):
            kept = stage.kept[row][stage.kept[row] >= 0]
            assert torch.all(inputs["input_ids"][row, kept] == SHAPE576.image_token_id)
    # later stages keep a subset of what the vision stage kept
    later = {i for i in report[1].kept[0].tolist() if i >= 0}
    assert later and later <= set(report[0].kept[0].tolist())


def test_a_vision_stage_that_would_lengthen_a_small_image_leaves_it_whole(llava64, single_inputs64):
    """VisionZip's 161 dominant tokens + CLS on a 36-token image: the image stays as it is (not 37 tokens)."""
    with torch.no_grad():
        bare = llava64(**single_inputs64).logits
        with prunekit.apply(llava64, "visionzip") as pruner:
            pruned = llava64(**single_inputs64).logits
    torch.testing.assert_close(pruned, bare)
    stage = pruner.last_report.stages[0]
    assert stage.where == "vision" and int(stage.kept_counts[0]) == SHAPE.visual_tokens
    assert int(stage.merged_counts[0]) == 0
    dims = DecoderDims.from_config(llava64.config)
    assert recipe_estimate(pruner.recipe, dims, SHAPE.visual_tokens).visual_ratio == pytest.approx(1.0)
    with prunekit.apply(llava64, "visionzip-64", ["vision.count=30"]) as pruner, torch.no_grad():
        llava64(**single_inputs64)  # 30 kept + CLS + 6 contextual = 37 > 36: left whole too
    assert int(pruner.last_report.stages[0].kept_counts[0]) == 36
    with prunekit.apply(llava64, "visionzip-64", ["vision.count=20"]) as pruner, torch.no_grad():
        llava64(**single_inputs64)  # 20 kept + CLS + 10 contextual = 31 tokens
    assert (int(pruner.last_report.stages[0].kept_counts[0]), int(pruner.last_report.stages[0].merged_counts[0])) \
        == (20, 11)
