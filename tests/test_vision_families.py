"""Vision stages before the projector: a SigLIP tower's missing CLS, in-place mergers (the stage at the language
model's input on the other families: tests/test_vision_input.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import prunekit


def test_a_siglip_tower_refuses_cls_criteria_and_runs_the_others():
    """A LLaVA whose tower is SigLIP has no CLS token: CLS-attention criteria say so; a vision stage that reads
    the patches only shortens each image (its 36 patches, no CLS, under the "full" strategy)."""
    import transformers as tf

    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=24, patch_size=4)
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=300)
    torch.manual_seed(0)
    model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=255, vision_feature_select_strategy="full",
        vision_feature_layer=-1)).eval()
    from prunekit.doctor import diagnose

    recipes = diagnose(model)["recipes"]
    key_set = {"name": "key-set", "criteria": {"m": {"type": "mustdrop_dual_attention"}},  # from a decoder stage
               "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 1.0}]}}
    for name in ("visionzip", "fastervlm-64", "vispruner-64", key_set):
        with pytest.raises(prunekit.RecipeError, match=r"read the vision tower's CLS attention \(token 0\), but "
                                                       r"LlavaForConditionalGeneration's tower has no CLS token"):
            prunekit.apply(model, name)
        if isinstance(name, str):  # prunekit doctor says so too
            assert recipes[name].startswith("no: ") and "no CLS token" in recipes[name], (name, recipes[name])
    rows = [[1, 5, 6, *([255] * 36), 7, 8], [1, 9, *([255] * 36), *([255] * 36), 7]]  # <image><image> in row 1
    ids = torch.tensor([[0] * (75 - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (75 - len(r)) + [1] * len(r) for r in rows])
    inputs = {"input_ids": ids, "attention_mask": mask,
              "pixel_values": torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))}
    ten = {"name": "vision-random-10", "vision": {"criteria": {"r": {"type": "random"}}, "count": 10}}
    with prunekit.apply(model, ten) as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruner.last_report.stages[0].kept_counts.tolist() == [10, 20]  # 10 of each image: row 1 holds two


# ---------------------------------------------------------------------------------------------
# an in-place merger at a vision stage (before the projector)
# ---------------------------------------------------------------------------------------------
@dataclass
class IntoNearest(prunekit.Merger):
    """Each dropped patch is averaged into the kept patch most like it (cosine), in place."""

    name: ClassVar[str] = "test_into_nearest"
    in_place: ClassVar[bool] = True

    def count(self, dropped: int) -> int:
        return 0

    def merge_into_kept(self, hidden, kept, scores, ctx):
        out = hidden.clone()
        unit = torch.nn.functional.normalize(hidden.float(), dim=-1)
        for b in range(hidden.shape[0]):
            keep, drop = kept[b].nonzero().flatten(), (~kept[b]).nonzero().flatten()
            nearest = keep[(unit[b, drop] @ unit[b, keep].T).argmax(dim=1)]  # [n_dropped]
            for k in keep.tolist():
                members = drop[nearest == k]
                out[b, k] = torch.cat([hidden[b, k:k + 1], hidden[b, members]]).mean(dim=0)
        return out


class _MergerPlugin:
    @prunekit.hookimpl
    def prunekit_add_mergers(self):
        return [IntoNearest]


def test_an_in_place_merger_at_a_vision_stage_replaces_the_kept_patches_before_the_projector(llava64,
                                                                                            single_inputs64):
    """The projector receives the kept patches with the dropped ones averaged in; the reference takes the
    tower's own features, the kept patches from the report, and the average by hand."""
    prunekit.register_plugin(_MergerPlugin(), name="test-into-nearest")
    try:
        recipe = {"name": "vision-into-nearest", "vision": {"criteria": {"r": {"type": "random"}}, "count": 9,
                                                            "merge": {"type": "test_into_nearest"}}}
        model, inputs = llava64, single_inputs64
        with torch.no_grad():
            features = model.model.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[-2]
            features = features[:, 1:]  # [1, 36, dim]: the "default" strategy's patches
            with prunekit.apply(model, recipe) as pruner:
                projected = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
                model(**inputs)
        stage = pruner.last_report.stages[0]
        first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
        kept = (stage.kept[0] - first).tolist()
        assert len(kept) == 9 and int(stage.merged_counts[0]) == 0
        expected = IntoNearest().merge_into_kept(features, torch.isin(torch.arange(36), torch.tensor(kept))[None],
                                                 None, None)[:, kept]
        with torch.no_grad():
            reference = model.model.multi_modal_projector(expected)
        torch.testing.assert_close(torch.cat(list(projected))[None] if isinstance(projected, (list, tuple))
                                   else projected, reference, rtol=0, atol=1e-10)
    finally:
        prunekit.unregister_plugin("test-into-nearest")
