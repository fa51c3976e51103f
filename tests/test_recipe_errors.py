"""Recipe mistakes a user makes by hand: every one is a RecipeError that names the key, the value and what is
valid, never a bare OmegaConf/YAML/TypeError and never a silent no-op."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
