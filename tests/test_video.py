"""Video: frames in the token layout, the blind video baselines and DyCoke's temporal token merging (issue 16)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from omegaconf import OmegaConf

import prunekit
from prunekit.api import Criterion
from prunekit.hookspecs import hookimpl
from prunekit.layout import TokenLayout, layout_from_ids
from prunekit.plugins import register_plugin, unregister_plugin
from prunekit.probes import LayerInput
from prunekit.sequence import top_visual
from prunekit.testing import END_ID, START_ID, family_inputs, forward_context, tiny_family_model

from prunekit.criteria.video import DyCokeTTM, FrameDifference, UniformFrames, dycoke_keep_count

VIDEO_RECIPES = ("uniform-frames", "frame-difference", "dycoke", "dycoke-own-count")
FAMILIES = ("video_llava", "llava_onevision", "qwen2_5_vl", "qwen3_vl")
RECIPES_DIR = prunekit.__path__[0] + "/recipes"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@dataclass
class _RecordLayout(Criterion):
    """Records the layout and the hidden states entering the prune layer (a test probe)."""

    name: ClassVar[str] = "test_video_record_layout"
    seen: ClassVar[list] = []

    def probes(self, stage_layers, num_layers):
        return [LayerInput(layer=layer) for layer in stage_layers]

    def observe(self, ctx, probe, inputs, output):
        ctx.buffers[f"{self.key}/hidden"] = inputs.detach()

    def score(self, ctx):
        _RecordLayout.seen.append((ctx.layout, ctx.buffers.pop(f"{self.key}/hidden")))
        return ctx.layout.visual.double()


class _Plugin:
    @hookimpl
    def prunekit_add_criteria(self):
        return [_RecordLayout]


@pytest.fixture(scope="module")
def recorder():
    name = register_plugin(_Plugin(), name="test_video_record_layout")
    yield
    unregister_plugin(name)


def _recorded(model, inputs) -> tuple[TokenLayout, torch.Tensor]:
    """The layout and the decoder's input embeddings of one prefill of ``inputs``, as criteria see them."""
    _RecordLayout.seen.clear()
    recipe = {"name": "record", "criteria": {"rec": {"type": _RecordLayout.name}},
              "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 1.0}]}}
    with prunekit.apply(model, recipe), torch.no_grad():
        model(**inputs)
    return _RecordLayout.seen[-1]


def qwen_video_inputs(model, grids: list[tuple[int, int, int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded prompts, one video per sample with the given ``(t, h, w)`` patch grid."""
    g = torch.Generator().manual_seed(seed)
    merge = model.config.vision_config.spatial_merge_size ** 2
    rows = []
    for i, (t, h, w) in enumerate(grids):
        words = torch.randint(3, 250, (3 + 2 * i,), generator=g).tolist()
        rows.append([1, *words, START_ID, *([model.config.video_token_id] * (t * h * w // merge)), END_ID, 7, 8, 9])
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    grid = torch.tensor(grids)
    pixel = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 4 * 4, generator=g).to(model.dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixel, "video_grid_thw": grid,
            "mm_token_type_ids": (ids == model.config.video_token_id).long() * 2}


def _alone(inputs: dict, row: int) -> dict:
    """One sample of a padded batch without its padding, with its own video."""
    mask = inputs["attention_mask"][row].bool()
    out = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[key] = value[row][mask][None]
        elif key == "pixel_values_videos" and "video_grid_thw" in inputs:
            counts = inputs["video_grid_thw"].prod(dim=1).tolist()
            out[key] = value[sum(counts[:row]):sum(counts[:row + 1])]
        else:
            out[key] = value[row:row + 1]
    return out


def _inputs(family, model, batch=1, seed=0):
    if family == "qwen2_5_vl":
        return qwen_video_inputs(model, [(4, 8, 8), (2, 8, 12)][:batch], seed=seed)
    inputs = family_inputs(model, family, batch=batch, seed=seed, video=True)
    return inputs


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param, tiny_family_model(request.param, num_layers=4, seed=1, dtype=torch.float64)


def _with_keep(recipe: str, keep: float | None = None, count: int | None = None) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(f"{RECIPES_DIR}/{recipe}.yaml"))
    stage = {"layer": 0, "keep": keep} if count is None else {"layer": 0, "count": count}
    cfg["schedule"] = {"type": "stages", "stages": [stage]}
    if keep == 1.0 and "decode" in cfg:  # keep everything in decode steps too: a selection of all n
        cfg["decode"]["prune"] = 0.0
    return cfg


# ---------------------------------------------------------------------------------------------
# frames in the layout
# ---------------------------------------------------------------------------------------------
def test_layout_without_frames_fills_minus_one_and_gathers_them():
    visual = torch.tensor([[False, True, True, False]])
    layout = layout_from_ids(torch.zeros(1, 4, dtype=torch.long), visual, None)
    assert layout.frame_index.tolist() == [[-1] * 4] and layout.grid_row.tolist() == [[-1] * 4]
    layout.frame_index[0, 1:3] = torch.tensor([0, 1])
    gathered = layout.gather(torch.tensor([[0, 2]]), torch.tensor([[True, False]]))
    assert gathered.frame_index.tolist() == [[-1, 1]]


def next_video_inputs(model, batch: int = 2, frames: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """LLaVA-NeXT-Video prompts with one ``frames``-frame clip each (family_inputs gives it images only)."""
    g = torch.Generator().manual_seed(seed)
    pixel = torch.randn(batch, frames, 3, 24, 24, generator=g).to(model.dtype)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=pixel[:1]).pooler_output
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    n = int(features.numel() // features.shape[-1])
    ids = torch.tensor([[1, 5, 6, *([model.config.video_token_id] * n), 7, 8]] * batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": pixel}


@pytest.mark.parametrize("name", ["video_llava", "llava_onevision", "llava_next_video"])
def test_frames_of_llava_families_match_each_frame_encoded_alone(recorder, name):
    """Every video token sits at the frame and grid cell whose features it carries: the frame run alone through
    the model's own video path gives that token's embedding at the cell's place."""
    model = tiny_family_model(name, num_layers=2, seed=2, dtype=torch.float64)
    if name == "llava_next_video":
        inputs = next_video_inputs(model, seed=1)
    else:
        inputs = family_inputs(model, name, batch=2, seed=1, video=True, dtype=torch.float64)
    layout, hidden = _recorded(model, inputs)
    pixel = inputs["pixel_values_videos"]
    frames = pixel.shape[1]
    for b in range(2):
        video = (inputs["input_ids"][b] == model.config.video_token_id).nonzero().flatten()
        assert sorted(layout.frame_index[b, video].unique().tolist())[-frames:] == list(range(frames))
        for f in range(frames):
            with torch.no_grad():
                alone = model.model.get_video_features(pixel_values_videos=pixel[b:b + 1, f:f + 1]).pooler_output
            alone = torch.cat(list(alone)) if isinstance(alone, (list, tuple)) else alone
            alone = alone.reshape(-1, alone.shape[-1])  # [tokens of one frame (+ newline), dim]
            in_frame = video[layout.frame_index[b, video] == f]
            rows, cols = layout.grid_row[b, in_frame], layout.grid_col[b, in_frame]
            side = int(rows.max()) + 1
            lead = 1 if name == "video_llava" else 0  # Video-LLaVA's frames start with their CLS token
            place = torch.where(rows >= 0, lead + rows * side + cols, 0)
            assert len(in_frame) == side * side + lead
            torch.testing.assert_close(hidden[b, in_frame], alone[place], rtol=0, atol=1e-12)
        outside = video[layout.frame_index[b, video] < 0]
        assert len(outside) == (1 if name == "llava_onevision" else 0)  # OneVision's newline closes the clip


def test_frames_of_qwen2_5_vl_follow_video_grid_thw(recorder):
    """Qwen2.5-VL: temporal patch t, merged row r, column c of a (t, h, w) grid, frame-major, in a padded batch."""
    model = tiny_family_model("qwen2_5_vl", num_layers=2, seed=2)
    grids = [(4, 8, 12), (2, 8, 8)]
    inputs = qwen_video_inputs(model, grids, seed=3)
    inputs["second_per_grid_ts"] = torch.tensor([0.5, 2.0])  # spaces temporal positions, not frames
    layout, _ = _recorded(model, inputs)
    merge = model.config.vision_config.spatial_merge_size
    for b, (t, h, w) in enumerate(grids):
        video = (inputs["input_ids"][b] == model.config.video_token_id).nonzero().flatten()
        expect = [(f, r, c) for f in range(t) for r in range(h // merge) for c in range(w // merge)]
        got = list(zip(layout.frame_index[b, video].tolist(), layout.grid_row[b, video].tolist(),
                       layout.grid_col[b, video].tolist()))
        assert got == expect
        assert bool((layout.frame_index[b][~layout.visual[b]] == -1).all())


def test_still_images_have_no_frames(recorder):
    model = tiny_family_model("qwen2_5_vl", num_layers=2, seed=2)
    layout, _ = _recorded(model, family_inputs(model, "qwen2_5_vl", batch=1))
    assert layout.visual.any() and not layout.has_frames


# ---------------------------------------------------------------------------------------------
# criteria against slow references
# ---------------------------------------------------------------------------------------------
def _clip_layout(frames: int, rows: int, cols: int, text: int = 2, lead: int = 0, tail: int = 0) -> TokenLayout:
    """One sample: ``text`` tokens, a clip of ``frames`` frames (``lead`` + rows x cols tokens each, then ``tail``),
    ``text`` tokens; frame fields built token by token."""
    per_frame = lead + rows * cols
    n = frames * per_frame + tail
    seq = 2 * text + n
    visual = torch.zeros(1, seq, dtype=torch.bool)
    visual[0, text:text + n] = True
    layout = layout_from_ids(torch.zeros(1, seq, dtype=torch.long), visual, None)
    position = text
    for f in range(frames):
        for j in range(per_frame):
            layout.frame_index[0, position] = f
            if j >= lead:
                layout.grid_row[0, position], layout.grid_col[0, position] = divmod(j - lead, cols)
            position += 1
    return layout


def test_qwen3_vl_frames_are_their_own_runs_grouped_into_one_clip(recorder):
    """Qwen3-VL puts each frame in a run of its own between timestamps: a plain forward groups the runs by the
    call's video_grid_thw, generate (which passes positions instead of grids) by the text-only gaps; both give
    every run its frame number and grid cell and the clip one span."""
    model = tiny_family_model("qwen3_vl", num_layers=4, seed=1, dtype=torch.float64)
    inputs = family_inputs(model, "qwen3_vl", batch=2, seed=3, video=True, dtype=torch.float64)
    grids = inputs["video_grid_thw"].tolist()  # [[frames, h, w]] in patches, merged 2x2 in the decoder
    layouts = [_recorded(model, inputs)[0]]
    recipe = {"name": "record", "criteria": {"rec": {"type": _RecordLayout.name}},
              "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 1.0}]}}
    with prunekit.apply(model, recipe), torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    layouts.append(_RecordLayout.seen[-1][0])
    for layout in layouts:
        for b, (frames, h, w) in enumerate(grids):
            video = (inputs["input_ids"][b] == model.config.video_token_id).nonzero().flatten()
            per_frame, cols = (h // 2) * (w // 2), w // 2
            expect = [(j // per_frame, j % per_frame // cols, j % cols) for j in range(frames * per_frame)]
            got = list(zip(layout.frame_index[b, video].tolist(), layout.grid_row[b, video].tolist(),
                           layout.grid_col[b, video].tolist()))
            assert got == expect
            assert len(set(layout.image_index[b, video].tolist())) == 1  # one clip across the timestamp tokens


def test_uniform_frames_keeps_whole_evenly_spaced_frames():
    for frames, keep in [(8, 0.25), (16, 0.5), (6, 0.34), (5, 0.2)]:
        layout = _clip_layout(frames, 2, 3)
        ctx = forward_context(layout, stage_layers=(0,), keep=keep)
        kept = top_visual(UniformFrames().score(ctx), layout.visual, ctx.keep_counts)[0]
        kept_frames = sorted(set(layout.frame_index[0][kept].tolist()))
        m = round(frames * keep)
        assert len(kept_frames) == m
        for f in kept_frames:  # whole frames
            assert bool(kept[layout.frame_index[0] == f].all())
        gaps = [b - a for a, b in zip(kept_frames, kept_frames[1:])] + [frames - kept_frames[-1] + kept_frames[0]]
        assert max(gaps) - min(gaps) <= 1, (frames, keep, kept_frames)  # evenly spread over the clip


def test_frame_difference_equals_a_loop_over_cells():
    torch.manual_seed(0)
    layout = _clip_layout(4, 2, 2, lead=1)
    seq = layout.seq_len
    hidden = torch.randn(1, seq, 8, dtype=torch.float64)
    # make the third frame's first cell nearly equal to the second frame's, then drop one cell of the second frame
    pos = {}
    for j in range(seq):
        f, r, c = (int(layout.frame_index[0, j]), int(layout.grid_row[0, j]), int(layout.grid_col[0, j]))
        pos[(f, r, c)] = j
    hidden[0, pos[(2, 0, 0)]] = hidden[0, pos[(1, 0, 0)]] * 1.001
    keep_slots = torch.tensor([[j for j in range(seq) if j != pos[(1, 1, 1)]]])
    layout = layout.gather(keep_slots, torch.zeros_like(keep_slots, dtype=torch.bool))
    hidden = hidden[:, keep_slots[0]]
    for metric in ("cosine", "l2"):
        ctx = forward_context(layout, stage_layers=(0,), buffers={"d/hidden0": hidden})
        criterion = FrameDifference(metric=metric)
        criterion.key = "d"
        score = criterion.score(ctx)[0]
        seen: dict[tuple[int, int], list[float]] = {}
        firsts = []
        for j in range(layout.seq_len):
            f = int(layout.frame_index[0, j])
            if f < 0:
                continue
            cell = (int(layout.grid_row[0, j]), int(layout.grid_col[0, j]))
            x = hidden[0, j].tolist()
            if cell in seen:
                y = seen[cell]
                if metric == "cosine":
                    dot = sum(a * b for a, b in zip(x, y))
                    expect = 1 - dot / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))
                else:
                    expect = math.sqrt(sum((a - b) ** 2 for a, b in zip(x, y)))
                assert abs(float(score[j]) - expect) < 1e-12
            else:
                firsts.append(j)
            seen[cell] = x
        others = [j for j in range(layout.seq_len) if layout.visual[0, j] and j not in firsts]
        assert float(score[firsts].min()) > float(score[others].max())  # first frame (and new cells) above all
        # the cell copied from its previous frame scores lowest of all
        moved = int((layout.original_index[0] == pos[(2, 0, 0)]).nonzero())
        assert int(score[others].argmin()) == others.index(moved)


def official_dycoke_ttm(features: torch.Tensor, per_frame: int, k: float) -> torch.Tensor:
    """DyCoke's ``dycole_ttm`` re-derived as a loop that returns the kept rows of ``features`` ``[frames * n, dim]``
    (in the official output order): pair frames (0,1), (2,3), ...; the second of each pair keeps its
    ``int((1 - k) * n)`` tokens least cosine-similar to the first's token at the same place; then for
    ``i = 0, 4, ...`` below ``frames - 4`` frame ``i + 2`` keeps its least similar to frame ``i``."""
    frames = features.shape[0] // per_frame
    keep = int((1 - k) * per_frame)
    rows = [list(range(f * per_frame, (f + 1) * per_frame)) for f in range(frames)]

    def least_similar(first: int, second: int) -> list[int]:
        sims = []
        for j in range(per_frame):
            a, b = features[rows[first][j]], features[rows[second][j]]
            sims.append(float(torch.dot(a, b) / (a.norm() * b.norm())))
        order = sorted(range(per_frame), key=lambda j: sims[j])
        return [rows[second][j] for j in order[:keep]]

    out = []
    for i in range(0, frames - 1, 2):
        out.append(rows[i])
        out.append(least_similar(i, i + 1))
    for i in range(0, frames - 4, 4):
        out[i] = rows[i]
        out[i + 2] = least_similar(i, i + 2)
    return torch.tensor([j for part in out for j in part])


def test_dycoke_keeps_the_official_set_on_a_hand_built_clip():
    torch.manual_seed(1)
    for frames, rows, cols, k in [(8, 3, 3, 0.7), (12, 2, 4, 0.5), (4, 3, 3, 0.7)]:
        layout = _clip_layout(frames, rows, cols)
        n = rows * cols
        hidden = torch.randn(1, layout.seq_len, 6, dtype=torch.float64)
        criterion = DyCokeTTM(k=k)
        criterion.key = "t"
        ctx = forward_context(layout, stage_layers=(0,), buffers={"t/hidden0": hidden})
        count = torch.tensor([dycoke_keep_count(frames, n, k)])
        kept = top_visual(criterion.score(ctx), layout.visual, count)[0].nonzero().flatten()
        video = layout.visual[0].nonzero().flatten()
        expect = video[official_dycoke_ttm(hidden[0, video], n, k)]
        assert kept.tolist() == sorted(expect.tolist())


def test_dycoke_on_tiny_onevision_keeps_the_official_tokens_of_its_video_features():
    """The recipe's criterion on a real (tiny) OneVision: the kept tokens are the official TTM's on the
    model's own pooled frame features, plus the newline that closes the clip."""
    model = tiny_family_model("llava_onevision", num_layers=4, seed=5, dtype=torch.float64)
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=2, video=True, dtype=torch.float64)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output[0]
    frames, per_frame = inputs["pixel_values_videos"].shape[1], (features.shape[0] - 1) // 8
    count = dycoke_keep_count(frames, per_frame, 0.7, tail=1)
    with prunekit.apply(model, _with_keep("dycoke", count=count)) as pruner, torch.no_grad():
        model(**inputs)
    kept = pruner.last_report[0].kept[0]
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    expect = video[official_dycoke_ttm(features[:-1], per_frame, 0.7)].tolist() + [int(video[-1])]
    assert kept.tolist() == sorted(expect)


def test_dycoke_own_count_scores_minus_inf_exactly_what_the_official_ttm_drops():
    """``own_count``: the tokens the official loop drops score -inf, whatever the clip's frames and grid; with a
    second criterion the combiner normalises over the other visual tokens only."""
    from prunekit.criteria.combiners import WeightedSum
    from prunekit.scoring import score

    def scored(criterion: DyCokeTTM, key: str, layout: TokenLayout, hidden: torch.Tensor) -> torch.Tensor:
        criterion.key = key
        return criterion.score(forward_context(layout, stage_layers=(0,), buffers={f"{key}/hidden0": hidden}))[0]

    torch.manual_seed(3)
    for frames, rows, cols, k in [(8, 3, 3, 0.7), (5, 2, 4, 0.5), (2, 3, 3, 0.7), (12, 2, 2, 0.25)]:
        layout = _clip_layout(frames, rows, cols)
        hidden = torch.randn(1, layout.seq_len, 6, dtype=torch.float64)
        video = layout.visual[0].nonzero().flatten()
        expect = set(video[official_dycoke_ttm(hidden[0, video], rows * cols, k)].tolist())
        if frames % 2:  # an odd clip's last frame stays whole here (the official loop leaves it out)
            expect |= set(video[-rows * cols:].tolist())
        own = scored(DyCokeTTM(k=k, own_count=True), "own", layout, hidden)  # [seq]
        dropped = (own == float("-inf")).nonzero().flatten().tolist()
        assert dropped == sorted(set(video.tolist()) - expect)
        plain = scored(DyCokeTTM(k=k), "plain", layout, hidden)
        own_criterion, plain_criterion = DyCokeTTM(k=k, own_count=True), DyCokeTTM(k=k)
        own_criterion.key, plain_criterion.key = "own", "plain"
        ctx = forward_context(layout, stage_layers=(0,), buffers={"own/hidden0": hidden, "plain/hidden0": hidden})
        combiner = WeightedSum(weights={"own": 1.0, "plain": 1.0}, normalize="sum")
        combined = score({"own": own_criterion, "plain": plain_criterion}, combiner, ctx)[0]
        kept = sorted(expect)
        assert (combined[dropped] == float("-inf")).all()
        expected = own[kept] / own[kept].sum() + plain[kept] / plain[kept].sum()  # sums over the kept tokens only
        torch.testing.assert_close(combined[kept], expected, rtol=1e-12, atol=0)


def test_dycoke_own_count_on_tiny_onevision_keeps_the_official_tokens_of_each_clip_of_a_batch():
    model = tiny_family_model("llava_onevision", num_layers=4, seed=5, dtype=torch.float64)
    inputs = family_inputs(model, "llava_onevision", batch=2, seed=4, video=True, dtype=torch.float64)
    with torch.no_grad():
        features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
    per_frame = (features.shape[1] - 1) // 8
    with prunekit.apply(model, "dycoke-own-count") as pruner, torch.no_grad():
        model(**inputs)
    report = pruner.last_report[0]
    for row in range(2):
        video = (inputs["input_ids"][row] == model.config.video_token_id).nonzero().flatten()
        expect = video[official_dycoke_ttm(features[row, :-1], per_frame, 0.7)].tolist() + [int(video[-1])]
        kept = report.kept[row]
        assert kept[kept >= 0].tolist() == sorted(expect)
    assert report.kept_counts.tolist() == [dycoke_keep_count(8, per_frame, 0.7, tail=1)] * 2


def test_recipe_parameters_are_checked():
    with pytest.raises(prunekit.RecipeError, match="metric"):
        prunekit.load_recipe({"name": "x", "criteria": {"d": {"type": "frame_difference", "metric": "l1"}},
                              "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 0.5}]}})
    with pytest.raises(prunekit.RecipeError, match="k "):
        prunekit.load_recipe({"name": "x", "criteria": {"d": {"type": "dycoke_ttm", "k": 1.0}},
                              "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 0.5}]}})
    with pytest.raises(prunekit.RecipeError, match="own_count"):
        prunekit.load_recipe({"name": "x", "criteria": {"d": {"type": "dycoke_ttm", "own_count": "maybe"}},
                              "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 1.0}]}})


# ---------------------------------------------------------------------------------------------
# done-when: generate, keep-everything, padded batches (issue 16)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", VIDEO_RECIPES)
def test_video_recipes_generate_and_keep_everything_is_identical(family, recipe):
    name, model = family
    inputs = _inputs(name, model, batch=1, seed=3)
    n_video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    with torch.no_grad():
        bare_logits = model(**inputs).logits
        bare = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    keep_all = _with_keep(recipe, keep=1.0)
    for criterion in keep_all["criteria"].values():
        criterion.pop("own_count", None)  # a criterion's own count drops whatever the stage keeps
    with prunekit.apply(model, keep_all) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert int(pruner.last_report[0].kept_counts[0]) == n_video
    assert torch.equal(logits, bare_logits) and torch.equal(ids, bare)
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == bare.shape[1]
    assert 0 < int(pruner.last_report[0].kept_counts[0]) < n_video


@pytest.mark.parametrize("recipe", VIDEO_RECIPES)
def test_a_padded_batch_of_two_clips_equals_the_lone_runs(family, recipe):
    name, model = family
    inputs = _inputs(name, model, batch=2, seed=4)
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report
        for row in range(2):
            alone = _alone(inputs, row)
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            kept = batch_report[0].kept[row]
            assert torch.equal(kept[kept >= 0] - pad, pruner.last_report[0].kept[0])
            assert batch_out[row, inputs["input_ids"].shape[1]:].tolist() == out[0, alone["input_ids"].shape[1]:].tolist()


def test_doctor_shows_frames_x_grid_per_video_span():
    from prunekit.doctor import diagnose, format_report, video_frames

    model = tiny_family_model("video_llava", num_layers=2, seed=2)
    inputs = family_inputs(model, "video_llava", batch=1, video=True)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    frames = inputs["pixel_values_videos"].shape[1]
    assert video_frames(model, inputs) == [f"sample 0, visual span 0: {frames} frames x {side}x{side} grid "
                                           "(+1 token per frame outside the grid)"]
    assert f"video frames: frames of 1 + {side}x{side} tokens" in format_report(diagnose(model))
    qwen = tiny_family_model("qwen2_5_vl", num_layers=2, seed=2)
    grids, merge = [(2, 8, 8), (4, 8, 12)], qwen.config.vision_config.spatial_merge_size
    lines = video_frames(qwen, qwen_video_inputs(qwen, grids))
    for line, (t, h, w) in zip(lines, grids):
        assert line.endswith(f": {t} frames x {h // merge}x{w // merge} grid")


# ---------------------------------------------------------------------------------------------
# the FLOPs model on a clip (prunekit flops --frames)
# ---------------------------------------------------------------------------------------------
def test_flops_on_a_clip_counts_the_tokens_dycokes_own_count_keeps_in_a_real_run(tmp_path, capsys):
    import json

    from prunekit.cli import main
    from prunekit.flops import DecoderDims, recipe_estimate

    model = tiny_family_model("llava_onevision", num_layers=4, seed=1, dtype=torch.float64)
    inputs = family_inputs(model, "llava_onevision", seed=5, video=True)
    with prunekit.apply(model, "dycoke-own-count") as pruner, torch.no_grad():
        model(**inputs)
    kept = int(pruner.last_report.stages[0].kept_counts[0])  # 8 frames of 3x3, and the closing newline
    dims = DecoderDims.from_config(model.config)
    recipe = prunekit.load_recipe("dycoke-own-count")
    estimate = recipe_estimate(recipe, dims, 8 * 9, frames=8)
    assert estimate.visual_tokens == [kept - 1] * 4 and kept - 1 < 72
    assert recipe_estimate(recipe, dims, 8 * 9).visual_tokens == [72] * 4  # without frames: its stage keeps 1.0
    model.config.save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path), "--recipe", "dycoke-own-count", "--visual-tokens", "72", "--frames", "8",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["recipes"][1]
    assert row["ratio"] == round(estimate.visual_ratio, 4) < 1
    with pytest.raises(ValueError, match="73 visual tokens are not 8 equal frames"):
        recipe_estimate(recipe, dims, 73, frames=8)
