"""The family x recipe matrix: every family of ``prunekit.testing.MATRIX`` against every built-in
decoder-stage recipe, on tiny random-weight models of the real architectures.

Each cell: the recipe prunes inside ``generate`` (some stage keeps fewer visual tokens than the
prompt has, and the batch still generates); per family, a keep-all recipe leaves logits and
generated ids bit-identical to the bare model, and after every cell the model carries no hook and
its parameters are unchanged. A family or cell that cannot pass carries its reason in ``MATRIX``,
and docs/adapters.md shows the table generated from it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers

import prunekit
from prunekit.recipe import builtin_recipe_names, load_recipe
from prunekit.testing import MATRIX, MATRIX_RECIPE_REASONS, MatrixRow, family_inputs, family_matrix_markdown, tiny_family_model

LAYERS = 8
SCALED = ["reference_depth=28"]  # every built-in decoder recipe's layers onto 8 layers, stages distinct
KEEP_ALL = {"name": "keep-all", "criteria": {"iga": {}, "ttv": {"type": "ttv"}},
            "combiner": {"type": "weighted_sum", "weights": {"iga": 0.5, "ttv": 0.5}},
            "schedule": {"type": "stages", "stages": [{"layer": 1, "keep": 1.0}, {"layer": 3, "keep": 1.0}]}}
SIZES = {"glm4v": [(48, 32), (32, 32)], "qwen2_vl": [(32, 48), (24, 24)], "qwen2_5_vl": [(32, 48), (24, 24)],
         "qwen3_vl": [(32, 48), (24, 24)], "qwen3_vl_moe": [(32, 48), (24, 24)]}
DECODER_RECIPES = [name for name in builtin_recipe_names() if load_recipe(name).vision is None]
_VERSION = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:3])


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _runnable(row: MatrixRow) -> bool:
    return row.reason is None or row.reason == MATRIX_CONDITIONAL.get(row.family)


# Reasons that hold only where the bare model itself fails (checked below), not everywhere.
MATRIX_CONDITIONAL = {"llama4": next(r.reason for r in MATRIX if r.family == "llama4")}


@pytest.fixture(scope="module", params=[row for row in MATRIX if _runnable(row)], ids=lambda row: row.family)
def family(request):
    row: MatrixRow = request.param
    if _VERSION < tuple(int(p) for p in row.min_transformers.split(".")):
        pytest.skip(f"{row.family} needs transformers >= {row.min_transformers}")
    model = tiny_family_model(row.family, num_layers=LAYERS, seed=1)
    inputs = family_inputs(model, row.family, batch=2, seed=0, sizes=SIZES.get(row.family))
    try:
        with torch.no_grad():
            bare_logits = model(**inputs).logits
            bare_ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    except AttributeError as exc:
        if row.family in MATRIX_CONDITIONAL and "image_outputs" in str(exc):
            pytest.skip(f"{row.family}: {row.reason}")
        raise
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return row, model, inputs, bare_logits, bare_ids, (state, _hooks(model))


def test_keep_all_is_bit_identical_and_the_adapter_is_the_tables(family):
    row, model, inputs, bare_logits, bare_ids, (_, own_hooks) = family
    with prunekit.apply(model, KEEP_ALL) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert pruner.adapter.name == row.adapter
    mask = inputs["attention_mask"].bool()
    assert torch.equal(logits[mask], bare_logits[mask])
    assert torch.equal(ids, bare_ids)
    assert _hooks(model) == own_hooks  # the model's own hooks only


@pytest.mark.parametrize("recipe", DECODER_RECIPES)
def test_every_decoder_recipe_prunes_inside_generate_and_the_model_is_restored(family, recipe):
    row, model, inputs, _, bare_ids, (state, own_hooks) = family
    reason = dict(row.recipe_reasons).get(recipe) or next(
        (why for prefix, why in MATRIX_RECIPE_REASONS.items() if recipe.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(f"{row.family} x {recipe}: {reason}")
    with prunekit.apply(model, recipe, SCALED) as pruner, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    report = pruner.last_report
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]
    assert report is not None and len(report.stages) >= 1
    visual = report.visual_tokens  # [batch]
    asks_fewer = any(bool((stage.keep_counts(visual) < visual).any()) for stage in pruner.stages)
    if asks_fewer:  # a recipe keeping a count may keep a tiny image whole
        assert any(bool((s.kept_counts < visual).any()) for s in report.stages), f"{recipe} kept every visual token"
    assert _hooks(model) == own_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_docs_table_is_generated_from_the_matrix():
    docs = (Path(__file__).parents[1] / "docs" / "adapters.md").read_text()
    begin, end = "<!-- family matrix: begin -->", "<!-- family matrix: end -->"
    assert begin in docs and end in docs, "docs/adapters.md lacks the family matrix markers"
    current = docs.split(begin, 1)[1].split(end, 1)[0].strip()
    assert current == family_matrix_markdown(), "docs/adapters.md is stale: paste family_matrix_markdown() there"


def test_every_installed_image_text_family_with_a_builder_is_in_the_matrix():
    """A family the builders know is a row of the matrix (so the docs list it)."""
    from prunekit.testing import MATRIX_FAMILIES

    rows = {row.family for row in MATRIX}
    assert set(MATRIX_FAMILIES) <= rows


def test_a_layer_kind_prunekit_cannot_feed_is_named_with_its_index():
    from prunekit.adapters import mask_maker
    from prunekit.errors import AdapterError

    with pytest.raises(AdapterError, match=r"Qwen3_5Model decoder layer 2 is a 'linear_attention' layer"):
        mask_maker("linear_attention", 2, "Qwen3_5Model")
    assert mask_maker("chunked_attention", 0, "Llama4") is not mask_maker("full_attention", 0, "Llama4")


@pytest.mark.parametrize("row", [row for row in MATRIX if row.family != "gemma3n"], ids=lambda row: row.family)
def test_doctor_on_each_familys_config_says_which_recipes_run(row, tmp_path, capsys):
    import json

    from prunekit.cli import main
    from prunekit.testing import family_config

    if _VERSION < tuple(int(p) for p in row.min_transformers.split(".")):
        pytest.skip(f"{row.family} needs transformers >= {row.min_transformers}")
    family_config(row.family, num_layers=32).save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == row.adapter
    recipes = report["recipes"]
    assert set(recipes) == set(builtin_recipe_names())
    for name in DECODER_RECIPES:  # 32 layers: every decoder-stage recipe fits as written
        assert recipes[name] == "runs", (name, recipes[name])
    for name, status in recipes.items():
        assert status == "runs" or status.startswith("no: "), (name, status)
    if row.adapter != "llava":  # no vision stage through these adapters: vision recipes say why
        vision = [n for n in builtin_recipe_names() if n not in DECODER_RECIPES]
        assert all("no vision stage" in recipes[n] for n in vision)


def test_doctor_says_why_a_recipe_does_not_fit_a_shallow_model(tmp_path, capsys):
    from prunekit.cli import main
    from prunekit.testing import family_config

    family_config("qwen3_vl", num_layers=8).save_pretrained(tmp_path)
    assert main(["doctor", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "recipes that run as written" in out
    assert "transprune-high: recipe 'transprune-high'" in out and "the model has 8 decoder layers" in out
    assert "fastv" in out.split("recipes that run as written", 1)[1].splitlines()[0]


@pytest.mark.skipif(not hasattr(transformers, "Qwen3_5Config"), reason="no Qwen3.5 (linear attention) here")
def test_a_decoder_with_linear_attention_layers_is_refused_naming_the_layer_kind_and_index(tmp_path, capsys):
    from prunekit.cli import main

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=256)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64)
    config = transformers.Qwen3_5Config(text_config=text, vision_config=vision)
    config.save_pretrained(tmp_path)
    first = config.text_config.layer_types.index("linear_attention")
    assert main(["doctor", str(tmp_path)]) == 1
    assert f"decoder layer {first} is a 'linear_attention' layer" in capsys.readouterr().out


def test_the_gemma3n_reason_still_holds():
    """Gemma 3n's row says no tiny model can be built from config classes: its vision tower needs timm."""
    if not hasattr(transformers, "Gemma3nConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma 3n")
    try:
        import timm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.fail("timm is installed: build a tiny Gemma 3n and test it in the matrix (then update its row)")
    with torch.device("meta"), pytest.raises(ImportError, match="timm"):
        transformers.Gemma3nForConditionalGeneration(transformers.Gemma3nConfig())
