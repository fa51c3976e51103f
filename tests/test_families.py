"""Every supported family on a tiny random-weight model of its real architecture (issue: architecture-agnostic)."""

from __future__ import annotations

import pytest
import torch

import prunekit
from family_reference import run_family_reference
from prunekit.testing import FAMILIES, family_inputs, tiny_family_model
from prunekit.compat import cache_of, with_cache

SIZES = {  # per sample: images of different sizes give different visual token counts
    "llava_next": [(40, 30), (24, 24)],
    "llava_onevision": [(40, 30), (24, 24)],
    "llava_next_video": [(40, 30), (24, 24)],
    "qwen2_vl": [(32, 48), (24, 24)],
    "qwen2_5_vl": [(32, 48), (24, 24)],
    "qwen3_vl": [(32, 48), (24, 24)],
    "qwen3_vl_moe": [(32, 48), (24, 24)],
}
KEEP_ALL = {"name": "keep-all", "criteria": {"iga": {}},
            "schedule": {"type": "stages", "stages": [{"layer": 3, "keep": 1.0}, {"layer": 6, "keep": 1.0}]}}
# transprune-high written for 32 layers, mapped onto these 16-layer models
SCALED = ["reference_depth=32"]
# A decode step against the reference recomputed on the whole sequence: where a family takes a softmax in float32
# even in a float64 model (Gemma 2's eager attention in PaliGemma's decoder, Qwen3-VL-MoE's router), inputs that
# differ in their last bits (the reference's products and sums run over a longer sequence, which changes their
# blocking on the CPU) can round to float32 values one step apart: ~1e-7 here, on an AVX-512 machine.
STEP_ATOL = {"paligemma": 1e-6, "qwen3_vl_moe": 1e-6}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    return name, tiny_family_model(name, num_layers=16, seed=3, dtype=torch.float64)


def _inputs(name, model, batch=2, seed=0, video=False):
    sizes = SIZES.get(name, [(24, 24)] * batch)[:batch]
    return family_inputs(model, name, batch=batch, seed=seed, sizes=sizes, video=video, dtype=torch.float64)


def _alone(inputs, row):
    """One sample without its padding (pixel inputs of that sample only)."""
    mask = inputs["attention_mask"][row].bool()
    out = {"input_ids": inputs["input_ids"][row][mask][None], "attention_mask": inputs["attention_mask"][row][mask][None]}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key in ("mm_token_type_ids", "token_type_ids"):
            out[key] = value[row][mask][None]
        elif key in ("image_grid_thw", "video_grid_thw"):
            out[key] = value[row:row + 1]
        elif key == "pixel_values" and "image_grid_thw" in inputs:  # flattened patches: this image's rows
            counts = inputs["image_grid_thw"].prod(dim=1).tolist()
            start = sum(counts[:row])
            out[key] = value[start:start + counts[row]]
        else:
            out[key] = value[row:row + 1]
    return out


def _visual_ids(model):
    return [getattr(model.config, k) for k in ("image_token_id", "video_token_id")
            if getattr(model.config, k, None) is not None]


def test_an_adapter_is_found_and_keep_everything_is_identical(family):
    name, model = family
    inputs = _inputs(name, model)
    with torch.no_grad():
        bare = model(**inputs).logits
        bare_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    for positions in ("compact", "original"):
        with prunekit.apply(model, KEEP_ALL, [f"positions={positions}"]) as pruner, torch.no_grad():
            logits = model(**inputs).logits
            ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert pruner.adapter.name == {"qwen2_5_vl": "qwen2_vl", "llava_next_video": "generic",
                                       "qwen3_vl_moe": "qwen3_vl"}.get(name, name)
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(logits[mask], bare[mask], rtol=0, atol=1e-10)
        assert torch.equal(ids, bare_ids)


@pytest.mark.parametrize("recipe,positions", [("transprune-high", "compact"), ("transprune-high", "original"),
                                              ("fastv", "original")])
def test_pruned_prefill_and_cached_decoding_match_the_layer_by_layer_reference(family, recipe, positions):
    name, model = family
    sample = _alone(_inputs(name, model, batch=1, seed=4), 0)
    overrides = [*SCALED, f"positions={positions}"]
    with prunekit.apply(model, recipe, overrides) as pruner, torch.no_grad():
        logits = model(**sample).logits[0]
        report = pruner.last_report
        result = model(**sample, use_cache=True)
        mask, step_logits, decoded = sample["attention_mask"], [], []
        for _ in range(4):
            step_logits.append(result.logits[0, -1])
            next_id = result.logits[:, -1].argmax(-1, keepdim=True)
            decoded.append(int(next_id))
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = {"input_ids": next_id, "attention_mask": mask, **with_cache(model, cache_of(result)),
                    "use_cache": True}
            if "mm_token_type_ids" in sample:  # M-RoPE: positions come from the cache length + rope deltas
                step["mm_token_type_ids"] = torch.zeros_like(next_id)
                del step["attention_mask"]  # with a mask the model would rebuild positions for the whole sequence
            result = model(**step)
    stages = [s.layer for s in report]
    kept = [s.kept[0] for s in report]
    assert all(len(k) for k in kept[:1]), "the first stage must keep some visual tokens"
    ref = run_family_reference(model, name, sample, _visual_ids(model), stages, kept, positions)
    torch.testing.assert_close(logits, ref, rtol=0, atol=1e-8)
    for t in range(4):
        ref_step = run_family_reference(model, name, sample, _visual_ids(model), stages, kept, positions,
                                        decoded=torch.tensor(decoded[:t], dtype=torch.long))
        torch.testing.assert_close(step_logits[t], ref_step[-1], rtol=0, atol=STEP_ATOL.get(name, 1e-8))


@pytest.mark.parametrize("recipe", ["transprune-high", "fastv"])
def test_each_sample_of_a_padded_batch_gets_its_lone_answer(family, recipe):
    name, model = family
    inputs = _inputs(name, model, batch=2, seed=6)
    with prunekit.apply(model, recipe, SCALED) as pruner, torch.no_grad():
        batch_out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        batch_report = pruner.last_report
        for row in range(2):
            alone = _alone(inputs, row)
            out = model.generate(**alone, max_new_tokens=4, do_sample=False)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            for stage_batch, stage_alone in zip(batch_report, pruner.last_report):
                kept = stage_batch.kept[row]
                assert torch.equal(kept[kept >= 0] - pad, stage_alone.kept[0])
            lone = out[0, alone["input_ids"].shape[1]:].tolist()
            batched = batch_out[row, inputs["input_ids"].shape[1]:].tolist()
            assert batched[:len(lone)] == lone  # a lone sample may stop at EOS while the batch pads on


def test_video_inputs_are_pruned_where_the_family_takes_videos(family):
    name, model = family
    if name not in ("video_llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        pytest.skip(f"{name}: images only in these tests")
    inputs = _inputs(name, model, batch=1, seed=8, video=True)
    video_id = model.config.video_token_id
    n_video = int((inputs["input_ids"] == video_id).sum())
    with prunekit.apply(model, "transprune-high", SCALED) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert int(pruner.last_report.visual_tokens[0]) == n_video
    assert int(pruner.last_report[-1].kept_counts[0]) == int(n_video * 0.125)


@pytest.mark.parametrize("family_name,adapter", [("qwen2_vl", "qwen2_vl"), ("gemma3", "gemma3"),
                                                 ("llava_next_video", "generic"), ("video_llava", "video_llava")])
def test_doctor_names_the_adapter_without_loading_weights(tmp_path, capsys, family_name, adapter):
    from prunekit.cli import main
    from prunekit.testing import family_config

    family_config(family_name).save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == adapter and report["decoder_layers"] == 16
    assert report["probes"]["AttentionRows (through the attention interface)"] is True
    if family_name == "qwen2_vl":
        assert report["rope"].startswith("M-RoPE")
    if family_name == "gemma3":
        assert set(report["layer_kinds"]) == {"sliding_attention", "full_attention"}


def test_doctor_explains_why_no_adapter_fits(tmp_path, capsys):
    from transformers import LlamaConfig

    from prunekit.cli import main

    LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2).save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "none fits" in out and "names no visual token id" in out and "'llama' is not one of ['llava']" in out


def _qwen_positions(base: int, grid_h: int, grid_w: int, text_after: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, n] M-RoPE positions of `base` text tokens, one image of grid_h x grid_w merged tokens, then text, as
    Qwen2-VL's get_rope_index lays them (written out by hand), and the visual mask [n]."""
    text_before = [[p, p, p] for p in range(base)]
    image = [[base, base + h, base + w] for h in range(grid_h) for w in range(grid_w)]
    after = base + max(grid_h, grid_w)
    text = [[p, p, p] for p in range(after, after + text_after)]
    rows = text_before + image + text
    visual = torch.tensor([False] * base + [True] * len(image) + [False] * text_after)
    return torch.tensor(rows).T, visual


def test_compact_mrope_moves_the_text_after_a_pruned_image_to_its_largest_kept_position_plus_one():
    from prunekit.adapters import compact_mrope

    positions, visual = _qwen_positions(3, 2, 2, 2)  # text 0-2, image at base 3 on a 2x2 grid, text at 5, 6
    valid = torch.ones_like(visual)
    assert torch.equal(compact_mrope(positions[:, None], valid[None], visual[None])[:, 0], positions)  # unpruned
    keep = torch.tensor([0, 1, 2, 3, 7, 8])  # the image's first token only
    out = compact_mrope(positions[:, keep][:, None], valid[keep][None], visual[keep][None])[:, 0]
    assert out.T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4], [5, 5, 5]]
    keep = torch.tensor([0, 1, 2, 6, 7, 8])  # the last token (h 1, w 1): the image still starts at its base
    out = compact_mrope(positions[:, keep][:, None], valid[keep][None], visual[keep][None])[:, 0]
    assert out.T.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 4, 4], [5, 5, 5], [6, 6, 6]]
    positions, visual = _qwen_positions(2, 3, 4, 1)  # image tokens 2-13 at base 2; text at 6
    keep = torch.tensor([0, 1, 2, 5, 14])  # (0,0), (0,3): the widest kept offset is 3, the text goes to 6
    padded = torch.cat([torch.zeros(3, 2, dtype=torch.long), positions[:, keep]], dim=1)  # two left pads
    mask = torch.tensor([False, False] + [True] * 5)
    out = compact_mrope(padded[:, None], mask[None], torch.cat([torch.zeros(2, dtype=torch.bool), visual[keep]])[None])
    assert out[:, 0].T.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 5], [6, 6, 6]]


def test_compact_mrope_never_moves_text_past_where_the_model_put_it_and_carries_each_loss_forward():
    from prunekit.adapters import compact_mrope

    # a 2-frame video at base 2 on a 2x2 grid, frames 4 apart in time: t offsets 0 and 4, text after it at base + 2
    # (transformers >= 5.20 advances by the grid side only), then a 1x3 image at base 5, then text at 8
    text0 = [[0, 0, 0], [1, 1, 1]]
    video = [[2 + 4 * t, 2 + h, 2 + w] for t in range(2) for h in range(2) for w in range(2)]
    image = [[5, 5, 5 + w] for w in range(3)]
    rows = text0 + video + [[4, 4, 4]] + image + [[8, 8, 8]]
    positions = torch.tensor(rows).T[:, None]  # [3, 1, 15]
    visual = torch.tensor([False] * 2 + [True] * 8 + [False] + [True] * 3 + [False])[None]

    def compact(keep: list[int]) -> list[list[int]]:
        index = torch.tensor(keep)
        return compact_mrope(positions[:, :, index], torch.ones(1, len(keep), dtype=torch.bool),
                             visual[:, index])[:, 0].T.tolist()

    assert compact(list(range(15))) == rows  # unpruned: unchanged
    # a kept token of the second frame reaches t = 6, past the text (4): the text stays at 4, nothing moves
    assert compact([0, 1, 6, 10, 11, 12, 13, 14]) == [[0, 0, 0], [1, 1, 1], [6, 2, 2], [4, 4, 4], [5, 5, 5],
                                                       [5, 5, 6], [5, 5, 7], [8, 8, 8]]
    # only the video's first token: the text comes down to 3, the image with it; the image keeps its widest token
    assert compact([0, 1, 2, 10, 11, 13, 14]) == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4],
                                                   [4, 4, 6], [7, 7, 7]]
    # ... or loses it: the text after the image comes down one more
    assert compact([0, 1, 2, 10, 11, 12, 14]) == [[0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3], [4, 4, 4],
                                                   [4, 4, 5], [6, 6, 6]]
