"""A recipe's ``vision`` block at the language model's input (every family but LLaVA-1.5 and Video-LLaVA, whose
images are shortened before the projector): keep-all identity, a hand-built Qwen2.5-VL reference in the prefill
and in cached decode, per-image counts, a decoder stage after it, and the refusal of tower-reading criteria."""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.compat import with_cache
from prunekit.testing import END_ID, START_ID, family_inputs, tiny_family_model

INPUT_FAMILIES = ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "internvl",
                  "idefics3", "mistral3", "glm4v"]
SIZES = {"llava_next": [(24, 24), (16, 32)], "llava_onevision": [(24, 24), (16, 32)], "qwen2_vl": [(24, 24), (16, 32)],
         "qwen2_5_vl": [(24, 24), (16, 32)], "qwen3_vl": [(24, 24), (16, 32)], "glm4v": [(24, 24), (16, 32)]}


def _norm_block(keep: float | None = None, count: int | None = None, positions: str = "original") -> dict:
    block = {"criteria": {"norm": {"type": "l2_norm"}}, **({"keep": keep} if count is None else {"count": count})}
    return {"name": "vision-l2", "positions": positions, "vision": block}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("family", INPUT_FAMILIES)
def test_a_keep_everything_vision_block_is_bit_identical_to_the_bare_model(family):
    model = tiny_family_model(family, num_layers=4)
    inputs = family_inputs(model, family, batch=2, seed=3, sizes=SIZES.get(family))
    hooks = _hooks(model)
    with torch.no_grad():
        bare_logits = model(**inputs).logits
        bare = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        with prunekit.apply(model, _norm_block(keep=1.0, positions="compact")) as pruner:
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(logits, bare_logits)
    assert torch.equal(tokens, bare)
    report = pruner.last_report
    assert report.stages[0].where == "vision" and report.stages[0].layer == 0
    assert torch.equal(report.stages[0].kept_counts, report.visual_tokens)
    assert _hooks(model) == hooks


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3", "internvl", "idefics3"])  # tiled ones: below
def test_each_image_keeps_its_own_share_and_generate_runs(family):
    model = tiny_family_model(family, num_layers=4)
    inputs = family_inputs(model, family, batch=2, seed=2, sizes=SIZES.get(family))
    with prunekit.apply(model, _norm_block(keep=0.5)) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    report = pruner.last_report
    assert report.stages[0].kept_counts.tolist() == [n // 2 for n in report.visual_tokens.tolist()]
    assert report.visual_tokens_per_layer.tolist() == [[n // 2] * 4 for n in report.visual_tokens.tolist()]
    with prunekit.apply(model, _norm_block(count=5)) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruner.last_report.stages[0].kept_counts.tolist() == [min(5, n) for n in report.visual_tokens.tolist()]


def _two_images(model, grids: list[tuple[int, int]], seed: int = 0) -> dict:
    """One Qwen2.5-VL prompt holding two images of ``grids`` (patch rows, cols; merged 2x2 into tokens)."""
    g = torch.Generator().manual_seed(seed)
    image = model.config.image_token_id
    spans = [[START_ID, *([image] * (h * w // 4)), END_ID] for h, w in grids]
    ids = torch.tensor([[1, 5, 6, *spans[0], 9, 10, *spans[1], 11, 12, 13]])
    pixel = torch.randn(sum(h * w for h, w in grids), 3 * 2 * 4 * 4, generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel,
            "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids]), "mm_token_type_ids": (ids == image).long()}


def _reference(model, inputs: dict, keep: float, steps: int) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
    """Qwen2.5-VL with each image's features cut before the language model, by hand: the ``int(P * keep)`` feature
    rows of largest L2 norm per image (in order), a prompt holding only their placeholders, the unpruned prompt's
    M-RoPE positions at the kept columns, then greedy cached decoding at the positions after the prompt's largest.
    Returns the prefill logits ``[kept_len, vocab]``, each decode step's logits and the kept prompt columns."""
    ids = inputs["input_ids"]
    image_id = model.config.image_token_id
    with torch.no_grad():
        features = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        kept_rows = []
        for rows in features:  # [P, dim] per image
            k = int(rows.shape[0] * keep)
            kept_rows.append(rows.norm(dim=-1).topk(k).indices.sort().values)
        positions, _ = model.model.get_rope_index(ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])  # [3, 1, seq]
        columns, image_of, seen = [], (ids[0] == image_id).nonzero().flatten().tolist(), 0
        for i, rows in enumerate(features):
            span = image_of[seen: seen + rows.shape[0]]
            columns += [span[r] for r in kept_rows[i].tolist()]
            seen += rows.shape[0]
        columns = sorted(set(range(ids.shape[1])) - set(image_of) | set(columns))
        short = ids[:, columns]
        embeds = model.model.get_input_embeddings()(short)
        kept = torch.cat([rows[r] for rows, r in zip(features, kept_rows)])  # [kept, dim] in prompt order
        embeds[short == image_id] = kept.to(embeds.dtype)
        lm = model.model.language_model
        out = lm(inputs_embeds=embeds, position_ids=positions[:, :, columns], attention_mask=torch.ones_like(short),
                 use_cache=True)
        logits = model.lm_head(out.last_hidden_state)[0]
        cache, steps_logits, mask = out.past_key_values, [], torch.ones_like(short)
        token, top = logits[-1].argmax(), int(positions.max())
        for step in range(steps):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            position = torch.full((3, 1, 1), top + 1 + step)
            out = lm(inputs_embeds=model.model.get_input_embeddings()(token.view(1, 1)), position_ids=position,
                     attention_mask=mask, use_cache=True, **with_cache(lm, cache))
            cache = out.past_key_values
            step_logits = model.lm_head(out.last_hidden_state)[0, -1]
            steps_logits.append(step_logits)
            token = step_logits.argmax()
    return logits, steps_logits, columns


def test_a_pruned_vision_block_on_qwen2_5_vl_equals_the_features_cut_before_the_language_model():
    model = tiny_family_model("qwen2_5_vl", num_layers=4, dtype=torch.float64)
    inputs = _two_images(model, [(6, 6), (4, 8)])  # 9 and 8 tokens: 4 of each kept
    inputs["pixel_values"] = inputs["pixel_values"].double()
    ref_logits, ref_steps, columns = _reference(model, inputs, keep=0.5, steps=3)
    recipe = _norm_block(keep=0.5)
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    report = pruner.last_report
    assert report.output_positions[0].tolist() == columns
    assert report.stages[0].kept_counts.tolist() == [8]
    assert torch.allclose(logits, ref_logits, atol=1e-10, rtol=0)
    # generate hands its logits out in float32: the references cast alike
    assert torch.allclose(out.logits[0][0], ref_logits[-1].float(), atol=1e-6, rtol=0)
    for step, expected in enumerate(ref_steps):  # cached decode steps at the positions after the prompt
        assert torch.allclose(out.logits[step + 1][0], expected.float(), atol=1e-6, rtol=0), step


def test_a_decoder_stage_after_the_vision_block_keeps_a_share_of_what_the_block_left():
    model = tiny_family_model("qwen2_5_vl", num_layers=4)
    inputs = family_inputs(model, "qwen2_5_vl", batch=2, seed=1, sizes=[(24, 24), (32, 32)])  # 9 and 16 tokens
    recipe = {**_norm_block(keep=0.5), "criteria": {"a": {"type": "fastv_attention"}},
              "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    report = pruner.last_report
    assert [s.where for s in report.stages] == ["vision", "decoder"]
    assert report.visual_tokens_per_layer.tolist() == [[4, 4, 2, 2], [8, 8, 4, 4]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next", "gemma3"])
def test_criteria_that_read_the_vision_tower_are_refused_where_the_block_runs_at_the_input(family):
    model = tiny_family_model(family, num_layers=4)
    hooks = _hooks(model)
    for name in ("visionzip", "fastervlm-64", "vispruner-64", "mustdrop-192"):
        with pytest.raises(prunekit.RecipeError, match=rf"read the vision tower, which prunekit reads before the "
                                                       rf"projector of LLaVA-1.5 and Video-LLaVA; on "
                                                       rf"{type(model).__name__}"):
            prunekit.apply(model, name)
    assert _hooks(model) == hooks


def test_merged_tokens_take_their_image_s_place_at_the_position_of_the_token_before_it():
    """``count: 0`` and ``grid_pool``: each Qwen2.5-VL image becomes its 2x2-pooled grid where it stood, at the M-RoPE
    position of the token before it (``positions: original``), equal to the pooled features placed by hand."""
    model = tiny_family_model("qwen2_5_vl", num_layers=4, dtype=torch.float64)
    inputs = _two_images(model, [(6, 6), (4, 8)])  # 3x3 and 2x4 merged tokens: only the square one pools
    inputs = {**inputs, "pixel_values": inputs["pixel_values"].double()}
    image_id = model.config.image_token_id
    ids = inputs["input_ids"]
    first = torch.cat([ids[:, :14], ids[:, -3:]], dim=1)  # the first image only: 3x3 tokens at columns 4-12
    one = {**inputs, "input_ids": first, "attention_mask": torch.ones_like(first),
           "pixel_values": inputs["pixel_values"][:36], "image_grid_thw": inputs["image_grid_thw"][:1],
           "mm_token_type_ids": (first == image_id).long()}
    recipe = {"name": "pool", "positions": "original",
              "vision": {"criteria": {"none": {"type": "uniform"}}, "count": 0,
                         "merge": {"type": "grid_pool", "size": 2}}}
    with prunekit.apply(model, recipe) as pruner, torch.no_grad():
        logits = model(**one).logits[0]
    with torch.no_grad():
        features = model.model.get_image_features(one["pixel_values"], one["image_grid_thw"]).pooler_output[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(features.T.reshape(1, -1, 3, 3), 2).reshape(-1, 4).T
        positions, _ = model.model.get_rope_index(first, one["mm_token_type_ids"], one["image_grid_thw"],
                                                  attention_mask=one["attention_mask"])
        text = [c for c in range(first.shape[1]) if int(first[0, c]) != image_id]  # the image sat after column 3
        embeds = model.model.get_input_embeddings()(first[:, text])
        embeds = torch.cat([embeds[:, :4], pooled[None].to(embeds.dtype), embeds[:, 4:]], dim=1)
        at = positions[:, :, text]
        at = torch.cat([at[:, :, :4], at[:, :, 3:4].expand(-1, -1, 4), at[:, :, 4:]], dim=2)  # the START token's
        out = model.model.language_model(inputs_embeds=embeds, position_ids=at,
                                         attention_mask=torch.ones(1, embeds.shape[1], dtype=torch.long))
        expected = model.lm_head(out.last_hidden_state)[0]
    report = pruner.last_report
    assert report.stages[0].kept_counts.tolist() == [0] and report.stages[0].merged_counts.tolist() == [4]
    assert report.output_positions[0].tolist() == [*text[:4], -1, -1, -1, -1, *text[4:]]
    assert torch.allclose(logits, expected, atol=1e-10, rtol=0)


def _tiles_from_sizes(model, image_sizes: torch.Tensor) -> list[torch.Tensor]:
    """Per image, the tile of each packed token (0 base, 1.. high resolution, -2 newline), from the image sizes:
    transformers' own pack_image_features run on a stand-in feature per patch holding its tile number."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, vision = model.config, model.config.vision_config
    side = vision.image_size // vision.patch_size
    stand_in = []
    for size in image_sizes:
        n = image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=vision.image_size)
        stand_in.append(torch.arange(n, dtype=torch.float64)[:, None, None].expand(n, side * side, 1))
    extra = ({"vision_feature_select_strategy": config.vision_feature_select_strategy}
             if config.model_type == "llava_next" else {})
    packed, _ = model.model.pack_image_features(stand_in, image_sizes, image_newline=torch.tensor([-2.0]), **extra)
    return [p.reshape(-1).long() for p in packed]


@pytest.mark.parametrize("family, sizes", [
    ("llava_next", [(24, 24), (16, 32)]), ("llava_onevision", [(24, 24), (16, 32)]),
    ("llava_next", [(20, 48), (48, 40)]), ("llava_next", [(48, 20), (40, 48)]),  # cropped grids: offsets count
])
def test_tiled_images_keep_their_newlines_and_shorten_each_tile_apart(family, sizes):
    """LLaVA-NeXT / OneVision at the input: each image's base tile and each high-resolution tile keep their own
    share by L2 norm, every image-newline token stays, in a forward (image sizes in the call) and in generate (the
    tiles found from the grid's shape); the reference finds the tiles from the image sizes."""
    model = tiny_family_model(family, num_layers=4)
    inputs = family_inputs(model, family, batch=2, seed=2, sizes=sizes)
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]).pooler_output
    expected = []
    for features, tiles in zip(packed, _tiles_from_sizes(model, inputs["image_sizes"])):
        norms = features.norm(dim=-1)
        keep = tiles == -2  # newlines
        for tile in tiles[tiles >= 0].unique().tolist():  # the base tile and each high-resolution tile
            index = (tiles == tile).nonzero().flatten()
            keep[index[norms[index].topk(int(len(index) * 0.5)).indices]] = True
        expected.append(keep.nonzero().flatten())
    assert any(int(t.max()) >= 2 for t in _tiles_from_sizes(model, inputs["image_sizes"]))  # several tiles
    for call in ("forward", "generate"):
        with prunekit.apply(model, _norm_block(keep=0.5)) as pruner, torch.no_grad():
            if call == "forward":
                model(**inputs)
            else:
                model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = pruner.last_report.stages[0].kept
        for b, want in enumerate(expected):
            image = (inputs["input_ids"][b] == model.config.image_token_id).nonzero().flatten()
            assert kept[b][kept[b] >= 0].tolist() == image[want].tolist(), (call, b)


def test_a_onevision_video_is_shortened_frame_by_frame_and_keeps_its_closing_newline():
    model = tiny_family_model("llava_onevision", num_layers=4)
    inputs = family_inputs(model, "llava_onevision", batch=1, seed=4, video=True)  # 8 frames of 3x3, one newline
    with prunekit.apply(model, _norm_block(count=4)) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    report = pruner.last_report
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    assert len(video) == 8 * 9 + 1
    kept = report.stages[0].kept[0].tolist()
    assert report.stages[0].kept_counts.tolist() == [8 * 4 + 1] and video[-1].item() in kept
    for frame in range(8):  # 4 of each frame's 9 tokens
        assert sum(int(c) in kept for c in video[frame * 9:(frame + 1) * 9]) == 4


def test_beam_search_and_a_sample_without_an_image_beside_one_with():
    model = tiny_family_model("qwen2_5_vl", num_layers=4)
    inputs = family_inputs(model, "qwen2_5_vl", batch=2, seed=2, sizes=[(24, 24), (16, 32)])  # 9 and 8 tokens
    with prunekit.apply(model, _norm_block(keep=0.5)) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    assert out.shape[0] == 4 and pruner.last_report.stages[0].kept_counts.tolist() == [4, 4, 4, 4]
    image = model.config.image_token_id
    ids = inputs["input_ids"].clone()
    ids[1][ids[1] == image] = 7  # the second sample's image becomes text
    first = int(inputs["image_grid_thw"][0].prod())
    one = {**inputs, "input_ids": ids, "pixel_values": inputs["pixel_values"][:first],
           "image_grid_thw": inputs["image_grid_thw"][:1], "mm_token_type_ids": (ids == image).long()}
    mask = one["attention_mask"].bool()
    with torch.no_grad():
        bare = model(**one).logits
        with prunekit.apply(model, _norm_block(keep=1.0)):
            same = model(**one).logits
        with prunekit.apply(model, _norm_block(keep=0.5)) as pruner:
            model.generate(**one, max_new_tokens=2, do_sample=False)
    assert torch.equal(same[mask], bare[mask])
    assert pruner.last_report.stages[0].kept_counts.tolist() == [4, 0]


def _lightcompress_visionzip(model, inputs: dict, keep: float, contextual: float) -> tuple[list[int], torch.Tensor]:
    """LightCompress's VisionZip on a Qwen2/2.5-VL prompt holding one image, or one video whose frames (temporal
    patches) are each handled as an image, written out again: the last vision block's attention over the whole
    call under a block-diagonal mask (one block per image or frame), mean over heads, summed over queries; per
    merged token the mean over its 4 patches and its keys' mean, the window order undone; dominant tokens by that
    attention, targets evenly spaced among the rest, every other token added (as a mean) to its most key-similar
    target. Returns the kept prompt columns and the language model's input embeddings there."""
    import sys

    visual = model.model.visual
    qwen = sys.modules[type(visual).__module__]  # modeling_qwen2_vl or modeling_qwen2_5_vl
    video = "pixel_values_videos" in inputs
    grid = inputs["video_grid_thw" if video else "image_grid_thw"]
    block = visual.blocks[-1]
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(hidden=args[0], **kwargs),
                                             with_kwargs=True)
    with torch.no_grad():
        try:
            encode = model.model.get_video_features if video else model.model.get_image_features
            features = encode(inputs["pixel_values_videos" if video else "pixel_values"], grid).pooler_output[0]
        finally:
            handle.remove()
        x = block.norm1(seen["hidden"])  # [patches, dim]
        seq = x.shape[0]
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(x).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = seen["position_embeddings"]
        q, k = qwen.apply_rotary_pos_emb_vision(q, k, cos, sin)
        bounds = seen["cu_seqlens"].tolist()
        mask = torch.full((seq, seq), float("-inf"), dtype=q.dtype)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            mask[lo:hi, lo:hi] = 0
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # [heads, seq, head_dim]
        weights = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5 + mask, dim=-1)
        if getattr(visual, "window_size", None):  # Qwen2.5-VL runs its tower in window order
            window, _ = qwen.get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                     visual.patch_size)
            reverse = torch.argsort(window)
        else:  # Qwen2-VL: the patches come grouped by merged token, in order
            reverse = torch.arange(seq // 4)
        attention = weights.mean(dim=0).sum(dim=0).view(-1, 4).mean(dim=-1)[reverse]  # [tokens]
        keys = k.reshape(heads, -1, 4, k.shape[-1]).mean(dim=2)[:, reverse].mean(dim=0)  # [tokens, head_dim]
        merged, kept = features.clone(), torch.zeros(len(attention), dtype=torch.bool)
        frames = int(grid[0, 0]) if video else 1
        per_frame = len(attention) // frames
        for f in range(frames):  # each frame (or the image) on its own
            lo = f * per_frame
            part = slice(lo, lo + per_frame)
            n = per_frame
            total = int(n * keep)
            targets_n = max(int(total * contextual), 1)
            dominant = attention[part].topk(total - targets_n).indices
            is_dominant = torch.zeros(n, dtype=torch.bool)
            is_dominant[dominant] = True
            rest = (~is_dominant).nonzero().flatten()
            metric = keys[part][rest] / keys[part][rest].norm(dim=-1, keepdim=True)
            step = max(1, len(rest) // targets_n)
            target_slots = torch.arange(0, len(rest), step)[:targets_n]
            others = torch.tensor([i for i in range(len(rest)) if i not in target_slots.tolist()])
            assign = torch.nn.functional.one_hot((metric[others] @ metric[target_slots].T).argmax(dim=1), targets_n)
            assign = assign.to(features.dtype)
            frame_features = features[part]
            members = frame_features[rest][others]
            merged[lo + rest[target_slots]] = (frame_features[rest][target_slots]
                                               + assign.T @ members / assign.sum(dim=0).clamp(min=1)[:, None])
            kept[lo + dominant] = True
            kept[lo + rest[target_slots]] = True
    ids = inputs["input_ids"][0]
    token = model.config.video_token_id if video else model.config.image_token_id
    image_columns = (ids == token).nonzero().flatten()
    columns = sorted(set(range(len(ids))) - set(image_columns.tolist()) | set(image_columns[kept].tolist()))
    embeds = model.model.get_input_embeddings()(ids[columns][None])
    embeds[0, ids[columns] == token] = merged[kept].to(embeds.dtype)
    return columns, embeds


def test_visionzip_received_on_a_qwen_video_goes_frame_by_frame():
    """A Qwen2.5-VL video (4 temporal patches of 4x4 tokens): each frame is an image to visionzip-received; the
    kept columns and the prefill logits equal the formula by hand applied frame by frame."""
    from prunekit.testing import qwen_video_inputs

    model = tiny_family_model("qwen2_5_vl", num_layers=4, dtype=torch.float64)
    inputs = qwen_video_inputs(model, [(4, 8, 8)], seed=3)
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].double()
    columns, embeds = _lightcompress_visionzip(model, inputs, keep=0.33334, contextual=0.15625)
    with torch.no_grad():
        full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             video_grid_thw=inputs["video_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
        out = model.model.language_model(inputs_embeds=embeds, position_ids=full[:, :, columns],
                                         attention_mask=torch.ones(1, len(columns), dtype=torch.long))
        expected = model.lm_head(out.last_hidden_state)[0]
        with prunekit.apply(model, "visionzip-received") as pruner:
            logits = model(**inputs).logits[0]
    assert pruner.last_report.stages[0].kept_counts.tolist() == [4 * 5]  # int(16 * 0.33334) of each frame
    assert pruner.last_report.output_positions[0].tolist() == columns
    assert torch.allclose(logits, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen2_vl"])
def test_visionzip_received_on_qwen_equals_lightcompress_s_formula_by_hand(family):
    """visionzip-received at the language model's input of a Qwen2.5-VL (one 48x48 image: 36 tokens in 2x2-token
    windows, so the tower's window order matters) and a Qwen2-VL: the kept columns and the prefill and cached
    decode logits equal LightCompress's VisionZip for Qwen2.5-VL written out by hand, the language model run on
    its tokens."""
    model = tiny_family_model(family, num_layers=4, dtype=torch.float64)
    inputs = family_inputs(model, family, batch=1, seed=5, sizes=[(48, 48)], dtype=torch.float64)
    columns, embeds = _lightcompress_visionzip(model, inputs, keep=0.33334, contextual=0.15625)
    with torch.no_grad():
        full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
        lm = model.model.language_model
        out = lm(inputs_embeds=embeds, position_ids=full[:, :, columns], attention_mask=torch.ones(1, len(columns),
                 dtype=torch.long), use_cache=True)
        expected = model.lm_head(out.last_hidden_state)[0]
    with prunekit.apply(model, "visionzip-received") as pruner, torch.no_grad():
        logits = model(**inputs).logits[0]
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    report = pruner.last_report
    assert report.stages[0].kept_counts.tolist() == [12]  # int(36 * 0.33334): 10 dominant + 2 targets
    assert report.output_positions[0].tolist() == columns
    assert torch.allclose(logits, expected, atol=1e-10, rtol=0)
    # the cached decode steps continue after the prompt's largest position, as the bare model's would
    cache, mask, step_logits = out.past_key_values, torch.ones(1, len(columns), dtype=torch.long), expected[-1]
    top = int(full.max())
    for step in range(3):
        assert torch.allclose(generated.logits[step][0], step_logits.float(), atol=1e-6, rtol=0), step
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        with torch.no_grad():
            out = lm(inputs_embeds=model.model.get_input_embeddings()(step_logits.argmax().view(1, 1)),
                     position_ids=torch.full((3, 1, 1), top + 1 + step), attention_mask=mask, use_cache=True,
                     **with_cache(lm, cache))
        cache, step_logits = out.past_key_values, model.lm_head(out.last_hidden_state)[0, -1]


def test_threads_reading_the_qwen_tower_at_once_each_get_the_lone_answer():
    """The tower probes keep each forward's pieces in the calling thread's record: four threads calling one
    pruned Qwen2.5-VL with images of different sizes get what each prompt gets alone."""
    import threading

    model = tiny_family_model("qwen2_5_vl", num_layers=4)
    prompts = [family_inputs(model, "qwen2_5_vl", batch=1, seed=30 + t, sizes=[[(48, 48), (32, 64)][t % 2]])
               for t in range(4)]

    def call(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(**inputs).logits
        return logits, pruner.last_report.stages[0].kept

    failures: list[str] = []
    with prunekit.apply(model, "visionzip-received") as pruner:
        alone = [call(p) for p in prompts]
        start = threading.Barrier(len(prompts))

        def worker(t: int) -> None:
            start.wait()
            for i in range(5):
                try:
                    logits, kept = call(prompts[t])
                except Exception as error:  # noqa: BLE001 - every failure is reported
                    failures.append(f"thread {t} call {i}: {type(error).__name__}: {error}")
                    continue
                if not (torch.equal(logits, alone[t][0]) and torch.equal(kept, alone[t][1])):
                    failures.append(f"thread {t} call {i}: a different answer")

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures[:3]


def test_received_attention_in_query_chunks_equals_the_whole_matrix(monkeypatch):
    """The attention-received probe sums softmax rows chunk by chunk of queries: the sums equal those of the whole
    attention matrix, summed query by query in float64."""
    import prunekit.capture as capture

    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(2, 4, 50, 8, generator=g), torch.randn(2, 4, 50, 8, generator=g)
    expected = torch.zeros(2, 50, dtype=torch.float64)
    for i in range(50):  # one query row at a time
        row = torch.softmax((query[:, :, i:i + 1].double() @ key.double().transpose(-1, -2)) / 8 ** 0.5, dim=-1)
        expected += row.mean(dim=1)[:, 0]
    monkeypatch.setattr(capture, "RECEIVED_CHUNK", 2 * 4 * 50 * 7)  # chunks of 7 queries
    assert torch.allclose(capture.received_attention(query, key, {}).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_tiled_images_side_by_side_are_told_apart(family):
    """Three images with nothing between them (``<image><image><image>``, as OneVision's chat template writes
    them) keep what they keep with a text token between each: every image its own base tile and tiles."""
    model = tiny_family_model(family, num_layers=4)
    g = torch.Generator().manual_seed(0)
    pixel = torch.randn(3, 5, 3, 24, 24, generator=g)
    sizes = torch.tensor([[24, 24], [16, 32], [24, 24]])
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel, image_sizes=sizes).pooler_output
    n = [f.shape[0] for f in features]
    image = model.config.image_token_id
    recipe = {"name": "v", "positions": "original", "vision": {"criteria": {"n": {"type": "l2_norm"}}, "count": 2}}
    kept_per_image = []
    for between in ([], [7]):
        ids = torch.tensor([[1, 5, 6, *([image] * n[0]), *between, *([image] * n[1]), *between, *([image] * n[2]),
                             9, 10]])
        with prunekit.apply(model, recipe) as pruner, torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel, image_sizes=sizes)
        kept = set(pruner.last_report.stages[0].kept[0].tolist())
        columns = (ids[0] == image).nonzero().flatten().tolist()
        kept_per_image.append([[c - columns[sum(n[:i])] for c in columns[sum(n[:i]):sum(n[:i + 1])] if c in kept]
                               for i in range(3)])
    assert kept_per_image[0] == kept_per_image[1]
    tiles = _tiles_from_sizes(model, sizes)
    assert [len(k) for k in kept_per_image[0]] == [  # 2 of each tile, and the newlines
        sum(min(2, int((t == tile).sum())) for tile in t[t >= 0].unique().tolist()) + int((t == -2).sum())
        for t in tiles]


def test_an_image_encoded_outside_a_forward_does_not_disturb_the_next_one():
    model = tiny_family_model("qwen2_5_vl", num_layers=4)
    inputs = family_inputs(model, "qwen2_5_vl", batch=1, seed=5, sizes=[(48, 48)])
    with prunekit.apply(model, "visionzip-received") as pruner, torch.no_grad():
        first = model(**inputs).logits
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])  # the user's own call
        assert torch.equal(model(**inputs).logits, first)
    assert pruner.last_report.stages[0].kept_counts.tolist() == [12]


def test_merged_tokens_leading_a_padded_row_anchor_at_its_first_real_token():
    from prunekit.vision_input import unit_plan

    valid = torch.tensor([[False, False, True, True, True, True], [True, True, True, True, True, True]])
    units = [(0, torch.tensor([2, 3])), (1, torch.tensor([0, 1]))]  # each row's image starts its real tokens
    tokens = torch.randn(1, 4)
    shortened = [(tokens, torch.zeros(0, dtype=torch.long), 1), (tokens, torch.zeros(0, dtype=torch.long), 1)]
    plan, _ = unit_plan(units, shortened, valid, torch.device("cpu"))
    for b in range(2):
        slot = int((plan.merged[b] >= 0).nonzero()[0])
        anchor = int(plan.anchor[b, slot])
        assert plan.from_current[b, anchor] and bool(valid[b, plan.index[b, anchor]]), b  # a real token
        assert int(plan.index[b, anchor]) == (4 if b == 0 else 2)  # the first real token after the image


def test_visionzip_targets_without_visionzip_received_says_what_it_needs():
    model = tiny_family_model("qwen2_5_vl", num_layers=4)
    inputs = family_inputs(model, "qwen2_5_vl", batch=1, seed=5, sizes=[(48, 48)])
    recipe = {"name": "t", "vision": {"criteria": {"n": {"type": "l2_norm"}}, "keep": 0.5,
                                      "merge": {"type": "visionzip_targets"}}}
    with prunekit.apply(model, recipe), torch.no_grad(), pytest.raises(ValueError, match="visionzip_received"):
        model(**inputs)


def test_an_image_and_a_video_in_one_qwen_call_each_read_their_own_tower_values():
    """The tower encodes a call's images, then its videos; with the video first in the prompt, each still gets
    its own values: the same tokens kept as in a call holding it alone."""
    from prunekit.testing import qwen_video_inputs

    model = tiny_family_model("qwen2_5_vl", num_layers=4)
    clip = qwen_video_inputs(model, [(4, 8, 8)], seed=3)
    still = family_inputs(model, "qwen2_5_vl", batch=1, seed=5, sizes=[(48, 48)])
    image_id, video_id = model.config.image_token_id, model.config.video_token_id
    video_span = clip["input_ids"][0][(clip["input_ids"][0] == video_id)].tolist()
    image_span = still["input_ids"][0][(still["input_ids"][0] == image_id)].tolist()
    ids = torch.tensor([[1, 5, START_ID, *video_span, END_ID, 6, START_ID, *image_span, END_ID, 7, 8]])
    both = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": still["pixel_values"],
            "image_grid_thw": still["image_grid_thw"], "pixel_values_videos": clip["pixel_values_videos"],
            "video_grid_thw": clip["video_grid_thw"],
            "mm_token_type_ids": (ids == image_id).long() + 2 * (ids == video_id).long()}

    def kept_within(inputs: dict, token: int) -> list[int]:
        with prunekit.apply(model, "visionzip-received") as pruner, torch.no_grad():
            model(**inputs)
        columns = (inputs["input_ids"][0] == token).nonzero().flatten().tolist()
        kept = set(pruner.last_report.stages[0].kept[0].tolist())
        return [i for i, c in enumerate(columns) if c in kept]

    assert kept_within(both, video_id) == kept_within(clip, video_id)
    assert kept_within(both, image_id) == kept_within(still, image_id)
