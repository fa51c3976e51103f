"""What a hostile or careless user hits: every bad input is a clear error naming the value and what is valid.

Recipe side: combiner weights that would make every stage keep the first tokens in order.
Command line: each bad argument, file or folder exits 2 with one ``prunekit: error: ...`` line (and a
JSON error object under ``--json``), never a traceback. ``prunekit bench`` measures recipes
interleaved per repeat and reports the spread.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit import bench
from prunekit.cli import main
from prunekit.errors import PluginError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
TWO_CRITERIA = {
    "criteria": {"ttv": {"type": "accumulated_ttv", "first_layer": 2, "last_layer": 4}, "iga": {}},
    "schedule": {"type": "stages", "stages": [{"layer": 5, "keep": 0.5}]},
}
COMBINERS = ["weighted_sum", "rank_fusion", "product", "max"]


# ---- combiner weights (issue point 3) ----

@pytest.mark.parametrize("combiner", COMBINERS)
@pytest.mark.parametrize("weights, named", [
    ({"ttv": math.nan, "iga": 0.5}, r"weights\.ttv=nan is not a finite number"),
    ({"ttv": 0.5, "iga": math.inf}, r"weights\.iga=inf is not a finite number"),
    ({"ttv": -math.inf, "iga": 0.5}, r"weights\.ttv=-inf is not a finite number"),
    ({"ttv": 0.0, "iga": 0.0}, r"weights \{ttv: 0\.0, iga: 0\.0\} are all zero"),
    ({"ttv": 1.0, "iga": -1.0}, r"weights \{ttv: 1\.0, iga: -1\.0\} sum to 0\.0"),
    ({"ttv": 0.5, "iga": -2.0}, r"weights \{ttv: 0\.5, iga: -2\.0\} sum to -1\.5"),
])
def test_nan_inf_zero_or_cancelling_combiner_weights_are_refused_at_load(combiner, weights, named):
    recipe = {**TWO_CRITERIA, "combiner": {"type": combiner, "weights": weights}}
    with pytest.raises(RecipeError, match=named) as info:
        prunekit.load_recipe(recipe)
    message = str(info.value)
    assert "combiner" in message  # where: the recipe's combiner
    assert "finite number" in message or "sum to more than 0" in message  # what is valid


def test_bad_weights_given_as_overrides_are_refused_too():
    for override, named in [("combiner.weights.ttv=.nan", "weights.ttv=nan"),
                            ("combiner.weights.iga=-.inf", "weights.iga=-inf"),
                            ("combiner.weights.iga=-0.5", "sum to 0.0")]:
        with pytest.raises(RecipeError, match=re.escape(named)):
            prunekit.load_recipe("transprune-high", [override])


def test_a_negative_weight_that_the_others_outweigh_is_valid():
    recipe = prunekit.load_recipe({**TWO_CRITERIA, "combiner": {"type": "weighted_sum",
                                                                "weights": {"ttv": 1.5, "iga": -0.5}}})
    assert recipe.combiner.weights == {"ttv": 1.5, "iga": -0.5}


@pytest.mark.parametrize("spec, named", [
    ({"type": "rank_fusion", "k0": math.nan}, "k0=nan"),
    ({"type": "rank_fusion", "k0": -1.0}, "k0=-1.0"),
    ({"type": "product", "eps": 0.0}, "eps=0.0"),
    ({"type": "product", "eps": math.inf}, "eps=inf"),
])
def test_non_finite_combiner_constants_are_refused(spec, named):
    with pytest.raises(RecipeError, match=re.escape(named)):
        prunekit.load_recipe({**TWO_CRITERIA, "combiner": spec})


# ---- helpers for the command line ----

def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_cli_error(code: int, out: str, err: str, *named: str, as_json: bool = False) -> str:
    """Exit 2, one ``prunekit: error:`` line naming each of ``named``, no traceback; a JSON object under --json."""
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.startswith("prunekit: error: ")]
    assert len(lines) == 1, err
    for text in named:
        assert text in lines[0], (text, lines[0])
    if as_json:
        payload = json.loads(out)
        assert set(payload) == {"error"} and payload["error"] == lines[0][len("prunekit: error: "):]
    else:
        assert out == ""
    return lines[0]


@pytest.fixture()
def llava_folder(tmp_path, llava32) -> Path:
    """config.json of the 16-layer tiny LLaVA (no weights: flops and the argument checks read only the config)."""
    config = copy.deepcopy(llava32.config)
    config.architectures = [type(llava32).__name__]
    folder = tmp_path / "llava16"
    config.save_pretrained(folder)
    return folder


@pytest.fixture()
def png(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "image.png"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


# ---- prunekit flops (issue point 7) ----

DEEP = """
name: deep
criteria: {fastv: {type: fastv_attention}}
schedule: {type: stages, stages: [{layer: 1000, keep: 0.5}]}
"""
READS_DEEP = """
name: reads-deep
criteria: {ttv: {type: accumulated_ttv, first_layer: 2, last_layer: 500}}
schedule: {type: stages, stages: [{layer: 3, keep: 0.5}]}
"""


@pytest.mark.parametrize("text, layer", [(DEEP, "1000"), (READS_DEEP, "500")],
                         ids=["prunes-past-depth", "reads-past-depth"])
def test_flops_refuses_a_recipe_past_the_models_depth_with_the_message_apply_gives(text, layer, tmp_path, capsys,
                                                                                   llava32, llava_folder):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as info:
        prunekit.apply(llava32, str(path))
    assert layer in str(info.value) and "0..15" in str(info.value)
    for as_json in (False, True):
        code, out, err = _cli(capsys, "flops", str(llava_folder), "--recipe", str(path), *(["--json"] * as_json))
        _assert_cli_error(code, out, err, str(info.value), as_json=as_json)


def test_flops_accepts_recipes_that_apply_accepts_on_the_same_depth(capsys, llava_folder):
    code, out, _ = _cli(capsys, "flops", str(llava_folder), "--recipe", "fastv", "pdrop", "transprune-high", "--json")
    assert code == 0
    assert [r["recipe"] for r in json.loads(out)["recipes"]] == ["none", "fastv", "pdrop", "transprune-high"]


@pytest.mark.parametrize("argv, named", [
    (["--visual-tokens", "0"], ["--visual-tokens", "0", "integer >= 1"]),
    (["--visual-tokens", "-5"], ["--visual-tokens", "-5", "integer >= 1"]),
    (["--text-tokens", "-1"], ["--text-tokens", "-1", "integer >= 0"]),
    (["--visual-tokens", "many"], ["--visual-tokens", "'many'", "integer >= 1"]),
])
def test_flops_refuses_token_counts_that_are_not_counts(argv, named, capsys, llava_folder):
    for as_json in (False, True):
        code, out, err = _cli(capsys, "flops", str(llava_folder), *argv, *(["--json"] * as_json))
        _assert_cli_error(code, out, err, *named, as_json=as_json)


@pytest.mark.parametrize("ratio", ["2.0", "0", "-0.5", "nan"])
def test_eval_refuses_a_keep_ratio_outside_zero_one(ratio, capsys):
    for as_json in (False, True):
        code, out, err = _cli(capsys, "eval", "--ratios", "0.5", ratio, *(["--json"] * as_json))
        _assert_cli_error(code, out, err, "--ratios", f"{float(ratio):g}", "(0, 1]", as_json=as_json)


# ---- every command-line case of issue point 8 ----

def _broken_config(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llava", ')
    return folder


def _no_config(folder: Path) -> Path:
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    return folder


def _empty(folder: Path) -> Path:
    folder.mkdir()
    return folder


MODEL_FOLDERS = {  # name -> (make the folder, words the error names)
    "broken-config": (_broken_config, ["config.json is not valid JSON"]),
    "no-config": (_no_config, ["is not a model folder", "no config.json"]),
    "empty-folder": (_empty, ["is not a model folder", "it is empty"]),
    "missing-folder": (lambda folder: folder, ["does not exist"]),
}


@pytest.mark.parametrize("command", ["flops", "doctor"])
@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_a_broken_missing_or_empty_model_folder_is_an_error_line(case, command, tmp_path, capsys):
    make, named = MODEL_FOLDERS[case]
    folder = make(tmp_path / case)
    for as_json in (False, True):
        code, out, err = _cli(capsys, command, str(folder), *(["--json"] * as_json))
        _assert_cli_error(code, out, err, str(folder), *named, as_json=as_json)


@pytest.mark.parametrize("case", sorted(MODEL_FOLDERS))
def test_run_with_a_broken_missing_or_empty_model_folder_is_an_error_line(case, tmp_path, capsys, png):
    make, named = MODEL_FOLDERS[case]
    folder = make(tmp_path / case)
    code, out, err = _cli(capsys, "run", "--model", str(folder), "--image", str(png), "--prompt", "what?",
                          "--out", str(tmp_path / "out.png"))
    _assert_cli_error(code, out, err, str(folder), *named)


def test_run_with_a_config_but_no_weights_is_an_error_line(tmp_path, capsys, llava_folder, png):
    code, out, err = _cli(capsys, "run", "--model", str(llava_folder), "--image", str(png), "--prompt", "what?",
                          "--out", str(tmp_path / "out.png"))
    _assert_cli_error(code, out, err, "cannot load the model", str(llava_folder))


@pytest.mark.parametrize("content, named", [
    (b"", ["is empty (0 bytes)"]),
    (b"this is not a picture\n", ["is not an image file PIL can read"]),
    (None, ["does not exist"]),
])
def test_run_with_an_empty_non_image_or_missing_image_is_an_error_line(content, named, tmp_path, capsys,
                                                                       llava_folder):
    image = tmp_path / "image.png"
    if content is not None:
        image.write_bytes(content)
    code, out, err = _cli(capsys, "run", "--model", str(llava_folder), "--image", str(image), "--prompt", "what?",
                          "--out", str(tmp_path / "out.png"))
    _assert_cli_error(code, out, err, "--image", str(image), *named)


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
@pytest.mark.parametrize("command", ["run", "run-model", "eval"])
def test_an_unwritable_output_path_is_an_error_line_before_any_work(command, where, tmp_path, capsys,
                                                                    llava_folder, png):
    out_path = tmp_path / "no" / "such" / "folder" / "x.png" if where == "missing-folder" else tmp_path
    option = "--plot" if command == "eval" else "--out"
    argv = {"run": ["run"],
            "run-model": ["run", "--model", str(llava_folder), "--image", str(png), "--prompt", "what?"],
            "eval": ["eval", "-n", "2"]}[command]
    code, out, err = _cli(capsys, *argv, option, str(out_path))
    _assert_cli_error(code, out, err, option, str(out_path),
                      "does not exist" if where == "missing-folder" else "is a folder")


def test_a_writable_output_path_is_left_as_it_was(tmp_path, capsys, llava_folder, png):
    from prunekit.cli import check_writable

    path = tmp_path / "new.png"
    check_writable(str(path), "--out")
    assert not path.exists()  # the check wrote nothing that stays


ARGUMENT_CASES = [  # argv, words the error line names, whether the command takes --json
    (["eval", "-n", "0"], ["-n", "0", "integer >= 1"], True),
    (["eval", "-n", "-3"], ["-n", "-3", "integer >= 1"], True),
    (["eval", "--batch-size", "0"], ["--batch-size", "0", "integer >= 1"], True),
    (["eval", "-n", "abc"], ["-n", "'abc'", "integer >= 1"], True),
    (["bench", "--repeats", "0"], ["--repeats", "0", "integer >= 1"], True),
    (["bench", "--batch", "0"], ["--batch", "0", "integer >= 1"], True),
    (["bench", "--new-tokens", "0"], ["--new-tokens", "0", "integer >= 1"], True),
    (["bench", "--device", "tpu9"], ["--device", "'tpu9'", "cpu"], True),
    (["bench", "--attn", "fast"], ["--attn", "'fast'", "sdpa"], True),
    (["bench", "--recipes", "transprun"], ["unknown recipe 'transprun'"], True),
    (["run", "--max-new-tokens", "0"], ["--max-new-tokens", "0", "integer >= 1"], False),
    (["flops", "x", "--visual-tokens", "0"], ["--visual-tokens", "0", "integer >= 1"], True),
]


@pytest.mark.parametrize("argv, named, takes_json", ARGUMENT_CASES, ids=[" ".join(c[0]) for c in ARGUMENT_CASES])
def test_each_bad_argument_is_one_error_line_and_a_json_error_object(argv, named, takes_json, capsys):
    code, out, err = _cli(capsys, *argv)
    _assert_cli_error(code, out, err, *named)
    if takes_json:
        code, out, err = _cli(capsys, *argv, "--json")
        _assert_cli_error(code, out, err, *named, as_json=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_bench_on_cuda_without_cuda_is_an_error_line(capsys):
    for as_json in (False, True):
        code, out, err = _cli(capsys, "bench", "--device", "cuda", *(["--json"] * as_json))
        _assert_cli_error(code, out, err, "--device", "'cuda'", "CUDA is not available", "cpu", as_json=as_json)


def test_a_prunekit_error_raised_below_any_command_becomes_the_error_line(capsys, monkeypatch):
    import prunekit.recipe

    def broken():
        raise PluginError("boom: a plugin broke")

    monkeypatch.setattr(prunekit.recipe, "recipe_files", broken)
    for as_json in (False, True):
        code, out, err = _cli(capsys, "recipes", *(["--json"] * as_json))
        _assert_cli_error(code, out, err, "boom: a plugin broke", as_json=as_json)


@pytest.mark.slow
def test_the_installed_command_exits_2_with_a_json_error_and_no_traceback(tmp_path):
    """The real process: exit status 2, the error line on stderr, a JSON object on stdout."""
    missing = tmp_path / "nowhere"
    done = subprocess.run([sys.executable, "-m", "prunekit.cli", "flops", str(missing), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    _assert_cli_error(done.returncode, done.stdout, done.stderr, str(missing), "does not exist", as_json=True)


# ---- prunekit bench: interleaved repeats and their spread ----

SMALL = bench.LlavaShape(num_layers=14, hidden_size=32, intermediate_size=64, image_size=28, patch_size=4)


def test_bench_measures_recipes_interleaved_per_repeat_and_reports_the_spread(monkeypatch):
    recipes = ("none", "fastv", "transprune-high")
    # scripted prefill seconds per measured call, in call order (the warm-up row first, not counted)
    scripted = {"none": [9.0, 0.010, 0.030, 0.020], "fastv": [9.0, 0.005, 0.006, 0.004],
                "transprune-high": [9.0, 0.008, 0.009, 0.001]}
    order: list[str] = []
    active: list[str] = []
    real_pruner_for, real_measure = bench._pruner_for, bench._measure

    def pruner_for(model, name):
        active.append(name)
        return real_pruner_for(model, name)

    def measure(model, inputs, new_tokens, device):
        _, decode, kv_bytes = real_measure(model, inputs, new_tokens, device)
        name = active[-1]
        prefill = scripted[name][sum(1 for seen in order if seen == name)]
        order.append(name)
        return prefill, decode, kv_bytes

    monkeypatch.setattr(bench, "_pruner_for", pruner_for)
    monkeypatch.setattr(bench, "_measure", measure)
    rows = {r.recipe: r for r in bench.run_bench(recipes, SMALL, repeats=3, new_tokens=1, progress=False)}

    assert order == list(recipes) * 4  # warm-up, then repeat 1: none, A, B; repeat 2: none, A, B; ...
    assert bench.interleaved(recipes, 3) == [(r, name) for r in range(4) for name in recipes]
    none, fastv = rows["none"], rows["fastv"]
    assert (none.prefill_ms_min, none.prefill_ms, none.prefill_ms_max) == pytest.approx((10, 20, 30))
    assert none.samples["prefill"] == pytest.approx([0.010, 0.030, 0.020])
    # the ratio pairs each repeat with its own baseline: 5/10, 6/30, 4/20
    assert (fastv.prefill_ratio_min, fastv.prefill_ratio, fastv.prefill_ratio_max) == pytest.approx((0.2, 0.2, 0.5))
    assert fastv.decode_tokens_per_s_min <= fastv.decode_tokens_per_s <= fastv.decode_tokens_per_s_max
    assert "20.0 [10.0-30.0]" in bench.format_table(list(rows.values()))
    payload = json.loads(bench.to_json(list(rows.values())))
    by_name = {r["recipe"]: r for r in payload["rows"]}
    assert by_name["none"]["prefill_ms_min"] == pytest.approx(10)
    assert by_name["none"]["prefill_ms_max"] == pytest.approx(30)
    assert by_name["transprune-high"]["prefill_ms"] == pytest.approx(8)


def test_bench_refuses_zero_repeats_or_batch_in_the_library_too():
    for kwargs, named in [({"repeats": 0}, "repeats must be >= 1"), ({"batch": 0}, "batch must be >= 1"),
                          ({"new_tokens": 0}, "new_tokens must be >= 1")]:
        with pytest.raises(ValueError, match=named):
            bench.run_bench(("none",), SMALL, progress=False, **kwargs)


# ---- the declared transformers range is the tested one ----

def test_the_declared_transformers_lower_bound_is_the_one_ci_tests():
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.search(r'"transformers>=([0-9.]+)', pyproject).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    tested = re.search(r"TRANSFORMERS_LOWER=([0-9.]+)", ci).group(1)
    assert declared == tested
