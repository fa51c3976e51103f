"""Recipes: built-ins, YAML files, overrides, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

import prunekit
from conftest import SHAPE
from prunekit.testing import llava_inputs


def test_builtin_recipes_load_and_say_what_they_are():
    names = prunekit.builtin_recipe_names()
    assert {"transprune-high", "fastv", "random"} <= set(names)
    for name in names:
        recipe = prunekit.load_recipe(name)
        assert recipe.name == name and recipe.description


def test_transprune_high_is_what_the_paper_specifies():
    recipe = prunekit.load_recipe("transprune-high")
    stages = recipe.schedule.resolve(32)
    assert [(s.layer, s.keep) for s in stages] == [(7, 0.875), (9, 0.625), (12, 0.125)]
    assert recipe.positions == "compact"
    assert recipe.combiner.weights == {"ttv": 0.5, "iga": 0.5} and recipe.combiner.normalize == "sum"
    ttv = recipe.criteria["ttv"]
    assert (ttv.first_layer, ttv.last_layer, ttv.direction) == (6, 11, "one_minus_cos")
    counts = [int(s.keep_counts(torch.tensor([576]))) for s in stages]
    assert counts == [504, 360, 72]


def test_overrides_are_dotted_and_typed():
    recipe = prunekit.load_recipe("transprune-high", ["schedule.stages.0.keep=0.5",
                                                      "criteria.ttv.direction=one_minus_abs_cos",
                                                      "positions=original"])
    assert recipe.schedule.stages[0].keep == 0.5
    assert recipe.criteria["ttv"].direction == "one_minus_abs_cos"
    assert recipe.positions == "original"


def test_yaml_file_and_dict_sources(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(prunekit.load_recipe("fastv").to_yaml().replace("name: fastv", "name: mine"))
    assert prunekit.load_recipe(str(path)).name == "mine"
    recipe = prunekit.load_recipe({"criteria": {"random": {}}, "schedule": {"type": "stages",
                                                                          "stages": [{"layer": 1, "count": 4}]}})
    assert recipe.schedule.resolve(4)[0].count == 4
    assert prunekit.load_recipe(recipe) is recipe


@pytest.mark.parametrize("source,overrides,message", [
    ("no-such-recipe", None, r"unknown recipe 'no-such-recipe'; built-in recipes: .*'transprune-high'"),
    ("transprune-high", ["criteria.iga.type=igaa"], r"unknown criterion 'igaa'; registered criteria: .*'iga'"),
    ("transprune-high", ["schedule.stages.1.keep=1.5"], r"stages.1.keep must be in \(0, 1\], got 1.5"),
    ("transprune-high", ["schedule.stages.1.keep=0"], r"stages.1.keep must be in \(0, 1\], got 0"),
    ("transprune-high", ["shedule.type=stages"], r"unknown recipe key 'shedule'; valid keys: .*'schedule'"),
    ("transprune-high", ["criteria.ttv.firstlayer=2"], r"criteria.ttv .*Key 'firstlayer' not in 'AccumulatedTTV'.*"
                                                        r"valid keys: .*'first_layer'"),
    ("transprune-high", ["positions=compakt"], r"'positions'.*'compakt', expected one of \['compact', 'original'\]"),
    ("transprune-high", ["combiner.normalize=l2"], r"normalize='l2' is unknown; valid: .*'minmax'"),
    ("transprune-high", ["combiner.weights.tvv=0.5"], r"unknown criteria 'tvv'"),
    ("transprune-high", ["criteria.ttv.direction=sideways"], r"'direction'.*'sideways'.*'one_minus_cos'"),
    ({"criteria": {"ttv": {}}, "schedule": {"type": "stages", "stages": []}}, None, "'stages' is empty"),
    ({"criteria": {"a": {"type": "ttv"}, "b": {"type": "iga"}},
      "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}, None, "need a 'combiner'"),
    ({"criteria": {}, "schedule": {}}, None, "'criteria' is empty"),
    ("transprune-high", ["adapter=gemma9"], r"unknown adapter 'gemma9'; registered adapters: .*'llava'"),
    ("transprune-high", ["schedule.stages.0"], r"must look like 'dotted.key=value'"),
])
def test_bad_recipes_get_clear_errors(source, overrides, message):
    with pytest.raises(prunekit.RecipeError, match=message):
        prunekit.load_recipe(source, overrides)


def test_a_stage_past_the_model_depth_is_a_clear_error(llava32):
    with pytest.raises(prunekit.RecipeError, match=r"layer 40, past the model's depth.*16 decoder layers.*0..15"):
        prunekit.apply(llava32, "transprune-high", ["schedule.stages.2.layer=40"])


def test_accumulating_after_the_last_prune_is_a_clear_error(llava32):
    with pytest.raises(prunekit.RecipeError, match=r"criteria.ttv: .*accumulates from layer 8.*first prune is before layer 7"):
        prunekit.apply(llava32, "transprune-high", ["criteria.ttv.first_layer=8", "criteria.ttv.last_layer=11"])


def test_growing_or_unordered_stages_are_errors(llava32):
    with pytest.raises(prunekit.RecipeError, match="keeps 0.9, more than the stage before"):
        prunekit.apply(llava32, "transprune-high", ["schedule.stages.1.keep=0.9"])
    with pytest.raises(prunekit.RecipeError, match="layer 8 must come after layer 9"):
        prunekit.apply(llava32, "transprune-high", ["schedule.stages.0.layer=9", "schedule.stages.1.layer=8"])


def test_a_prompt_without_visual_tokens_is_a_clear_error(llava32):
    inputs = llava_inputs(SHAPE, batch=1, seed=0)
    text_only = inputs["input_ids"][inputs["input_ids"] != SHAPE.image_token_id][None]
    with prunekit.apply(llava32, "fastv"):
        with pytest.raises(prunekit.LayoutError, match=r"no visual tokens.*token id\(s\) \[255\].*'fastv'"):
            llava32(input_ids=text_only)


def test_inputs_embeds_only_is_a_clear_error(llava32):
    inputs = llava_inputs(SHAPE, batch=1, seed=0)
    embeds = llava32.get_input_embeddings()(inputs["input_ids"])
    with prunekit.apply(llava32, "fastv"):
        with pytest.raises(prunekit.LayoutError, match="needs|through input_ids"):
            llava32(inputs_embeds=embeds)


def test_a_model_no_adapter_knows_is_a_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, vocab_size=32))
    with pytest.raises(prunekit.AdapterError, match=r"no adapter matches LlamaForCausalLM.*'llama'.*'llava'"):
        prunekit.apply(model, "fastv")


def test_fastv_stage_before_layer_zero_cannot_read_the_layer_before(llava32):
    with pytest.raises(ValueError, match="layer_offset <= 0"):
        prunekit.apply(llava32, "fastv", ["schedule.stages.0.layer=0"])
