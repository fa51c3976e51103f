"""PruneVid (issue 16): the prunevid criterion and prunevid_merge merger against a loop over the official formulas."""

from __future__ import annotations

import math

import pytest
import torch
from prunekit.criteria.prunevid import (
    PruneVid,
    PruneVidMerge,
    attention_keep,
    plan_clip,
    refine_segments,
    segment_sizes,
)

import prunekit
from criteria_helpers import loop_cos, loop_mean
from prunekit.layout import TokenLayout, layout_from_ids
from prunekit.testing import (
    family_inputs,
    forward_context,
    qwen_video_inputs,
    tiny_family_model,
)


# ---------------------------------------------------------------------------------------------
# the official PLLaVA PruneVid (merge_frames_dynamic, VTPWindowCache), re-derived as Python loops
# ---------------------------------------------------------------------------------------------


def loop_dpc_knn(tokens: list[list[float]], cluster_num: int, k: int) -> tuple[list[int], list[int]]:
    """cluster_dpc_knn: the centres (index_down, best first) and each token's cluster (idx_cluster)."""
    m, dim = len(tokens), len(tokens[0])
    dist = [[math.sqrt(sum((a - b) ** 2 for a, b in zip(tokens[i], tokens[j]))) / math.sqrt(dim) for j in range(m)]
            for i in range(m)]
    density = []
    for i in range(m):
        nearest = sorted(dist[i])[:min(k, m)]
        density.append(math.exp(-sum(x * x for x in nearest) / len(nearest)))
    dist_max = max(max(row) for row in dist)
    score = [min(dist[i][j] if density[j] > density[i] else dist_max for j in range(m)) * density[i]
             for i in range(m)]
    index_down = sorted(range(m), key=lambda i: (-score[i], i))[:cluster_num]
    idx_cluster = [min(range(cluster_num), key=lambda c: (dist[index_down[c]][i], c)) for i in range(m)]
    for c, i in enumerate(index_down):
        idx_cluster[i] = c
    return index_down, idx_cluster


def loop_refine(cluster_idx: list[int]) -> list[int]:
    """refine_clusters, step by step as the official loop does it."""
    n = len(cluster_idx)
    refined = list(cluster_idx)
    segment_info = {}
    for label in sorted(set(cluster_idx)):
        indices = [i for i in range(n) if cluster_idx[i] == label]
        segments, start, prev = [], indices[0], indices[0]
        for idx in indices[1:]:
            if idx == prev + 1:
                prev = idx
            else:
                segments.append((start, prev))
                start = prev = idx
        segments.append((start, prev))
        segment_info[label] = segments
    for segments in segment_info.values():
        max_length = max(end - start + 1 for start, end in segments)
        for start, end in segments:
            if max_length == 1 or end - start + 1 != max_length:
                for i in range(start, end + 1):
                    refined[i] = -1
    idx = 0
    while idx < n:
        if refined[idx] != -1:
            idx += 1
            continue
        start = idx
        while idx < n and refined[idx] == -1:
            idx += 1
        end = idx - 1
        left_label, left_length, right_label, right_length = None, 0, None, 0
        if start > 0:
            left_label = refined[start - 1]
            l_idx = start - 1
            while l_idx >= 0 and refined[l_idx] == left_label:
                l_idx -= 1
            left_length = start - l_idx - 1
        if end < n - 1:
            right_label = refined[end + 1]
            r_idx = end + 1
            while r_idx < n and refined[r_idx] == right_label:
                r_idx += 1
            right_length = r_idx - end - 1
        if left_length > right_length:
            new_label = left_label
        elif right_length > left_length:
            new_label = right_label
        else:
            new_label = left_label if left_label is not None else right_label
        for i in range(start, end + 1):
            refined[i] = 0 if new_label is None else new_label
    return refined


def loop_prunevid(frames: list[list[list[float]]], tau: float, tsr: float, cr: float, k: int, min_cluster: int):
    """merge_frames_dynamic on one clip: the window sizes and the official output tokens in order, each as
    (row of the in-place layout, "static" or "dynamic", merged vector); a static token's row is its centre
    cell in the window's first frame, a dynamic token's its centre cell in its frame (row = frame * n + cell)."""
    n_frames, n = len(frames), len(frames[0])
    _, idx = loop_dpc_knn([loop_mean(frame) for frame in frames], max(int(n_frames * tsr), 1), k)
    labels = loop_refine(idx)
    windows, start = [], 0
    for i in range(1, n_frames + 1):
        if i == n_frames or labels[i] != labels[start]:
            windows.append(i - start)
            start = i

    def spatial(features: list[list[float]], cells: list[int]) -> list[tuple[int, list[float]]]:
        if len(features) <= min_cluster:
            return list(zip(cells, features))
        down, assign = loop_dpc_knn(features, max(int(len(features) * cr), 1), k)
        return [(cells[centre], loop_mean([features[i] for i in range(len(features)) if assign[i] == c]))
                for c, centre in enumerate(down)]

    out, static_sizes, dynamic_sizes, start = [], [], [], 0
    for w_size in windows:
        current = frames[start:start + w_size]
        static = []
        for cell in range(n):
            if w_size > 1:  # the official (sum of all pairs - W) / (W (W - 1)); a one-frame window: 0 / 0, none
                total = sum(loop_cos(current[w][cell], current[t][cell]) for w in range(w_size) for t in range(w_size))
                if (total - w_size) / (w_size * (w_size - 1)) > tau:
                    static.append(cell)
        dynamic = [cell for cell in range(n) if cell not in static]
        merged = spatial([loop_mean([current[w][cell] for w in range(w_size)]) for cell in static], static)
        out += [(start * n + cell, "static", vector) for cell, vector in merged]
        static_sizes.append(len(merged))
        count = 0
        for w in range(w_size):
            merged = spatial([current[w][cell] for cell in dynamic], dynamic)
            out += [((start + w) * n + cell, "dynamic", vector) for cell, vector in merged]
            count += len(merged)
        dynamic_sizes.append(count)
        start += w_size
    return windows, out, static_sizes, dynamic_sizes


def loop_process_attention(attention: list[float], static_sizes: list[int], dynamic_sizes: list[int],
                           window_sizes: list[int], alpha: float) -> list[int]:
    """VTPWindowCache.process_attention: the kept indices of the official token order, sorted."""
    kept, start = [], 0
    for static_size, dynamic_size, window_size in zip(static_sizes, dynamic_sizes, window_sizes):
        window = attention[start:start + static_size + dynamic_size]
        static = window[:static_size]
        kept += [start + i for i in sorted(range(static_size), key=lambda i: (-static[i], i))[:int(static_size * alpha)]]
        per_frame = dynamic_size // window_size
        for f in range(window_size):
            row = window[static_size + f * per_frame:static_size + (f + 1) * per_frame]
            top = sorted(range(per_frame), key=lambda i: (-row[i], i))[:int(per_frame * alpha)]
            kept += [start + static_size + f * per_frame + i for i in top]
        start += static_size + dynamic_size
    return sorted(kept)


# ---------------------------------------------------------------------------------------------
# hand-built clips
# ---------------------------------------------------------------------------------------------
def scene_clip(n: int, dim: int, scenes: list[int], still: float, seed: int) -> torch.Tensor:
    """[frames, n, dim] float64: scenes of frames; in a scene the first ``still`` share of the cells barely move
    (the scene's token plus small noise), the others change from frame to frame."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in scenes:
        base = torch.randn(n, dim, generator=g, dtype=torch.float64)
        moving = torch.arange(n) >= int(n * still)
        for _ in range(length):
            noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
            out.append(base + torch.where(moving[:, None], 2.0, 0.1) * noise)
    return torch.stack(out)


def clip_layout(frames: int, n: int, text: int = 2, tail: int = 0) -> TokenLayout:
    """One sample: ``text`` tokens, ``frames`` frames of ``n`` tokens (then ``tail`` visual tokens in no frame), text."""
    seq = 2 * text + frames * n + tail
    visual = torch.zeros(1, seq, dtype=torch.bool)
    visual[0, text:text + frames * n + tail] = True
    layout = layout_from_ids(torch.zeros(1, seq, dtype=torch.long), visual, None)
    index = torch.arange(frames * n)
    layout.frame_index[0, text:text + frames * n] = index // n
    layout.grid_row[0, text:text + frames * n] = (index % n) // 4
    layout.grid_col[0, text:text + frames * n] = index % 4
    return layout


CASES = [  # scenes, tokens per frame, dim, still share, tau, temporal_segment_ratio, cluster_ratio, k, min_cluster
    ([4, 4], 16, 6, 0.5, 0.8, 0.25, 0.5, 7, 14),
    ([3, 5, 4], 20, 5, 0.6, 0.8, 0.25, 0.5, 7, 14),
    ([2, 3, 3], 12, 4, 0.5, 0.5, 0.5, 0.5, 3, 4),
    ([6], 16, 6, 0.25, 0.8, 0.25, 0.3, 7, 3),
    ([1, 4, 2, 5], 9, 8, 0.5, 0.9, 0.5, 0.6, 2, 2),
    ([3, 3], 16, 6, 0.5, 1.0, 0.25, 1.0, 7, 14),  # the keep-all setting: nothing static, every token its own cluster
    ([2, 2, 2], 15, 3, 0.4, -1.0, 1.0, 0.2, 4, 0),  # every cell static, a cluster per frame
]


@pytest.mark.parametrize("case", CASES)
def test_refine_and_segments_equal_the_official_loop(case):
    scenes, n, dim, still, _, tsr, _, k, _ = case
    clip = scene_clip(n, dim, scenes, still, seed=n + dim)
    windows, *_ = loop_prunevid(clip.tolist(), 2.0, tsr, 1.0, k, 10**6)
    assert segment_sizes(clip.mean(dim=1), tsr, k) == windows
    g = torch.Generator().manual_seed(len(scenes))
    for _ in range(30):  # random label sequences, including one-frame runs, ties and a label split in two
        labels = torch.randint(0, 4, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        assert refine_segments(labels) == loop_refine(labels), labels


@pytest.mark.parametrize("case", CASES)
def test_merge_plan_and_merged_tokens_equal_the_official_loop(case):
    """The kept rows (one per official output token), each one's merged token, through the criterion and merger."""
    scenes, n, dim, still, tau, tsr, cr, k, min_cluster = case
    frames = sum(scenes)
    clip = scene_clip(n, dim, scenes, still, seed=frames * n)
    windows, official, _, _ = loop_prunevid(clip.tolist(), tau, tsr, cr, k, min_cluster)
    plan = plan_clip(clip, tau, tsr, cr, k, min_cluster)
    assert plan.sizes == windows
    text = 3
    layout = clip_layout(frames, n, text=text, tail=1)
    hidden = torch.randn(1, layout.seq_len, dim, dtype=torch.float64)
    hidden[0, text:text + frames * n] = clip.reshape(-1, dim)
    criterion = PruneVid(tau=tau, temporal_segment_ratio=tsr, cluster_ratio=cr, k=k, min_cluster=min_cluster)
    criterion.key = "pv"
    ctx = forward_context(layout, stage_layers=(0,), buffers={"pv/hidden0": hidden})
    score = criterion.score(ctx)[0]
    video = torch.arange(text, text + frames * n)
    kept = (score[video] > float("-inf")).nonzero().flatten().tolist()
    assert kept == sorted(row for row, _, _ in official)  # one kept row per official token
    assert float(score[text + frames * n]) > float(score[video].max())  # the token in no frame stays
    kept_mask = layout.visual & (score[None] > float("-inf"))
    out = PruneVidMerge(criterion="pv").merge_into_kept(hidden, kept_mask, score[None], ctx)
    expect = hidden.clone()
    for row, _, vector in official:
        expect[0, text + row] = torch.tensor(vector, dtype=torch.float64)
    torch.testing.assert_close(out[0, kept_mask[0]], expect[0, kept_mask[0]], rtol=1e-10, atol=1e-12)
    assert torch.equal(out[0, ~kept_mask[0]], hidden[0, ~kept_mask[0]])  # dropped rows and text untouched


def test_the_clips_cover_both_kinds_and_clustering():
    """The hand-built cases merge static cells, cluster static and dynamic groups, and cut into several segments."""
    kinds, clustered, cuts = set(), False, False
    for scenes, n, dim, still, tau, tsr, cr, k, min_cluster in CASES:
        windows, official, _, _ = loop_prunevid(scene_clip(n, dim, scenes, still, seed=sum(scenes) * n).tolist(),
                                                tau, tsr, cr, k, min_cluster)
        kinds |= {kind for _, kind, _ in official}
        clustered |= len(official) < sum(scenes) * n // 2
        cuts |= len(windows) > 1
    assert kinds == {"static", "dynamic"} and clustered and cuts


@pytest.mark.parametrize("case", CASES)
def test_attention_stage_equals_the_official_selection(case):
    """Each window's static tokens and each frame's dynamic tokens keep their top int(c * alpha) by attention."""
    scenes, n, dim, still, tau, tsr, cr, k, min_cluster = case
    clip = scene_clip(n, dim, scenes, still, seed=sum(scenes) * n)
    windows, official, static_sizes, dynamic_sizes = loop_prunevid(clip.tolist(), tau, tsr, cr, k, min_cluster)
    plan = plan_clip(clip, tau, tsr, cr, k, min_cluster)
    g = torch.Generator().manual_seed(n)
    rows = sorted(row for row, _, _ in official)  # the kept rows in sequence order
    attention = dict(zip(rows, torch.rand(len(rows), generator=g, dtype=torch.float64).tolist()))
    for alpha in (0.4, 0.75, 1.0):
        chosen = loop_process_attention([attention[row] for row, _, _ in official], static_sizes, dynamic_sizes,
                                         windows, alpha)
        expect = sorted(official[i][0] for i in chosen)
        group = plan.group.flatten()[rows]
        keep = attention_keep(torch.tensor([attention[row] for row in rows], dtype=torch.float64), group, alpha)
        assert [row for row, kept in zip(rows, keep.tolist()) if kept] == expect


# ---------------------------------------------------------------------------------------------
# tiny models
# ---------------------------------------------------------------------------------------------
SMALL = {"tau": 0.3, "temporal_segment_ratio": 0.5, "cluster_ratio": 0.5, "k": 3, "min_cluster": 3, "alpha": 0.5}
MIXED_TAU = {"llava_onevision": 0.65, "qwen2_5_vl": 0.22}  # between the cells' similarities: some static, some not
KEEP_ALL = {"tau": 1.0, "cluster_ratio": 1.0, "alpha": 1.0}


def _recipe(stages: tuple[int, ...] = (0, 2), **params) -> dict:
    return {"name": "prunevid-test", "positions": "compact", "criteria": {"prunevid": {"type": "prunevid", **params}},
            "merge": {"type": "prunevid_merge", "criterion": "prunevid"},
            "schedule": {"type": "stages", "stages": [{"layer": layer, "keep": 1.0} for layer in stages]}}


def _layer0_inputs(model, recipe, inputs) -> tuple[torch.Tensor, object]:
    """The hidden states entering decoder layer 0 (after a layer-0 stage) and the pruner's last report."""
    seen = []
    layer = model.model.language_model.layers[0]
    with prunekit.apply(model, recipe) as pruner:  # hooked after prunekit's: sees the pruned input
        handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
            (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
    return seen[0], pruner.last_report


def _video_positions(model, inputs) -> tuple[torch.Tensor, int]:
    """Sample 0's video-token columns in frames (OneVision's closing newline left out) and the tokens per frame."""
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    if "video_grid_thw" in inputs:
        _, h, w = inputs["video_grid_thw"][0].tolist()
        return video, h * w // model.config.vision_config.spatial_merge_size ** 2
    frames = inputs["pixel_values_videos"].shape[1]
    return video[:-1], (len(video) - 1) // frames


@pytest.fixture(scope="module")
def onevision():
    return tiny_family_model("llava_onevision", num_layers=4, seed=5, dtype=torch.float64)


@pytest.fixture(scope="module")
def qwen():
    return tiny_family_model("qwen2_5_vl", num_layers=4, seed=1, dtype=torch.float64)


def _family(name: str, attn_implementation: str = "sdpa"):
    if name == "llava_onevision":
        model = tiny_family_model(name, num_layers=4, seed=5, dtype=torch.float64, attn_implementation=attn_implementation)
        return model, family_inputs(model, name, batch=1, seed=2, video=True, dtype=torch.float64)
    model = tiny_family_model(name, num_layers=4, seed=1, dtype=torch.float64, attn_implementation=attn_implementation)
    return model, qwen_video_inputs(model, [(6, 8, 8)], seed=2)


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_tiny_models_keep_merge_and_select_the_official_tokens_of_their_video_features(name):
    """Stage 1 against the loop on the model's own layer-0 video features; stage 2 against the official selection
    on the model's own eager attention weights of the layer before it, over the merged sequence."""
    model, inputs = _family(name, "eager")
    bare, _ = _layer0_inputs(model, _recipe((0,), **KEEP_ALL), inputs)  # keep-all: the model's own layer-0 input
    video, n = _video_positions(model, inputs)
    clip = bare[0, video].reshape(len(video) // n, n, -1)
    params = {**{key: SMALL[key] for key in ("temporal_segment_ratio", "cluster_ratio", "k", "min_cluster")},
              "tau": MIXED_TAU[name]}
    windows, official, static_sizes, dynamic_sizes = loop_prunevid(
        clip.tolist(), params["tau"], params["temporal_segment_ratio"], params["cluster_ratio"], params["k"],
        params["min_cluster"])
    assert {kind for _, kind, _ in official} == {"static", "dynamic"} and len(official) < len(video) // 2
    merged, report = _layer0_inputs(model, _recipe((0,), **params), inputs)
    rows = sorted(row for row, _, _ in official)
    tail = [int(j) for j in (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
            if int(j) not in video.tolist()]  # OneVision's newline: kept
    assert report[0].kept[0].tolist() == video[rows].tolist() + tail
    assert int(report[0].merged_counts[0]) == 0  # merged in place: no token added
    vectors = {row: torch.tensor(vector, dtype=torch.float64) for row, _, vector in official}
    first, last = int(video[0]), int(video[-1])
    expect = torch.cat([bare[0, :first], torch.stack([vectors[row] for row in rows]), bare[0, last + 1:]])
    torch.testing.assert_close(merged[0], expect, rtol=1e-10, atol=1e-12)
    # stage 2 at layer 2: the eager attention of layer 1 on the merged sequence, max over heads and question rows
    with prunekit.apply(model, _recipe((0,), **params)), torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions[1][0]  # [heads, seq', seq']
    kept_columns = torch.arange(first, first + len(rows))  # the merged video rows of the shorter sequence
    question = torch.arange(first + len(rows) + len(tail), attentions.shape[-1])
    per_row = attentions[:, question][:, :, kept_columns].amax(dim=(0, 1)).tolist()  # [len(rows)]
    by_row = dict(zip(rows, per_row))
    chosen = loop_process_attention([by_row[row] for row, _, _ in official], static_sizes, dynamic_sizes, windows,
                                    SMALL["alpha"])
    with prunekit.apply(model, _recipe((0, 2), **params, alpha=SMALL["alpha"])) as pruner, torch.no_grad():
        model(**inputs)
    second = pruner.last_report[1]
    assert second.kept[0].tolist() == video[sorted(official[i][0] for i in chosen)].tolist() + tail


@pytest.mark.parametrize("name", ["llava_onevision", "qwen2_5_vl"])
def test_keep_all_is_bit_identical_to_the_bare_model(name):
    model, inputs = _family(name)
    with torch.no_grad():
        bare_logits = model(**inputs).logits
        bare = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunekit.apply(model, _recipe((0, 2), **KEEP_ALL)) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert [int(stage.kept_counts[0]) for stage in pruner.last_report] == [n_video, n_video]
    assert torch.equal(logits, bare_logits) and torch.equal(ids, bare)


def _alone(inputs: dict, row: int) -> dict:
    mask = inputs["attention_mask"][row].bool()
    return {key: value[row][mask][None] if key in ("input_ids", "attention_mask") else value[row:row + 1]
            for key, value in inputs.items()}


def _check_lone_runs(model, recipe, inputs, lone_inputs) -> None:
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report
        for row, alone in enumerate(lone_inputs):
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            for stage, lone in zip(batch_report, pruner.last_report):
                kept = stage.kept[row]
                assert torch.equal(kept[kept >= 0] - pad, lone.kept[0])
            lone_ids = out[0, alone["input_ids"].shape[1]:].tolist()  # shorter when it stopped at the end token
            batch_ids = batch_out[row, inputs["input_ids"].shape[1]:].tolist()
            assert batch_ids[:len(lone_ids)] == lone_ids
            assert set(batch_ids[len(lone_ids):]) <= {model.generation_config.pad_token_id}


def test_a_padded_batch_of_two_onevision_clips_equals_the_lone_runs(onevision):
    inputs = family_inputs(onevision, "llava_onevision", batch=2, seed=4, video=True, dtype=torch.float64)
    assert bool((inputs["attention_mask"] == 0).any())  # a padded batch
    _check_lone_runs(onevision, _recipe((0, 2), **SMALL), inputs, [_alone(inputs, row) for row in range(2)])


def test_a_padded_batch_of_two_qwen_clips_of_different_lengths_equals_the_lone_runs(qwen):
    grids = [(4, 8, 8), (6, 8, 12)]  # 4 frames of 16 tokens, 6 frames of 24
    inputs = qwen_video_inputs(qwen, grids, seed=5)
    lone = []
    for row, grid in enumerate(grids):
        alone = qwen_video_inputs(qwen, [grid], seed=5)
        alone["pixel_values_videos"] = inputs["pixel_values_videos"][sum(t * h * w for t, h, w in grids[:row]):][
            :grid[0] * grid[1] * grid[2]]
        alone["input_ids"] = inputs["input_ids"][row][inputs["attention_mask"][row].bool()][None]
        alone["attention_mask"] = torch.ones_like(alone["input_ids"])
        alone["mm_token_type_ids"] = (alone["input_ids"] == qwen.config.video_token_id).long() * 2
        lone.append(alone)
    _check_lone_runs(qwen, _recipe((0, 2), **SMALL), inputs, lone)


@pytest.mark.parametrize("name", ["llava_onevision", "video_llava", "qwen2_5_vl"])
@pytest.mark.parametrize("recipe", ["prunevid", "prunevid-merge", "small"])
def test_recipes_generate_on_video_families(name, recipe):
    model = tiny_family_model(name, num_layers=12 if recipe == "prunevid" else 4, seed=1, dtype=torch.float64)
    if name == "qwen2_5_vl":
        inputs = qwen_video_inputs(model, [(4, 8, 8)], seed=3)
    else:
        inputs = family_inputs(model, name, batch=1, seed=3, video=True, dtype=torch.float64)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    with torch.no_grad():
        bare = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    with prunekit.apply(model, recipe if recipe != "small" else _recipe((0, 2), **SMALL)) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == bare.shape
    counts = [int(stage.kept_counts[0]) for stage in pruner.last_report]
    assert 0 < counts[-1] <= n_video and counts == sorted(counts, reverse=True)
    if recipe != "prunevid-merge":  # tiny frames: no cell static at tau 0.8, too few tokens to cluster; alpha prunes
        assert counts[-1] < n_video
    assert all(int(stage.merged_counts[0]) == 0 for stage in pruner.last_report)  # merged in place


def test_still_images_are_kept_whole():
    model = tiny_family_model("llava_onevision", num_layers=4, seed=1)
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=1)
    with prunekit.apply(model, _recipe((0, 2), **SMALL)) as pruner, torch.no_grad():
        model(**inputs)
    n_visual = int(pruner.last_report.visual_tokens[0])
    assert [int(stage.kept_counts[0]) for stage in pruner.last_report] == [n_visual, n_visual]


@pytest.mark.parametrize("field, value", [
    ("tau", 1.5), ("tau", -2.0), ("temporal_segment_ratio", 0.0), ("temporal_segment_ratio", 1.2),
    ("cluster_ratio", 0.0), ("cluster_ratio", -0.5), ("alpha", 0.0), ("alpha", 2.0), ("k", 0), ("k", 2.5),
    ("min_cluster", -1), ("min_cluster", True),
])
def test_bad_parameters_name_the_value_and_what_is_valid(field, value):
    with pytest.raises(prunekit.RecipeError, match=field) as error:
        prunekit.load_recipe(_recipe(**{field: value}))
    message = str(error.value)
    assert repr(value) in message or f"'{value}'" in message  # the value, then what is valid
    assert "must be" in message or "could not be converted to" in message  # ours, or the schema's type check


@pytest.mark.parametrize("stages", [(1,), (0, 1), (0, 2, 3)])
def test_stages_that_do_not_fit_are_named(onevision, stages):
    with pytest.raises(prunekit.RecipeError, match="layer 0") as error:
        prunekit.apply(onevision, _recipe(stages, **SMALL))
    assert str(list(stages)) in str(error.value)


def test_a_merger_without_its_criterion_is_named(onevision):
    recipe = _recipe((0,), **SMALL)
    recipe["merge"]["criterion"] = "nope"
    inputs = family_inputs(onevision, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    with pytest.raises(ValueError, match="'nope'"), prunekit.apply(onevision, recipe), torch.no_grad():
        onevision(**inputs)


def test_the_attention_stage_only_drops_rows(onevision):
    """Layer 2's input under a two-stage recipe is layer 1's output at the rows stage 2 keeps: nothing is merged there."""
    inputs = family_inputs(onevision, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    layers = onevision.model.language_model.layers
    seen: dict[str, torch.Tensor] = {}

    def output_of_1(module, args, output) -> None:
        seen["out1"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    def input_of_2(module, args, kwargs) -> None:
        seen["in2"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().clone()

    with prunekit.apply(onevision, _recipe((0, 2), **SMALL)) as pruner:  # hooked after prunekit's
        hooks = [layers[1].register_forward_hook(output_of_1),
                 layers[2].register_forward_pre_hook(input_of_2, with_kwargs=True)]
        try:
            with torch.no_grad():
                onevision(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
    first, second = pruner.last_report
    assert int(second.kept_counts[0]) < int(first.kept_counts[0])
    text = (inputs["input_ids"][0] != onevision.config.video_token_id).nonzero().flatten().tolist()
    columns_1 = sorted(text + first.kept[0].tolist())  # the stage-1 sequence, as input columns
    columns_2 = sorted(text + second.kept[0].tolist())
    rows = [columns_1.index(column) for column in columns_2]
    assert seen["in2"].shape[1] == len(rows) and torch.equal(seen["in2"][0], seen["out1"][0, rows])
