"""Recipe mistakes a user makes by hand: every one is a RecipeError that names the key, the value and what is
valid, never a bare OmegaConf/YAML/TypeError and never a silent no-op."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit
from prunekit.errors import PrunekitError, RecipeError
from prunekit.recipe import check_stages, load_recipe

SCHEDULE = {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}


@pytest.mark.parametrize("override, named", [
    ("schedule.stages=[1,", r"override 'schedule.stages=\[1,'.*value '\[1,' is not valid YAML"),
    ("criteria.ttv={alpha: ", r"value '\{alpha: ' is not valid YAML"),
    ("criteria=[1, 2]", r"'criteria' is a mapping \('fastv'\), got list \[1, 2\]"),
    ("criteria=3", r"'criteria' is a mapping \('fastv'\), got int 3"),
    ("schedule=7", r"'schedule' is a mapping .*got int 7"),
    ("criteria.nothere=null", r"'criteria.nothere=null' removes a criterion, but the recipe has no criterion "
                              r"'nothere' there; its criteria: 'fastv'"),
    ("colour=red", r"unknown recipe key 'colour'; valid keys: .*'criteria'"),
])
def test_a_bad_override_names_itself_and_what_is_valid(override, named):
    with pytest.raises(RecipeError, match=named):
        load_recipe("fastv", [override])


def test_overrides_given_as_one_string_are_refused_not_split_into_characters():
    with pytest.raises(RecipeError, match=r"got one string 'schedule.stages=\[\]'; pass \['schedule.stages=\[\]'\]"):
        load_recipe("fastv", "schedule.stages=[]")


def test_a_null_criterion_override_removes_it():
    recipe = load_recipe("transprune-high", ["criteria.iga=null", "combiner=null"])
    assert list(recipe.criteria) == ["ttv"]
    with pytest.raises(RecipeError, match=r"weights name unknown criteria 'iga'; the recipe's criteria: 'ttv'"):
        load_recipe("transprune-high", ["criteria.iga=null"])  # its combiner still weighs iga: said, not ignored


@pytest.mark.parametrize("recipe, named", [
    ({"criteria": ["ttv"], "schedule": SCHEDULE}, r"'criteria' must be a mapping, got list \['ttv'\]"),
    ({"criteria": {"ttv": {}}, "schedule": [SCHEDULE]}, r"'schedule' must be a mapping, got list"),
    ({"criteria": {"ttv": {}}, "schedule": SCHEDULE, "combiner": "weighted_sum"},
     r"'combiner' must be a mapping, got str 'weighted_sum'"),
    ({"vision": {"criteria": ["visionzip"], "count": 8}}, r"'vision.criteria' must be a mapping, got list"),
])
def test_a_container_of_the_wrong_kind_in_a_recipe_dict_is_named(recipe, named):
    with pytest.raises(RecipeError, match=named):
        load_recipe(recipe)


def test_a_reference_depth_that_folds_stages_onto_one_layer_says_so():
    recipe = load_recipe("transprune-high", ["reference_depth=1000"])
    with pytest.raises(RecipeError, match=r"reference_depth 1000 maps the stage layers \[7, 9, 12\] onto \[1, 1, 1\] "
                                          r"of the model's 16 decoder layers"):
        check_stages(recipe, 16)


_keys = st.sampled_from(["name", "criteria", "criteria.fastv", "criteria.fastv.layer", "schedule", "schedule.stages",
                         "schedule.type", "combiner", "merge", "vision", "vision.count", "positions",
                         "reference_depth", "bogus", "criteria.fastv.bogus"])
_values = st.one_of(st.sampled_from(["null", "[1,", "{a: ", "[]", "{}", "0.5", "-3", "abc", "[7, 9]",
                                     "{type: stages}", "{layer: 2, keep: 0.5}", "nan", "'x'", ":"]),
                    st.text(max_size=12))


@settings(max_examples=150, deadline=None)
@given(overrides=st.lists(st.builds(lambda k, v: f"{k}={v}", _keys, _values), min_size=1, max_size=3))
def test_any_override_either_loads_and_resolves_or_is_a_prunekit_error(overrides):
    """Random overrides never escape as a bare YAML, OmegaConf, Type or Key error."""
    try:
        recipe = load_recipe("fastv", overrides)
        check_stages(recipe, 16)
    except PrunekitError:
        pass


# ---- random prompts through a pruner: the right shape, or a PrunekitError; never an internal error ----

_RECIPES = [("fastv", []), ("transprune-high", ["reference_depth=16"]), ("divprune", []),
            ("visionzip-64", ["vision.count=12"]), ("sparsevlm-64", ["reference_depth=32"])]


@st.composite
def _prompts(draw):
    """1-2 samples, each: text, then 0-2 images (side by side or a token apart), then text; left-padded."""
    from conftest import SHAPE

    samples = draw(st.integers(1, 2))
    images = draw(st.integers(0, 2))  # the same count per sample: pixel_values are per image
    apart = draw(st.booleans())
    rows = []
    for _ in range(samples):
        prefix = draw(st.lists(st.integers(3, SHAPE.vocab_size - 2), min_size=1, max_size=5))
        question = draw(st.lists(st.integers(3, SHAPE.vocab_size - 2), min_size=1, max_size=6))
        prefix = [t for t in prefix if t != SHAPE.image_token_id] or [3]
        question = [t for t in question if t != SHAPE.image_token_id] or [4]
        visual = []
        for i in range(images):
            visual += [SHAPE.image_token_id] * SHAPE.visual_tokens + ([5] if apart and i + 1 < images else [])
        rows.append([1, *prefix, *visual, *question])
    width = max(len(r) for r in rows)
    ids = torch.zeros(samples, width, dtype=torch.long)
    mask = torch.zeros(samples, width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    pixels = torch.randn(samples * images, 3, SHAPE.image_size, SHAPE.image_size,
                         generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    inputs = {"input_ids": ids, "attention_mask": mask}
    if images:
        inputs["pixel_values"] = pixels
    return inputs, images, draw(st.sampled_from(_RECIPES))


@settings(max_examples=40, deadline=None)
@given(case=_prompts())
def test_random_prompts_through_a_pruner_answer_or_say_why(llava32, case):
    inputs, images, (recipe, overrides) = case
    try:
        with prunekit.apply(llava32, recipe, overrides) as pruner, torch.no_grad():
            out = llava32.generate(**inputs, max_new_tokens=2, do_sample=False)
    except PrunekitError as error:
        assert images == 0 and "no visual tokens" in str(error)  # the one prompt a recipe cannot prune
        return
    assert images > 0 and out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 2)
    report = pruner.last_report
    assert report is not None and all((s.kept_counts >= 0).all() for s in report.stages)


def test_a_mapping_into_a_list_an_earlier_override_nulled_is_a_recipe_error():
    """Found by the hypothesis test above: OmegaConf's own TypeError, named."""
    with pytest.raises(RecipeError, match=r"schedule \(schedule 'stages'\): Cannot merge incompatible container types: "
                                          r"a parameter holds a mapping where a list belongs"):
        load_recipe("fastv", ["schedule.stages=null", "schedule.stages={}"])
