"""HoliTom (issue 16): the holitom criterion and holitom_merge merger against a loop over the official formulas."""

from __future__ import annotations

import math

import pytest
import torch
from prunekit.criteria.holitom import HoliTom, HoliTomMerge, static_windows

import prunekit
from criteria_helpers import loop_cos, loop_dot, loop_mean
from prunekit.layout import TokenLayout, layout_from_ids
from prunekit.probes import AttentionRows
from prunekit.testing import (
    family_inputs,
    forward_context,
    qwen_video_inputs,
    tiny_family_model,
)


# ---------------------------------------------------------------------------------------------
# the official LLaVA-OneVision HoliTom, re-derived as Python loops over lists of floats
# ---------------------------------------------------------------------------------------------



def _top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def loop_windows(sims: list[list[float]], tau: float, max_window: int) -> tuple[list[tuple[int, int]], float]:
    """select_static_windows: count[s][e] = places above tau over every pair of [s, e], times e - s; the DP."""
    frames, n = len(sims) + 1, len(sims[0]) if sims else 0
    count = [[0.0] * frames for _ in range(frames)]
    for s in range(frames):
        for e in range(s + 1, frames):
            count[s][e] = sum(all(sims[f][j] > tau for f in range(s, e)) for j in range(n)) * (e - s)
    dp, prev = [0.0] * frames, [0] * frames
    for i in range(frames):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, min(i + 1, max_window) + 1):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + count[j + 1][i]
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    out, i = [], frames - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], dp[-1]


def loop_cluster(tokens: list[list[float]], centres: int, k_max: int, beta: float) -> tuple[list[int], list[list[float]]]:
    """cluster_dpc_knn (k = min(K, centres)) + merge_tokens_by_clustering: centre indices in order, merged tokens."""
    m, dim = len(tokens), len(tokens[0])
    k = min(k_max, centres)
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(tokens[i], tokens[j]))) / math.sqrt(dim) for j in range(m)]
            for i in range(m)]
    rho = [math.exp(-sum(x * x for x in sorted(dist[i])[:k]) / k) for i in range(m)]
    top = max(max(row) for row in dist)
    score = [min([dist[i][j] for j in range(m) if rho[j] > rho[i]] or [top]) * rho[i] for i in range(m)]
    chosen = sorted(_top(score, centres))
    groups: list[list[list[float]]] = [[] for _ in chosen]
    for i in range(m):
        if i not in chosen:
            d = [dist[i][c] for c in chosen]
            groups[d.index(min(d))].append(tokens[i])
    merged = [[beta * a + (1 - beta) * b for a, b in zip(tokens[c], loop_mean(g))] if g else tokens[c]
              for c, g in zip(chosen, groups)]
    return chosen, merged


def loop_attention(frame: list[list[float]]) -> list[float]:
    """The stand-in attention: mean over queries i of softmax_j(<x_i, x_j> / sqrt(dim))."""
    n, dim = len(frame), len(frame[0])
    out = [0.0] * n
    for i in range(n):
        logits = [loop_dot(frame[i], frame[j]) / math.sqrt(dim) for j in range(n)]
        top = max(logits)
        total = sum(math.exp(v - top) for v in logits)
        for j in range(n):
            out[j] += math.exp(logits[j] - top) / total / n
    return out


def loop_outer(frames: list[list[list[float]]], retention: float, tau: float, d: float, k_max: int,
               max_window: int, beta: float) -> tuple[dict[int, list[float]], list[tuple[int, int]]]:
    """The official outer flow on one clip (frame f's token j has index f * n + j): every kept row (the row a
    merged token lands on: a static token on its window's first frame) with its token, and the windows."""
    n_frames, n = len(frames), len(frames[0])
    sims = [[loop_cos(frames[f][j], frames[f + 1][j]) for j in range(n)] for f in range(n_frames - 1)]
    windows, removed = loop_windows(sims, tau, max_window)
    total = n_frames * n
    ratio = min(retention / ((total - removed) / total), 1)
    kept: dict[int, list[float]] = {}
    for start, end in windows:
        static = [j for j in range(n) if end > start and all(sims[f][j] > tau for f in range(start, end))]
        dynamic = [j for j in range(n) if j not in static]
        if static and round(len(static) * ratio) > 0:
            means = [loop_mean([frames[f][j] for f in range(start, end + 1)]) for j in static]
            chosen, merged = loop_cluster(means, round(len(static) * ratio), k_max, beta)
            for c, token in zip(chosen, merged):
                kept[start * n + static[c]] = token
        count = math.ceil(len(dynamic) * ratio)
        dominant = round(count * (1 - d))
        for f in range(start, end + 1):
            attention = loop_attention(frames[f])
            top = _top([attention[j] for j in dynamic], dominant)
            for i in top:
                kept[f * n + dynamic[i]] = frames[f][dynamic[i]]
            rest = [dynamic[i] for i in range(len(dynamic)) if i not in top]
            if count - dominant > 0:
                chosen, merged = loop_cluster([frames[f][j] for j in rest], count - dominant, k_max, beta)
                for c, token in zip(chosen, merged):
                    kept[f * n + rest[c]] = token
    return kept, windows


def loop_inner(hidden: list[list[float]], attention: list[float], r: float) -> dict[int, list[float]]:
    """The official inner merge on n visual tokens: keep the round(n (1 - r)) most attended; each dropped token,
    in order, averaged into its most cosine-similar kept token (similarities of the unmerged states)."""
    n = len(hidden)
    keep = _top(attention, round(n * (1 - r)))
    state = {i: list(hidden[i]) for i in keep}
    for i in range(n):
        if i in keep:
            continue
        sims = [loop_cos(hidden[i], hidden[j]) for j in sorted(keep)]
        j = sorted(keep)[sims.index(max(sims))]
        state[j] = [(a + b) / 2 for a, b in zip(state[j], hidden[i])]
    return state


# ---------------------------------------------------------------------------------------------
# hand-built clips
# ---------------------------------------------------------------------------------------------
def scene_clip(n: int, dim: int, scenes: list[int], moving: float, seed: int) -> torch.Tensor:
    """[frames, n, dim] float64: scenes of several frames; in a scene the first ``moving`` share of the places
    change from frame to frame, the others only by a little noise (static), so cuts and static places are real."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in scenes:
        base = torch.randn(n, dim, generator=g, dtype=torch.float64)
        changing = int(n * moving)
        for _ in range(length):
            frame = base + 0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64)
            frame[:changing] = torch.randn(changing, dim, generator=g, dtype=torch.float64)
            out.append(frame)
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


CASES = [  # tokens per frame, dim, scenes, moving share, retention, tau, d, neighbours, max_window
    (16, 6, [3, 5], 0.5, 0.25, 0.8, 0.0, 7, 1024),
    (16, 6, [3, 5], 0.25, 0.5, 0.8, 0.5, 3, 1024),
    (9, 5, [4, 1, 3], 0.4, 0.15, 0.65, 0.0, 7, 2),
    (9, 8, [2, 2, 3], 0.6, 0.4, 0.9, 0.3, 2, 3),
    (16, 4, [6], 0.3, 0.1, 0.5, 0.0, 7, 1024),
    (4, 3, [1, 4], 0.5, 1.0, 0.2, 0.5, 1, 1024),
    (16, 6, [8], 0.0, 0.1, 0.99, 0.25, 7, 1024),
]


@pytest.mark.parametrize("case", CASES)
def test_windows_equal_the_official_loop(case):
    n, dim, scenes, moving, _, tau, _, _, max_window = case
    clip = scene_clip(n, dim, scenes, moving, seed=n + dim)
    as_lists = clip.tolist()
    sims = [[loop_cos(as_lists[f][j], as_lists[f + 1][j]) for j in range(n)] for f in range(len(as_lists) - 1)]
    windows, removed = static_windows(torch.tensor(sims, dtype=torch.float64), tau, max_window)
    assert (windows, float(removed)) == loop_windows(sims, tau, max_window)


def test_windows_follow_the_scenes():
    clip = scene_clip(16, 6, [3, 5], 0.25, seed=1).tolist()
    sims = [[loop_cos(clip[f][j], clip[f + 1][j]) for j in range(16)] for f in range(7)]
    windows, removed = static_windows(torch.tensor(sims, dtype=torch.float64), 0.8, 1024)
    assert windows == [(0, 2), (3, 7)] and removed == 12 * 2 + 12 * 4  # 12 static places in each scene
    assert static_windows(torch.tensor(sims, dtype=torch.float64), 0.8, 1)[0] == [(f, f) for f in range(8)]


def _outer(clip: torch.Tensor, retention: float, tau: float, d: float, neighbours: int, max_window: int,
           beta: float, tail: int = 1) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The criterion's kept positions and the merger's output on a layout with text around the clip."""
    frames, n, dim = clip.shape
    text = 3
    layout = clip_layout(frames, n, text=text, tail=tail)
    hidden = torch.randn(1, layout.seq_len, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    hidden[0, text:text + frames * n] = clip.reshape(-1, dim)
    criterion = HoliTom(retention=retention, tau=tau, d=d, neighbours=neighbours, max_window=max_window)
    criterion.key = "ht"
    ctx = forward_context(layout, stage_layers=(0,), buffers={"ht/hidden0": hidden})
    score = criterion.score(ctx)[0]
    kept_mask = layout.visual & (score[None] > float("-inf"))
    out = HoliTomMerge(criterion="ht", beta=beta).merge_into_kept(hidden, kept_mask, score[None], ctx)
    return kept_mask[0].nonzero().flatten().tolist(), hidden, out


@pytest.mark.parametrize("case", CASES)
def test_kept_and_merged_tokens_equal_the_official_loop(case):
    n, dim, scenes, moving, retention, tau, d, neighbours, max_window = case
    beta = 0.6
    clip = scene_clip(n, dim, scenes, moving, seed=n * dim)
    expect, _ = loop_outer(clip.tolist(), retention, tau, d, neighbours, max_window, beta)
    kept, hidden, out = _outer(clip, retention, tau, d, neighbours, max_window, beta)
    text, frames = 3, len(clip)
    tail = text + frames * n
    assert kept == sorted(text + j for j in expect) + [tail]  # the clip's kept rows and the token in no frame
    want = hidden.clone()
    for j, token in expect.items():
        want[0, text + j] = torch.tensor(token, dtype=torch.float64)
    torch.testing.assert_close(out[0, kept], want[0, kept], rtol=1e-10, atol=1e-12)


def test_static_places_merge_across_the_window_and_count_towards_the_retention():
    """A clip of one still scene (nothing moves): one window; its 16 places are static, 10% of 8 x 16 tokens is
    12.8, over the 16 left r' = 0.8: round(12.8) = 13 static centres on frame 0 and nothing else."""
    clip = scene_clip(16, 6, [8], 0.0, seed=3)
    kept, _, _ = _outer(clip, 0.1, 0.5, 0.0, 7, 1024, 0.6, tail=0)
    assert len(kept) == 13 and all(3 <= j < 3 + 16 for j in kept)


def test_inner_stage_keeps_and_merges_as_the_official_loop():
    """The second stage: the last token's attention at layer K - 1 (a capture here) picks round(n (1 - r))
    visual tokens; the merger folds the others into them in order, (kept + dropped) / 2."""
    g = torch.Generator().manual_seed(4)
    layout = clip_layout(3, 4, text=2, tail=1)  # 13 visual tokens
    hidden = torch.randn(1, layout.seq_len, 5, dtype=torch.float64, generator=g)
    attention = torch.rand(1, layout.seq_len, dtype=torch.float64, generator=g)
    visual = layout.visual[0].nonzero().flatten()
    for r in (0.5, 0.3, 0.0):
        criterion = HoliTom(r=r)
        criterion.key = "ht"
        probe = AttentionRows(layer=2, queries="last")
        ctx = forward_context(layout, stage_layers=(0, 3), stage=1, captures={probe: attention})
        score = criterion.score(ctx)
        kept_mask = layout.visual & (score > float("-inf"))
        expect = loop_inner(hidden[0, visual].tolist(), attention[0, visual].tolist(), r)
        assert kept_mask[0].nonzero().flatten().tolist() == sorted(int(visual[i]) for i in expect)
        out = HoliTomMerge(criterion="ht").merge_into_kept(hidden, kept_mask, score, ctx)
        want = hidden.clone()
        for i, token in expect.items():
            want[0, visual[i]] = torch.tensor(token, dtype=torch.float64)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------
def _recipe(inner: int | None = 18, **params) -> dict:
    merge = {"type": "holitom_merge", "criterion": "holitom", "beta": params.pop("beta", 0.6)}
    stages = [{"layer": 0, "keep": 1.0}] + ([{"layer": inner, "keep": 1.0}] if inner is not None else [])
    return {"name": "holitom-test", "positions": "compact", "reference_depth": 28,
            "criteria": {"holitom": {"type": "holitom", **params}}, "merge": merge,
            "schedule": {"type": "stages", "stages": stages}}


MERGING = {"retention": 0.3, "tau": 0.5, "d": 0.4, "neighbours": 3, "r": 0.5}  # windows of 4, 1 and 3 frames on OneVision
KEEP_ALL = {"retention": 1.0, "tau": 1.0, "r": 0.0}


def _layer_inputs(model, recipe, inputs, layers: tuple[int, ...]) -> tuple[dict[int, torch.Tensor], object]:
    """The hidden states entering the given decoder layers (after any stage there) and the pruner's report."""
    seen: dict[int, torch.Tensor] = {}

    def keep(index: int, args: tuple, kwargs: dict) -> None:
        seen.setdefault(index, kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    handles = []
    with prunekit.apply(model, recipe) as pruner:
        for index in layers:
            layer = model.model.language_model.layers[index]
            handles.append(layer.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: keep(index, args, kwargs), with_kwargs=True))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
    return seen, pruner.last_report


def _check_outer(model, inputs, video: torch.Tensor, frames: int, tail: int, tau: float) -> None:
    """The layer-0 input under MERGING (with ``tau``) equals the loop's kept and merged tokens of the model's own
    features; the clip has windows of one frame and of several."""
    merging = {**MERGING, "tau": tau}
    bare = _layer_inputs(model, _recipe(None, **KEEP_ALL), inputs, (0,))[0][0]  # the model's own layer-0 input
    n = (len(video) - tail) // frames
    clip = bare[0, video[:len(video) - tail]].reshape(frames, n, -1)
    params = {key: merging[key] for key in ("retention", "tau", "d")}
    expect, windows = loop_outer(clip.tolist(), **params, k_max=MERGING["neighbours"], max_window=1024, beta=0.6)
    assert any(e > s for s, e in windows) and any(e == s for s, e in windows)
    pruned, report = _layer_inputs(model, _recipe(None, **merging), inputs, (0,))
    kept = sorted(expect)
    stage = report[0]
    assert stage.kept[0].tolist() == video[kept].tolist() + video[len(video) - tail:].tolist()
    assert int(stage.merged_counts[0]) == 0  # merged in place: no token added
    first, last = int(video[0]), int(video[-1]) + 1
    rows = [torch.tensor(expect[j], dtype=torch.float64) for j in kept]
    want = torch.cat([bare[0, :first], torch.stack(rows), bare[0, video[len(video) - tail:]], bare[0, last:]])
    torch.testing.assert_close(pruned[0][0], want, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def onevision():
    return tiny_family_model("llava_onevision", num_layers=4, seed=5, dtype=torch.float64)


def test_tiny_onevision_keeps_and_merges_the_official_tokens_of_its_video_features(onevision):
    inputs = family_inputs(onevision, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    video = (inputs["input_ids"][0] == onevision.config.video_token_id).nonzero().flatten()
    _check_outer(onevision, inputs, video, inputs["pixel_values_videos"].shape[1], tail=1, tau=0.5)  # + the newline


@pytest.fixture(scope="module")
def qwen():
    return tiny_family_model("qwen2_5_vl", num_layers=4, seed=1, dtype=torch.float64)


def test_tiny_qwen_keeps_and_merges_the_official_tokens_of_its_video_features(qwen):
    inputs = qwen_video_inputs(qwen, [(6, 8, 8)], seed=3)  # 6 frames of 16 tokens
    video = (inputs["input_ids"][0] == qwen.config.video_token_id).nonzero().flatten()
    _check_outer(qwen, inputs, video, 6, tail=0, tau=0.1)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_tiny_model_inner_stage_equals_eager_attention_and_the_official_merge(name, onevision, qwen):
    """The second stage (layer 3 of 4: 18 of 28): its kept tokens are the loop's top round(n (1 - r)) by the last
    token's attention at layer 2 as the eager attention computes it, its rows the loop's sequential merge of the
    layer-2 output."""
    if name == "qwen2_5_vl":
        model, inputs, merging = qwen, qwen_video_inputs(qwen, [(6, 8, 8)], seed=3), {**MERGING, "tau": 0.1}
    else:
        model, merging = onevision, MERGING
        inputs = family_inputs(model, name, batch=1, seed=2, video=True, dtype=torch.float64)
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    captured: dict[str, torch.Tensor] = {}
    layers = model.model.language_model.layers

    def attention_hook(module, args, out) -> None:
        captured.setdefault("weights", out[1])  # [batch, heads, seq, seq]

    def output_hook(module, args, out) -> None:
        captured.setdefault("output", out[0] if isinstance(out, tuple) else out)  # [batch, seq, dim]

    handles = [layers[2].self_attn.register_forward_hook(attention_hook), layers[2].register_forward_hook(output_hook)]
    try:
        seen, report = _layer_inputs(model, _recipe(18, **merging), inputs, (3,))
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    visual = report[0].kept[0]  # the original columns of the visual tokens entering layer 2 (after stage 0)
    columns = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    assert int(report[0].kept_counts[0]) == len(visual) and len(visual) < len(columns)
    first = int(columns[0])  # text before the clip is unchanged: the visual tokens sit right after it
    places = torch.arange(first, first + len(visual))
    attention = captured["weights"][0, :, -1].mean(dim=0)  # [seq]: the last token's row, mean over heads
    output = captured["output"][0]
    expect = loop_inner(output[places].tolist(), attention[places].tolist(), merging["r"])
    assert len(expect) == round(len(visual) * (1 - merging["r"]))
    assert report[1].kept[0].tolist() == [int(visual[i]) for i in sorted(expect)]
    rows = torch.stack([torch.tensor(expect[i], dtype=torch.float64) for i in sorted(expect)])
    want = torch.cat([output[:first], rows, output[first + len(visual):]])
    torch.testing.assert_close(seen[3][0], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_keep_all_is_bit_identical_to_the_bare_model(name, onevision, qwen):
    model = onevision if name == "llava_onevision" else qwen
    if name == "qwen2_5_vl":
        inputs = qwen_video_inputs(model, [(4, 8, 8)], seed=3)
    else:
        inputs = family_inputs(model, name, batch=1, seed=3, video=True, dtype=torch.float64)
    with torch.no_grad():
        bare_logits = model(**inputs).logits
        bare = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunekit.apply(model, _recipe(18, **KEEP_ALL)) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert [int(stage.kept_counts[0]) for stage in pruner.last_report] == [n_video, n_video]
    assert torch.equal(logits, bare_logits) and torch.equal(ids, bare)


def _alone(inputs: dict, row: int) -> dict:
    mask = inputs["attention_mask"][row].bool()
    return {key: value[row][mask][None] if key in ("input_ids", "attention_mask") else value[row:row + 1]
            for key, value in inputs.items()}


@pytest.mark.parametrize("recipe", ["holitom", "merging"])
def test_a_padded_batch_of_two_clips_equals_the_lone_runs(onevision, recipe):
    model = onevision
    chosen = recipe if recipe == "holitom" else _recipe(18, **MERGING)
    inputs = family_inputs(model, "llava_onevision", batch=2, seed=4, video=True, dtype=torch.float64)
    assert bool((inputs["attention_mask"] == 0).any())  # a padded batch
    with prunekit.apply(model, chosen) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report
        for row in range(2):
            alone = _alone(inputs, row)
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            for stage, lone in zip(batch_report, pruner.last_report):
                kept = stage.kept[row]
                assert torch.equal(kept[kept >= 0] - pad, lone.kept[0])
            assert batch_out[row, inputs["input_ids"].shape[1]:].tolist() == out[0, alone["input_ids"].shape[1]:].tolist()


def test_a_padded_batch_of_two_qwen_clips_of_different_lengths_equals_the_lone_runs(qwen):
    model = qwen
    grids = [(4, 8, 8), (6, 8, 12)]  # 4 frames of 16 tokens, 6 frames of 24
    inputs = qwen_video_inputs(model, grids, seed=5)
    with prunekit.apply(model, _recipe(18, **MERGING)) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report
        for row, grid in enumerate(grids):
            alone = qwen_video_inputs(model, [grid], seed=5)
            alone["pixel_values_videos"] = inputs["pixel_values_videos"][sum(t * h * w for t, h, w in grids[:row]):][
                :grid[0] * grid[1] * grid[2]]
            alone["input_ids"] = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
            alone["attention_mask"] = torch.ones_like(alone["input_ids"])
            alone["mm_token_type_ids"] = (alone["input_ids"] == model.config.video_token_id).long() * 2
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            for stage, lone in zip(batch_report, pruner.last_report):
                kept = stage.kept[row]
                assert torch.equal(kept[kept >= 0] - pad, lone.kept[0])
            assert batch_out[row, inputs["input_ids"].shape[1]:].tolist() == out[0, alone["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", ["llava_onevision", "video_llava", "qwen2_5_vl"])
@pytest.mark.parametrize("recipe", ["holitom", "holitom-15", "holitom-outer", "merging"])
def test_recipes_generate_on_video_families(name, recipe):
    model = tiny_family_model(name, num_layers=4, seed=1, dtype=torch.float64)
    if name == "qwen2_5_vl":
        inputs = qwen_video_inputs(model, [(4, 8, 8)], seed=3)
    else:
        inputs = family_inputs(model, name, batch=1, seed=3, video=True, dtype=torch.float64)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    with torch.no_grad():
        bare = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with prunekit.apply(model, recipe if recipe != "merging" else _recipe(18, **MERGING)) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == bare.shape
    counts = [int(stage.kept_counts[0]) for stage in pruner.last_report]
    assert 0 < counts[0] < n_video and all(int(stage.merged_counts[0]) == 0 for stage in pruner.last_report)
    if len(counts) == 2:  # the inner stage keeps round(n (1 - r)) of what the outer stage kept
        assert counts[1] == round(counts[0] * 0.5)


@pytest.mark.parametrize("recipe", ["holitom", "holitom-outer"])
def test_still_images_are_kept_whole(recipe):
    model = tiny_family_model("llava_onevision", num_layers=4, seed=1, dtype=torch.float64)
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=1, dtype=torch.float64)
    with torch.no_grad():
        bare = model(**inputs).logits
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        logits = model(**inputs).logits
    n_visual = int(pruner.last_report.visual_tokens[0])
    assert [int(stage.kept_counts[0]) for stage in pruner.last_report] == [n_visual] * len(pruner.last_report)
    assert torch.equal(logits, bare)  # nothing merged either


@pytest.mark.parametrize("field, value, words", [
    ("retention", 0.0, "retention"), ("retention", 1.5, "retention"), ("tau", 1.5, "tau"), ("d", -0.1, "d "),
    ("neighbours", 0, "neighbours"), ("neighbours", 2.5, "neighbours"), ("max_window", 0, "max_window"),
    ("r", 1.0, "r "), ("r", -0.5, "r "),
])
def test_bad_criterion_parameters_name_the_value(field, value, words):
    with pytest.raises(prunekit.RecipeError, match=words) as error:
        prunekit.load_recipe(_recipe(18, **{field: value}))
    assert repr(value) in str(error.value)


def test_bad_merger_parameters_and_stages_are_named(onevision):
    recipe = _recipe(18)
    recipe["merge"]["beta"] = 1.5
    with pytest.raises(prunekit.RecipeError, match="beta") as error:
        prunekit.load_recipe(recipe)
    assert "1.5" in str(error.value)
    for stages in ([{"layer": 1, "keep": 1.0}], [{"layer": 0, "keep": 1.0}, {"layer": 1, "keep": 1.0}]):
        recipe = _recipe(None)
        recipe.pop("reference_depth")
        recipe["schedule"]["stages"] = stages
        with pytest.raises(prunekit.RecipeError, match="layer 0") as error:
            prunekit.apply(onevision, recipe)
        assert str([stage["layer"] for stage in stages]) in str(error.value)
    recipe = _recipe(18, **MERGING)
    recipe["merge"]["criterion"] = "nope"
    inputs = family_inputs(onevision, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="'nope'"), prunekit.apply(onevision, recipe), torch.no_grad():
        onevision(**inputs)
