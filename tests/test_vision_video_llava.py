"""A recipe's stage before the language model on Video-LLaVA: images through the image tower, each video frame
through the video tower, both shortened before the shared projector.

The reference is built by hand from the bare model: the eager vision tower's CLS attention and hidden states, the
kept rows projected, a prompt with as many placeholders as kept tokens, and the language model run on those
embeddings (``inputs_embeds``), with and without a KV cache.
"""

from __future__ import annotations

import pytest
import torch

import prunekit
from prunekit.errors import LayoutError
from prunekit.testing import family_inputs, tiny_family_model

KEEP = 10  # tokens kept per image / per frame (of 36 patches; a frame has 37 tokens: CLS + 36)
CLS_RECIPE = {"name": "vision-cls", "positions": "compact",
              "vision": {"criteria": {"cls": {"type": "cls_attention", "layer": -2}}, "count": KEEP}}
KEEP_ALL = {"name": "vision-keep-all", "vision": {"criteria": {"cls": {"type": "cls_attention", "layer": -2}},
                                                  "keep": 1.0}}


@pytest.fixture(scope="module")
def model():
    return tiny_family_model("video_llava", num_layers=4)


@pytest.fixture(scope="module")
def eager():
    return tiny_family_model("video_llava", num_layers=4, attn_implementation="eager")


def _reference_tokens(eager, inputs: dict, video: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image or frame of the call: the kept token indices ``[units, KEEP]`` (ascending) and their projected
    features ``[units, KEEP, hidden]``, from the eager tower's CLS attention row at layer -2 (mean over heads)."""
    if video:
        pixel = inputs["pixel_values_videos"].flatten(0, 1)  # [batch * frames, 3, h, w]
        tower, drop_cls = eager.model.video_tower, False  # a frame keeps its CLS token (Video-LLaVA's video path)
    else:
        pixel = inputs["pixel_values_images"]
        tower, drop_cls = eager.model.image_tower, True  # the "default" strategy drops CLS
    with torch.no_grad():
        out = tower(pixel, output_attentions=True, output_hidden_states=True)
    cls_row = out.attentions[-2].mean(dim=1)[:, 0]  # [units, tokens]
    hidden = out.hidden_states[-2]  # [units, tokens, dim] (vision_feature_layer = -2)
    if drop_cls:
        cls_row, hidden = cls_row[:, 1:], hidden[:, 1:]
    kept = cls_row.topk(KEEP, dim=1).indices.sort(dim=1).values  # [units, KEEP]
    chosen = hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
    with torch.no_grad():
        return kept, eager.model.multi_modal_projector(chosen)


def _shortened_prompt(model, inputs: dict, video: bool, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt with ``KEEP`` placeholders per image or frame, embedded, the kept features in place."""
    config = model.config
    token = config.video_token_id if video else config.image_token_id
    rows = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"]):
        ids = ids[mask.bool()].tolist()
        first, count = ids.index(token), ids.count(token)
        units = count // (37 if video else 36)
        rows.append(ids[:first] + [token] * (units * KEEP) + ids[first + count:])
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
    embeds[input_ids == token] = features.reshape(-1, features.shape[-1]).to(embeds.dtype)
    return embeds, mask


@pytest.mark.parametrize("video", [False, True], ids=["images", "videos"])
def test_keeping_everything_is_bit_identical_to_the_bare_model(model, video):
    inputs = family_inputs(model, "video_llava", batch=2, seed=4, video=video)
    with torch.no_grad():
        bare = model(**inputs).logits
        bare_ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    with prunekit.apply(model, KEEP_ALL) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert pruner.last_report.stages[0].where == "vision"
    assert torch.equal(logits, bare) and torch.equal(ids, bare_ids)


@pytest.mark.parametrize("video", [False, True], ids=["images", "videos"])
def test_a_pruned_vision_stage_equals_the_hand_built_reference(model, eager, video):
    inputs = family_inputs(model, "video_llava", batch=2, seed=5, video=video)
    kept, features = _reference_tokens(eager, inputs, video)
    embeds, mask = _shortened_prompt(model, inputs, video, features)
    with torch.no_grad():
        reference = model(inputs_embeds=embeds, attention_mask=mask).logits
        reference_run = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                       return_dict_in_generate=True, output_logits=True)
    with prunekit.apply(model, CLS_RECIPE) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        run = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    units = kept.shape[0] // 2
    stage = pruner.last_report.stages[0]
    assert stage.where == "vision" and stage.kept_counts.tolist() == [units * KEEP] * 2
    for step, expected in zip(run.logits, reference_run.logits):  # cached decode: every step
        torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(run.sequences[:, -4:], reference_run.sequences[:, -4:])
    # the report names the prompt columns of the kept tokens: each unit's kept indices after its first token
    token = model.config.video_token_id if video else model.config.image_token_id
    per_unit = 37 if video else 36
    for row in range(2):
        first = int((inputs["input_ids"][row] == token).nonzero()[0])
        expected_columns = (first + torch.arange(units)[:, None] * per_unit + kept[row * units:(row + 1) * units])
        got = stage.kept[row][stage.kept[row] >= 0]
        assert got.tolist() == expected_columns.flatten().tolist()


def test_a_call_with_images_and_videos_is_refused_by_name(model):
    images = family_inputs(model, "video_llava", seed=6)
    videos = family_inputs(model, "video_llava", seed=6, video=True)
    input_ids = torch.cat([images["input_ids"], videos["input_ids"]], dim=1)
    call = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values_images": images["pixel_values_images"],
            "pixel_values_videos": videos["pixel_values_videos"]}
    with prunekit.apply(model, CLS_RECIPE), torch.no_grad():
        with pytest.raises(LayoutError, match=r"VideoLlavaForConditionalGeneration: a vision stage shortens the "
                                              r"images or the videos of one call, not both"):
            model(**call)
        model(**videos)  # the pruner still works after the refusal


def test_the_flops_model_on_a_clip_counts_each_frames_kept_tokens(model):
    from prunekit.flops import DecoderDims, recipe_estimate

    inputs = family_inputs(model, "video_llava", batch=1, seed=7, video=True)
    with prunekit.apply(model, CLS_RECIPE) as pruner, torch.no_grad():
        model(**inputs)
    kept = int(pruner.last_report.stages[0].kept_counts[0])  # 8 frames x KEEP
    estimate = recipe_estimate(prunekit.load_recipe(CLS_RECIPE), DecoderDims.from_config(model.config), 8 * 37,
                               frames=8)
    assert estimate.visual_tokens == [kept] * 4 == [8 * KEEP] * 4
