"""DART against a slow re-derivation of the official formula (keys and final-normed states by hand)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import prunekit
from conftest import SHAPE, unpad
from prunekit.errors import RecipeError
from prunekit.flops import DecoderDims, recipe_estimate
from prunekit.testing import llava_inputs, tiny_llava
from reference import RefModel, rms_norm, run_reference


@pytest.fixture(scope="module")
def llava64():
    """A float64 tiny LLaVA whose RMSNorm weights are not all ones (so the final norm changes cosines)."""
    model = tiny_llava(SHAPE, seed=0, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and param.dim() == 1:
                param.copy_(1 + 0.5 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def official_dart(model, inputs: dict, layer: int, pivot_image: int, pivot_text: int, keep: int) -> list[int]:
    """The official selection, written out again: one unpadded sample, Python sets over prompt positions."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        states = model(**inputs, output_hidden_states=True).hidden_states  # states[i]: the input of layer i
    ref = RefModel(model)
    last_layer_state = rms_norm(states[layer][0], ref.final_norm)  # [seq, dim]
    x = rms_norm(states[layer - 1][0], ref.layers[layer - 1].input_layernorm)
    _, k, _ = ref.qkv(ref.layers[layer - 1], x, torch.arange(ids.shape[0]))  # [heads, seq, head_dim], after RoPE
    k = k.transpose(0, 1).reshape(ids.shape[0], -1)  # [seq, heads * head_dim]
    image = (ids == SHAPE.image_token_id).nonzero().flatten()
    start, length = int(image[0]), len(image)
    image_l1, text_l1 = k[start:start + length].norm(p=1, dim=-1), k[start + length:].norm(p=1, dim=-1)
    image_indices = (image_l1.topk(pivot_image).indices + start).tolist()
    query_indices = (text_l1.topk(pivot_text).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    token_topk = (keep - pivot_image) // (pivot_image + pivot_text)
    valid = set(range(start, start + length)) - set(image_indices)
    valid_list = list(valid)
    for item in list(indices_set):
        cos = -F.cosine_similarity(last_layer_state[item, :], last_layer_state[valid_list, :], dim=-1)
        real = [valid_list[i] for i in cos.topk(token_topk).indices]
        indices_set.update(real)
        valid.difference_update(real)
        valid_list = list(valid)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)


@pytest.mark.parametrize("pivots,keep", [((4, 4), 28), ((2, 2), 18), ((3, 1), 31)])
def test_dart_keeps_what_the_official_formula_keeps_and_answers_as_the_reference(llava64, single_inputs64, pivots,
                                                                                 keep):
    overrides = [f"criteria.dart.pivot_image={pivots[0]}", f"criteria.dart.pivot_text={pivots[1]}",
                 f"schedule.stages.0.count={keep}"]
    with prunekit.apply(llava64, "dart", overrides) as pruner, torch.no_grad():
        logits = llava64(**single_inputs64).logits[0]
    kept = pruner.last_report.stages[0].kept[0]
    expected = official_dart(llava64, single_inputs64, 2, *pivots, keep)
    assert kept.tolist() == expected
    ref = run_reference(RefModel(llava64), single_inputs64["input_ids"][0], single_inputs64["pixel_values"],
                        [(2, 1.0)], "given", "original", given_kept=[kept])
    torch.testing.assert_close(logits, ref.logits, rtol=0, atol=1e-8)


def test_dart_in_a_padded_batch_keeps_what_each_sample_keeps_alone(llava64):
    inputs = llava_inputs(SHAPE, batch=3, seed=8, dtype=torch.float64)
    with prunekit.apply(llava64, "dart", ["schedule.stages.0.count=20"]) as pruner, torch.no_grad():
        llava64.generate(**inputs, max_new_tokens=2, do_sample=False)
        batch_kept = pruner.last_report.stages[0].kept
        for row in range(3):
            alone = unpad(inputs, row)
            llava64(**alone)
            pad = int((inputs["attention_mask"][row] == 0).sum())
            assert (pruner.last_report.stages[0].kept[0] + pad).tolist() == batch_kept[row].tolist()


def test_dart_recipe_counts_match_the_flops_model(llava64):
    inputs = llava_inputs(SHAPE, batch=2, seed=4, dtype=torch.float64)
    with prunekit.apply(llava64, "dart", ["schedule.stages.0.count=20"]) as pruner, torch.no_grad():
        llava64.generate(**inputs, max_new_tokens=2, do_sample=False)
    recipe = prunekit.load_recipe("dart", ["schedule.stages.0.count=20"])
    predicted = recipe_estimate(recipe, DecoderDims.from_config(llava64.config), SHAPE.visual_tokens).visual_tokens
    assert pruner.last_report.visual_tokens_per_layer[0].tolist() == predicted


@pytest.mark.parametrize("override,message", [
    ("schedule.stages.0.layer=0", "dart reads the keys of the layer before its prune layer"),
    ("criteria.dart.pivot_image=-1", "pivot_image=-1 is invalid"),
])
def test_dart_refuses_what_it_cannot_do(llava64, override, message):
    with pytest.raises(RecipeError, match=message):
        prunekit.apply(llava64, "dart", [override])
