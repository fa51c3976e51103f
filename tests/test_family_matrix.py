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
from prunekit.flops import DecoderDims, recipe_estimate
from prunekit.recipe import builtin_recipe_names, load_recipe
from prunekit.testing import (MATRIX, MATRIX_FAMILIES, MATRIX_RECIPE_REASONS, MatrixRow, family_inputs,
                              family_matrix_markdown, missing_module, tiny_family_model)

LAYERS = 8
SCALED = ["reference_depth=28"]  # every built-in decoder recipe's layers onto 8 layers, stages distinct
KEEP_ALL = {"name": "keep-all", "criteria": {"iga": {}, "ttv": {"type": "ttv"}},
            "combiner": {"type": "weighted_sum", "weights": {"iga": 0.5, "ttv": 0.5}},
            "schedule": {"type": "stages", "stages": [{"layer": 1, "keep": 1.0}, {"layer": 3, "keep": 1.0}]}}
SIZES = {"glm4v": [(48, 32), (32, 32)], "glm46v": [(48, 32), (32, 32)], "glm4v_moe": [(32, 48), (24, 24)],
         "kimi_k25": [(32, 32), (24, 24)], "qwen2_vl": [(32, 48), (24, 24)], "qwen2_5_vl": [(32, 48), (24, 24)],
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
    if missing_module(row.needs):
        pytest.skip(f"{row.family}: {missing_module(row.needs)}")
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


VISION_KEEP_ALL = {"name": "vision-keep-all", "positions": "compact",
                   "vision": {"criteria": {"divprune": {"type": "divprune"}}, "keep": 1.0}}


def test_a_keep_everything_vision_block_is_bit_identical_and_a_per_image_one_matches_the_flops_model(family):
    """Every family runs a vision block (before the projector of LLaVA-1.5 and Video-LLaVA, at the language model's
    input elsewhere): keeping everything changes nothing; divprune-per-image keeps each image's own share, layer by
    layer what the FLOPs model predicts for that image."""
    row, model, inputs, bare_logits, bare_ids, (state, own_hooks) = family
    with prunekit.apply(model, VISION_KEEP_ALL) as pruner, torch.no_grad():
        logits = model(**inputs).logits
        ids = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    mask = inputs["attention_mask"].bool()
    assert torch.equal(logits[mask], bare_logits[mask]) and torch.equal(ids, bare_ids)
    assert pruner.last_report.stages[0].where == "vision"
    with prunekit.apply(model, "divprune-per-image") as pruner, torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    report = pruner.last_report
    dims = DecoderDims.from_config(model.config)
    if row.adapter in ("llava_next", "llava_onevision"):  # base tile and high-resolution grid apart, newlines kept:
        single = []  # tests/test_vision_input.py checks those against the tiles found from the image sizes
    else:
        single = [b for b in range(len(report.visual_tokens)) if _one_unit(pruner, inputs, b)]
        assert single, "no sample holds a single image: nothing checked"
    for b in single:
        visual = int(report.visual_tokens[b])
        predicted = recipe_estimate(pruner.recipe, dims, visual).visual_tokens
        assert report.visual_tokens_per_layer[b].tolist() == predicted, (b, visual)
    assert _hooks(model) == own_hooks
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _one_unit(pruner, inputs: dict, b: int) -> bool:
    """Whether sample ``b``'s visual tokens are one image (not several images or a video's frames)."""
    layout = pruner.adapter.token_layout(pruner.model, inputs["input_ids"][b:b + 1],
                                         inputs["attention_mask"][b:b + 1])
    return int(layout.image_index[layout.visual].max()) == 0 and not layout.has_frames


@pytest.mark.parametrize("recipe", DECODER_RECIPES)
def test_every_decoder_recipe_prunes_inside_generate_and_the_model_is_restored(family, recipe):
    row, model, inputs, _, bare_ids, (state, own_hooks) = family
    reason = dict(row.recipe_reasons).get(recipe) or next(
        (why for prefix, why in MATRIX_RECIPE_REASONS.items() if recipe.startswith(prefix)), None)
    if reason is not None:
        pytest.skip(f"{row.family} x {recipe}: {reason}")
    overrides = list(SCALED)
    if recipe == "mustdrop" and row.adapter != "llava":  # its key set reads a CLIP tower whose patches map one to
        overrides.append("criteria.mustdrop.key_fraction=0")  # one onto the images' tokens: the filter alone here
    with prunekit.apply(model, recipe, overrides) as pruner, torch.no_grad():
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
    rows = {row.family for row in MATRIX}
    assert set(MATRIX_FAMILIES) <= rows


def _installed_visual_families() -> set[str]:
    """Model types of the installed image-text-to-text mapping whose config has an image / video token id field."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    keys = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    found = set()
    for model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        try:
            config = CONFIG_MAPPING[model_type]()
        except ValueError:  # no default (vision-encoder-decoder on some versions): the class's fields then
            config = CONFIG_MAPPING[model_type]
        if any(hasattr(config, key) for key in keys):
            found.add(model_type)
    return found


def test_every_installed_image_text_family_with_a_visual_token_id_is_a_row():
    """The drift guard: a new family of transformers gets a row (tested, or a one-line reason) before CI passes."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    installed = _installed_visual_families()
    rows = {row.family: row for row in MATRIX}
    missing = sorted(installed - set(rows))
    assert not missing, f"families of transformers {transformers.__version__} without a MATRIX row: {missing}"
    for family, row in rows.items():
        if _VERSION >= tuple(int(p) for p in row.min_transformers.split(".")):
            assert family in installed, f"{family}: not an image-text family of transformers {transformers.__version__}"
            assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[family] == row.classes, family
        assert row.reason is None or ("\n" not in row.reason and row.reason.strip()), family


_WITHOUT_BUILDER = [row for row in MATRIX if row.family not in MATRIX_FAMILIES]


@pytest.mark.parametrize("row", _WITHOUT_BUILDER, ids=lambda row: row.family)
def test_each_reason_without_a_tiny_model_still_holds_on_the_default_config(row):
    """Rows without a builder: their default config, built on the meta device, still shows what the row says
    (prunekit refuses it with the row's error, the generic adapter accepts it, or it does not build)."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from prunekit.errors import AdapterError
    from prunekit.plugins import find_adapter
    from prunekit.testing import NO_BUILDER, NO_DEFAULT, TIMM

    if _VERSION < tuple(int(p) for p in row.min_transformers.split(".")):
        pytest.skip(f"{row.family} needs transformers >= {row.min_transformers}")
    config = CONFIG_MAPPING[row.family]()
    for key in ("image_token_id", "image_token_index"):  # a checkpoint sets the ids some defaults leave unset
        if hasattr(config, key) and getattr(config, key) is None:
            setattr(config, key, 5)
    if (row.reason or "").startswith((NO_DEFAULT, TIMM)):
        with torch.device("meta"), pytest.raises((ImportError, TypeError, ValueError, AttributeError, KeyError)):
            AutoModelForImageTextToText.from_config(config)
        return
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    if row.refused:
        with pytest.raises(AdapterError, match=re.escape(row.refused)):
            find_adapter(model)
    elif row.adapter != "none":
        assert find_adapter(model).name == row.adapter
    if row.reason is not None and row.reason.startswith(NO_BUILDER.split(";")[0]):
        assert row.adapter == "generic"


@pytest.mark.parametrize("row", [row for row in MATRIX if row.refused and row.family in
                                 MATRIX_FAMILIES], ids=lambda row: row.family)
def test_a_tiny_model_prunekit_refuses_gets_the_rows_error(row):
    """Hybrid decoders (linear attention, short convolutions): ``prunekit.apply`` names the layer kind and index
    and leaves the model without hooks."""
    from prunekit.errors import AdapterError

    if _VERSION < tuple(int(p) for p in row.min_transformers.split(".")):
        pytest.skip(f"{row.family} needs transformers >= {row.min_transformers}")
    model = tiny_family_model(row.family, num_layers=4, seed=1)
    kinds = model.config.get_text_config().layer_types
    first = next(i for i, kind in enumerate(kinds) if kind not in ("full_attention", "sliding_attention"))
    assert row.refused == f"decoder layer {first} is a {kinds[first]!r} layer"
    hooks = _hooks(model)
    with pytest.raises(AdapterError, match=re.escape(row.refused)):
        with prunekit.apply(model, "fastv"):
            pass
    assert _hooks(model) == hooks


def test_shieldgemma2_gets_the_gemma3_masks():
    """ShieldGemma 2 is a Gemma3ForConditionalGeneration under model_type shieldgemma2 (no save / reload round trip:
    transformers does not reload a saved tiny one): keep-all is identical, fastv prunes inside generate."""
    from transformers import AutoModelForImageTextToText

    from prunekit.testing import _spread_weights, family_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(family_config("shieldgemma2", LAYERS)).eval()
    _spread_weights(model, 0)
    inputs = family_inputs(model, "shieldgemma2", batch=2, seed=0)
    with torch.no_grad():
        bare = model(**inputs).logits
        with prunekit.apply(model, KEEP_ALL) as pruner:
            logits = model(**inputs).logits
        with prunekit.apply(model, "fastv", SCALED) as fastv:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    mask = inputs["attention_mask"].bool()
    assert pruner.adapter.name == "gemma3" and torch.equal(logits[mask], bare[mask])
    visual = fastv.last_report.visual_tokens
    assert bool((fastv.last_report.stages[0].kept_counts < visual).all())


def test_a_layer_kind_prunekit_cannot_feed_is_named_with_its_index():
    from prunekit.adapters import mask_maker
    from prunekit.errors import AdapterError

    with pytest.raises(AdapterError, match=r"Qwen3_5Model decoder layer 2 is a 'linear_attention' layer"):
        mask_maker("linear_attention", 2, "Qwen3_5Model")
    assert mask_maker("chunked_attention", 0, "Llama4") is not mask_maker("full_attention", 0, "Llama4")


@pytest.mark.parametrize("row", [row for row in MATRIX if row.family in MATRIX_FAMILIES and not row.refused],
                         ids=lambda row: row.family)
def test_doctor_on_each_familys_config_says_which_recipes_run(row, tmp_path, capsys):
    import json

    from prunekit.cli import main
    from prunekit.testing import family_config

    if _VERSION < tuple(int(p) for p in row.min_transformers.split(".")):
        pytest.skip(f"{row.family} needs transformers >= {row.min_transformers}")
    family_config(row.family, num_layers=32).save_pretrained(tmp_path)
    if missing_module(row.needs):  # the skeleton cannot be built: one line naming what to install
        assert main(["doctor", str(tmp_path), "--json"]) == 2
        assert row.needs in json.loads(capsys.readouterr().out)["error"]
        return
    assert main(["doctor", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapter"] == row.adapter
    recipes = report["recipes"]
    assert set(recipes) == set(builtin_recipe_names())
    for name in DECODER_RECIPES:  # 32 layers: every decoder-stage recipe fits as written
        if name == "mustdrop" and row.adapter not in ("llava", "video_llava"):  # its key set reads the tower
            assert "reads the vision tower from a decoder stage" in recipes[name], recipes[name]
            continue
        assert recipes[name] == "runs", (name, recipes[name])
    for name, status in recipes.items():
        assert status == "runs" or status.startswith("no: "), (name, status)
    vision = [n for n in builtin_recipe_names() if n not in DECODER_RECIPES]
    before = row.adapter in ("llava", "video_llava")
    assert report["vision_stage"].startswith("before the projector" if before else "at the language model's input")
    qwen_tower = row.family in ("qwen2_vl", "qwen2_5_vl")  # read at the input, per merged token
    assert [ok for name, ok in report["probes"].items() if name.startswith("vision stage")] == [
        True, before, before or qwen_tower]
    if row.adapter in ("llava", "video_llava"):  # a projector that receives each image's (frame's) patches
        assert all(recipes[n] == "runs" for n in vision), {n: recipes[n] for n in vision}
    else:  # vision blocks run at the language model's input: those that read the tower say so, the others run
        from prunekit.vision_input import InputVision, tower_readers

        readable = InputVision.READ_IN_TOWER if qwen_tower else ()
        reads = {n for n in vision if tower_readers(load_recipe(n).vision, readable)}
        assert reads and reads != set(vision)
        assert all("reads the vision tower" in recipes[n] for n in reads), {n: recipes[n] for n in reads}
        assert all(recipes[n] == "runs" for n in set(vision) - reads), {n: recipes[n] for n in vision}


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
