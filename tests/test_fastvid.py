"""FastVID (issue 16): the fastvid criterion and fastvid_merge merger against a loop over the official formulas."""

from __future__ import annotations

import math

import pytest
import torch
from prunekit.criteria.fastvid import (
    MULTI,
    SINGLE,
    FastVID,
    FastVIDMerge,
    density_scores,
    plan_clip,
    segment_sizes,
)

import prunekit
from criteria_helpers import loop_cos, loop_dot, loop_mean
from prunekit.layout import TokenLayout, layout_from_ids
from prunekit.testing import (
    family_inputs,
    forward_context,
    qwen_video_inputs,
    tiny_family_model,
)


# ---------------------------------------------------------------------------------------------
# the official LLaVA-OneVision FastVID, re-derived as Python loops over lists of floats
# ---------------------------------------------------------------------------------------------



def loop_segments(frames: list[list[list[float]]], c: int, tau: float) -> list[int]:
    """DySeg: cut after frame i for the c - 1 least similar consecutive pairs and every pair below tau."""
    g = [loop_mean(frame) for frame in frames]
    sims = [loop_cos(g[i], g[i + 1]) for i in range(len(g) - 1)]
    least = sorted(range(len(sims)), key=lambda i: (sims[i], i))[:c - 1]
    cuts = sorted(set(least) | {i for i, s in enumerate(sims) if s < tau})
    bounds = [-1] + cuts + [len(frames) - 1]
    return [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]


def loop_density(tokens: list[list[float]]) -> list[float]:
    """DPC-kNN: rho = exp(-mean of the 4 smallest squared distances / dim), delta = distance to the nearest denser."""
    m, dim = len(tokens), len(tokens[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(tokens[i], tokens[j]))) / math.sqrt(dim) for j in range(m)]
            for i in range(m)]
    rho = []
    for i in range(m):
        nearest = sorted(dist[i])[:min(4, m)]
        rho.append(math.exp(-sum(x * x for x in nearest) / len(nearest)))
    top = max(max(row) for row in dist)
    scores = []
    for i in range(m):
        denser = [dist[i][j] for j in range(m) if rho[j] > rho[i]]
        scores.append((min(denser) if denser else top) * rho[i])
    return scores


def _top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def loop_merge(centres: list[list[float]], members: list[list[float]], beta: float) -> list[list[float]]:
    """DTM: each member joins its most cosine-similar centre; w = max(1 / (count + 1), beta)."""
    groups: list[list[list[float]]] = [[] for _ in centres]
    for x in members:
        sims = [loop_cos(x, c) for c in centres]
        groups[sims.index(max(sims))].append(x)
    out = []
    for c, group in zip(centres, groups):
        w = max(1 / (len(group) + 1), beta)
        mean = loop_mean(group) if group else [0.0] * len(c)
        out.append([w * a + (1 - w) * b for a, b in zip(c, mean)])
    return out


def loop_fastvid(frames: list[list[list[float]]], retention: float, c: int, tau: float, d: float, p: int,
                 beta: float) -> tuple[list[int], dict[int, list[float]], dict[int, int]]:
    """The official OneVision flow on one clip (frame f's token j has index f * n + j): the salient indices,
    each centre's merged token, and each centre's path (SINGLE or MULTI)."""
    n, dim = len(frames[0]), len(frames[0][0])
    sizes = loop_segments(frames, c, tau)
    retain = int(n * retention)
    context = int(retain * d)
    salient_num = retain - context
    counts = []
    for length in sizes:
        anchors = (length + p - 1) // p
        counts += [context * length // anchors if (length - 1 - j) % p == 0 else 0 for j in range(length)]
    salient, filtered, scores = [], [], []
    for frame in frames:  # ATS with the stand-in weights: softmax of <frame mean, token> / sqrt(dim)
        g = loop_mean(frame)
        logits = [loop_dot(g, x) / math.sqrt(dim) for x in frame]
        total = sum(math.exp(v - max(logits)) for v in logits)
        weights = [math.exp(v - max(logits)) / total for v in logits]
        top = _top(weights, salient_num)
        salient.append(sorted(top))
        filtered.append([j for j in range(n) if j not in top])
        scores.append(loop_density([frame[j] for j in filtered[-1]]) if len(filtered[-1]) and context else [])
    merged: dict[int, list[float]] = {}
    path: dict[int, int] = {}
    start = 0
    for length in sizes:
        members_all = [frames[f][j] for f in range(start, start + length) for j in filtered[f]]
        for f in range(start, start + length):
            if context == 0 or counts[f] < context or not filtered[f]:
                continue
            k = min(counts[f], len(filtered[f]))
            centres = [filtered[f][i] for i in _top(scores[f], k)]  # best first, as the official topk
            members = [frames[f][j] for j in filtered[f]] if counts[f] == context else members_all
            for j, token in zip(centres, loop_merge([frames[f][j] for j in centres], members, beta)):
                merged[f * n + j] = token
                path[f * n + j] = SINGLE if counts[f] == context else MULTI
        start += length
    return [f * n + j for f in range(len(frames)) for j in salient[f]], merged, path


# ---------------------------------------------------------------------------------------------
# hand-built clips
# ---------------------------------------------------------------------------------------------
def scene_clip(frames: int, n: int, dim: int, scenes: list[int], seed: int) -> torch.Tensor:
    """[frames, n, dim] float64: frames of a few scenes (each frame its scene's tokens plus noise), so that
    consecutive frames of one scene are alike and a scene change is a cut; scene s spans scenes[s] frames."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in scenes:
        scene = 2 * torch.randn(dim, generator=g, dtype=torch.float64)  # the scene's direction
        base = scene + torch.randn(n, dim, generator=g, dtype=torch.float64)
        out += [base + 0.3 * torch.randn(n, dim, generator=g, dtype=torch.float64) for _ in range(length)]
    assert len(out) == frames
    return torch.stack(out)


def clip_layout(frames: int, n: int, text: int = 2, tail: int = 0) -> TokenLayout:
    """One sample: ``text`` tokens, ``frames`` frames of ``n`` tokens (then ``tail`` visual tokens in no frame), text."""
    seq = 2 * text + frames * n + tail
    visual = torch.zeros(1, seq, dtype=torch.bool)
    visual[0, text:text + frames * n + tail] = True
    layout = layout_from_ids(torch.zeros(1, seq, dtype=torch.long), visual, None)
    side = math.isqrt(n)
    for j in range(frames * n):
        layout.frame_index[0, text + j] = j // n
        layout.grid_row[0, text + j], layout.grid_col[0, text + j] = divmod(j % n, side)
    return layout


CASES = [  # frames, tokens per frame, dim, scenes, retention, c, tau, d, p
    (8, 16, 6, [3, 5], 0.5, 2, 0.0, 0.4, 4),
    (8, 16, 6, [3, 5], 0.75, 8, 0.9, 0.4, 4),
    (12, 9, 5, [5, 4, 3], 0.7, 3, -1.0, 0.5, 2),
    (6, 16, 4, [6], 0.5, 1, -1.0, 0.5, 4),
    (7, 9, 8, [2, 2, 3], 0.9, 4, 0.5, 0.6, 3),
    (5, 4, 3, [1, 4], 1.0, 2, 0.2, 0.5, 1),
    (4, 16, 6, [2, 2], 0.25, 8, 0.9, 0.4, 4),
]


@pytest.mark.parametrize("case", CASES)
def test_segments_and_density_equal_the_official_loop(case):
    frames, n, dim, scenes, _, c, tau, _, _ = case
    clip = scene_clip(frames, n, dim, scenes, seed=frames + n)
    as_lists = clip.tolist()
    assert segment_sizes(clip.mean(dim=1), c, tau) == loop_segments(as_lists, c, tau)
    for f in (0, frames - 1):
        torch.testing.assert_close(density_scores(clip[f]), torch.tensor(loop_density(as_lists[f]), dtype=torch.float64),
                                   rtol=1e-10, atol=1e-12)


def test_segments_follow_the_scenes_and_the_cap():
    clip = scene_clip(9, 9, 6, [2, 4, 3], seed=3)
    assert segment_sizes(clip.mean(dim=1), 1, 0.5) == [2, 4, 3]  # scene changes are below tau, nothing else
    assert segment_sizes(clip.mean(dim=1), 3, -1.0) == [2, 4, 3]  # the two least similar pairs
    assert segment_sizes(clip.mean(dim=1), 50, -1.0) == [1] * 9  # c past the clip: every pair is cut


@pytest.mark.parametrize("case", CASES)
def test_plan_and_merged_tokens_equal_the_official_loop(case):
    """The criterion's kept set (salient tokens), its centres and the merger's tokens, against the loop."""
    frames, n, dim, scenes, retention, c, tau, d, p = case
    beta = 0.6
    clip = scene_clip(frames, n, dim, scenes, seed=frames * n)
    salient, merged, path = loop_fastvid(clip.tolist(), retention, c, tau, d, p, beta)
    plan = plan_clip(clip, retention, c, tau, d, p)
    assert plan.salient.flatten().nonzero().flatten().tolist() == salient
    centre = plan.centre.flatten()
    assert {j: int(centre[j]) for j in centre.nonzero().flatten().tolist()} == path
    # through the criterion and the merger, on a layout with text around the clip and a token in no frame
    text = 3
    layout = clip_layout(frames, n, text=text, tail=1)
    hidden = torch.randn(1, layout.seq_len, dim, dtype=torch.float64)
    hidden[0, text:text + frames * n] = clip.reshape(-1, dim)
    criterion = FastVID(retention=retention, segments=c, tau=tau, d=d, p=p)
    criterion.key = "fv"
    ctx = forward_context(layout, stage_layers=(0,), buffers={"fv/hidden0": hidden})
    score = criterion.score(ctx)[0]
    video = torch.arange(text, text + frames * n)
    kept = (score[video] > float("-inf")).nonzero().flatten().tolist()
    assert kept == sorted(salient + list(path))  # the salient tokens and the centres (merged into in place)
    assert float(score[text + frames * n]) > float(score[video].max())  # the token in no frame stays
    kept_mask = layout.visual & (score[None] > float("-inf"))
    out = FastVIDMerge(criterion="fv", beta=beta).merge_into_kept(hidden, kept_mask, score[None], ctx)
    expect = hidden.clone()
    for j, token in merged.items():  # each centre's row becomes its merged token; every other row stays
        expect[0, text + j] = torch.tensor(token, dtype=torch.float64)
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-12)


def test_a_multi_frame_segment_holds_its_context_on_anchor_frames():
    """Two segments of 4 frames, p = 2: anchors 1, 3 and 5, 7 each take C * L // ceil(L / p) centres (MULTI),
    at most their non-salient tokens; with every frame its own segment each frame takes C (SINGLE)."""
    clip = scene_clip(8, 16, 6, [4, 4], seed=11)
    for retention, expect in [(0.5, 4 * 4 // 2), (0.75, 16 - 6)]:  # R = 8: C = 4, S = 4; R = 12: 12 capped at 10
        plan = plan_clip(clip, retention, 2, -1.0, 0.5, 2)
        assert sorted(set((plan.centre == MULTI).nonzero()[:, 0].tolist())) == [1, 3, 5, 7]
        assert not bool((plan.centre == SINGLE).any())
        assert (plan.centre == MULTI).sum(dim=1).tolist() == [0, expect] * 4
    single = plan_clip(clip, 0.5, 8, 0.99, 0.5, 2)  # every frame its own segment: C = 4 centres each
    assert (single.centre == SINGLE).sum(dim=1).tolist() == [4] * 8 and not bool((single.centre == MULTI).any())


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------
def _recipe(**params) -> dict:
    merge = {"type": "fastvid_merge", "criterion": "fastvid", "beta": params.pop("beta", 0.6)}
    return {"name": "fastvid-test", "positions": "original", "criteria": {"fastvid": {"type": "fastvid", **params}},
            "merge": merge, "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 1.0}]}}


MERGING = {"retention": 0.7, "segments": 3, "tau": -1.0, "d": 0.5, "p": 2}  # 9 tokens per frame: 3 salient, 3 context
KEEP_ALL = {"retention": 1.0, "d": 0.0}


def _layer0_inputs(model, recipe, inputs) -> tuple[torch.Tensor, object]:
    """The hidden states entering decoder layer 0 (after a layer-0 stage) and the pruner's last report."""
    seen = []
    layer = model.model.language_model.layers[0]
    with prunekit.apply(model, recipe) as pruner:
        handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
    return seen[0], pruner.last_report


@pytest.fixture(scope="module")
def onevision():
    return tiny_family_model("llava_onevision", num_layers=4, seed=5, dtype=torch.float64)


def test_tiny_onevision_keeps_and_merges_the_official_tokens_of_its_video_features(onevision):
    model = onevision
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    bare, _ = _layer0_inputs(model, _recipe(**KEEP_ALL), inputs)  # keep-all: the model's own layer-0 input
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    frames = inputs["pixel_values_videos"].shape[1]
    n = (len(video) - 1) // frames  # OneVision closes the clip with one newline token
    clip = bare[0, video[:-1]].reshape(frames, n, -1)
    salient, merged, path = loop_fastvid(clip.tolist(), beta=0.6, c=MERGING["segments"], **{
        k: MERGING[k] for k in ("retention", "tau", "d", "p")})
    assert MULTI in path.values()
    pruned, report = _layer0_inputs(model, _recipe(**MERGING), inputs)
    stage = report[0]
    kept = sorted(salient + list(merged))  # the salient tokens and the centres, in clip order
    assert stage.kept[0].tolist() == video[kept].tolist() + [int(video[-1])]
    assert int(stage.merged_counts[0]) == 0  # merged in place: no token added
    # expected layer-0 input: text, the kept tokens (each centre's row its merged token), the newline, text
    first, last = int(video[0]), int(video[-1])
    clip_rows = [torch.tensor(merged[j], dtype=torch.float64) if j in merged else bare[0, video[j]] for j in kept]
    expect = torch.cat([bare[0, :first], torch.stack(clip_rows), bare[0, last:]])
    torch.testing.assert_close(pruned[0], expect, rtol=1e-10, atol=1e-12)


def test_keep_all_is_bit_identical_to_the_bare_model(onevision):
    model = onevision
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=3, video=True, dtype=torch.float64)
    with torch.no_grad():
        bare_logits = model(**inputs).logits
        bare = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunekit.apply(model, _recipe(**KEEP_ALL)) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert int(pruner.last_report[0].merged_counts[0]) == 0
    assert int(pruner.last_report[0].kept_counts[0]) == int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert torch.equal(logits, bare_logits) and torch.equal(ids, bare)


def _alone(inputs: dict, row: int) -> dict:
    mask = inputs["attention_mask"][row].bool()
    return {key: value[row][mask][None] if key in ("input_ids", "attention_mask") else value[row:row + 1]
            for key, value in inputs.items()}


@pytest.mark.parametrize("recipe", ["fastvid", "merging"])
def test_a_padded_batch_of_two_clips_equals_the_lone_runs(onevision, recipe):
    model = onevision
    chosen = recipe if recipe == "fastvid" else _recipe(**MERGING)
    inputs = family_inputs(model, "llava_onevision", batch=2, seed=4, video=True, dtype=torch.float64)
    assert bool((inputs["attention_mask"] == 0).any())  # a padded batch
    with prunekit.apply(model, chosen) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report[0]
        for row in range(2):
            alone = _alone(inputs, row)
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            kept = batch_report.kept[row]
            assert torch.equal(kept[kept >= 0] - pad, pruner.last_report[0].kept[0])
            assert int(batch_report.merged_counts[row]) == int(pruner.last_report[0].merged_counts[0])
            assert batch_out[row, inputs["input_ids"].shape[1]:].tolist() == out[0, alone["input_ids"].shape[1]:].tolist()


def test_a_padded_batch_of_two_qwen_clips_of_different_lengths_equals_the_lone_runs():
    model = tiny_family_model("qwen2_5_vl", num_layers=4, seed=1, dtype=torch.float64)
    grids = [(4, 8, 8), (6, 8, 12)]  # 4 frames of 16 tokens, 6 frames of 24
    inputs = qwen_video_inputs(model, grids, seed=5)
    with prunekit.apply(model, _recipe(**MERGING)) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report[0]
        for row, grid in enumerate(grids):
            alone = qwen_video_inputs(model, [grid], seed=5)
            alone["pixel_values_videos"] = inputs["pixel_values_videos"][sum(t * h * w for t, h, w in grids[:row]):][
                :grid[0] * grid[1] * grid[2]]
            alone["input_ids"] = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
            alone["attention_mask"] = torch.ones_like(alone["input_ids"])
            alone["mm_token_type_ids"] = (alone["input_ids"] == model.config.video_token_id).long() * 2
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            kept = batch_report.kept[row]
            assert torch.equal(kept[kept >= 0] - pad, pruner.last_report[0].kept[0])
            assert int(batch_report.kept_counts[row]) == int(pruner.last_report[0].kept_counts[0])
            assert batch_out[row, inputs["input_ids"].shape[1]:].tolist() == out[0, alone["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["llava_onevision", "video_llava", "qwen2_5_vl"])
@pytest.mark.parametrize("recipe", ["fastvid", "fastvid-10", "merging"])
def test_recipes_generate_on_video_families(name, recipe):
    model = tiny_family_model(name, num_layers=4, seed=1, dtype=torch.float64)
    if name == "qwen2_5_vl":
        inputs = qwen_video_inputs(model, [(4, 8, 8)], seed=3)
    else:
        inputs = family_inputs(model, name, batch=1, seed=3, video=True, dtype=torch.float64)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    with torch.no_grad():
        bare = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with prunekit.apply(model, recipe if recipe != "merging" else _recipe(**MERGING)) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == bare.shape
    stage = pruner.last_report[0]
    assert 0 < int(stage.kept_counts[0]) < n_video and int(stage.merged_counts[0]) == 0  # merged in place


def test_still_images_are_kept_whole():
    model = tiny_family_model("llava_onevision", num_layers=2, seed=1)
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=1)
    with prunekit.apply(model, "fastvid") as pruner, torch.no_grad():
        model(**inputs)
    stage = pruner.last_report[0]
    assert int(stage.kept_counts[0]) == int(pruner.last_report.visual_tokens[0]) and int(stage.merged_counts[0]) == 0


@pytest.mark.parametrize("field, value, words", [
    ("retention", 0.0, "retention"), ("retention", 1.5, "retention"), ("segments", 0, "segments"),
    ("segments", 2.5, "segments"), ("tau", 2.0, "tau"), ("d", 1.0, "d "), ("p", 0, "p "), ("p", -3, "p "),
])
def test_bad_criterion_parameters_name_the_value(field, value, words):
    recipe = _recipe(**{field: value})
    with pytest.raises(prunekit.RecipeError, match=words) as error:
        prunekit.load_recipe(recipe)
    assert repr(value) in str(error.value)


def test_bad_merger_parameters_and_stages_are_named(onevision):
    recipe = _recipe()
    recipe["merge"]["beta"] = 1.5
    with pytest.raises(prunekit.RecipeError, match="beta") as error:
        prunekit.load_recipe(recipe)
    assert "1.5" in str(error.value)
    recipe = _recipe()
    recipe["schedule"]["stages"] = [{"layer": 1, "keep": 1.0}]
    with pytest.raises(prunekit.RecipeError, match="layer 0"):
        prunekit.apply(onevision, recipe)
    recipe = _recipe(**MERGING)
    recipe["merge"]["criterion"] = "nope"
    inputs = family_inputs(onevision, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="'nope'"), prunekit.apply(onevision, recipe), torch.no_grad():
        onevision(**inputs)
