"""The command line, the FLOPs model, the benchmark harness and the shipped example."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest
from transformers import LlavaConfig

from prunekit.bench import format_table, run_bench
from prunekit.cli import main
from prunekit.flops import DecoderDims, estimate, prefill_flops
from prunekit.testing import LlavaShape

ROOT = Path(__file__).resolve().parents[1]


def _papers_flops(n_per_layer, d=4096, m=11008):
    """The papers' formula written out again: sum over layers of 4nd^2 + 2n^2d + 3ndm."""
    return sum(4 * n * d**2 + 2 * n**2 * d + 3 * n * d * m for n in n_per_layer) / 1e12


def test_flops_of_llava15_7b_reproduce_the_papers():
    dims = DecoderDims(32, 4096, 11008)
    assert round(prefill_flops([576] * 32, dims) / 1e12, 2) == 3.82
    assert _papers_flops([576] * 2 + [288] * 30) == pytest.approx(2.0075, abs=1e-4)
    assert _papers_flops([576] * 7 + [504] * 2 + [360] * 3 + [72] * 20) == pytest.approx(1.557, abs=1e-3)


def test_flops_command_reads_a_config_and_reproduces_the_table(tmp_path, capsys):
    LlavaConfig().save_pretrained(tmp_path)  # the default LlavaConfig has LLaVA-1.5-7B's decoder sizes
    assert main(["flops", str(tmp_path), "--recipe", "fastv", "transprune-high", "--json"]) == 0
    rows = {r["recipe"]: r for r in json.loads(capsys.readouterr().out)["recipes"]}
    assert rows["none"]["tflops"] == pytest.approx(3.82, rel=0.01)
    assert rows["fastv"]["tflops"] == pytest.approx(2.01, rel=0.01)
    assert rows["transprune-high"]["tflops"] == pytest.approx(1.56, rel=0.01)
    assert rows["transprune-high"]["ratio"] == pytest.approx(1.557 / 3.817, rel=1e-3)


def test_recipes_command_lists_every_builtin_with_its_ratio(capsys):
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["transprune-high"]["flops_ratio"] == pytest.approx(0.408, abs=1e-3)
    assert all(r["description"] for r in rows.values())


def test_a_bad_recipe_on_the_command_line_is_a_message_not_a_traceback(tmp_path, capsys):
    LlavaConfig().save_pretrained(tmp_path)
    assert main(["flops", str(tmp_path), "--recipe", "transprun"]) == 2
    assert "unknown recipe 'transprun'" in capsys.readouterr().err


def test_bench_measures_every_recipe_in_one_run():
    shape = LlavaShape(num_layers=14, hidden_size=32, intermediate_size=64, image_size=28, patch_size=4)
    rows = run_bench(("none", "fastv", "transprune-high"), shape, repeats=1, new_tokens=2, progress=False)
    by_name = {r.recipe: r for r in rows}
    assert by_name["none"].prefill_ratio == 1.0 and by_name["none"].kept == []
    assert by_name["fastv"].kept == [24]
    assert by_name["transprune-high"].kept == [42, 30, 6]
    assert by_name["transprune-high"].kv_cache_mb < by_name["none"].kv_cache_mb
    assert 0 < by_name["transprune-high"].flops_ratio < 1 and 0 < by_name["fastv"].flops_ratio < 1
    assert all(r.peak_mb > 0 and r.decode_tokens_per_s > 0 for r in rows)
    assert "transprune-high" in format_table(rows)


def test_flops_estimate_matches_the_tokens_the_pruner_reports(llava32):
    import torch

    import prunekit
    from conftest import SHAPE
    from prunekit.testing import llava_inputs

    inputs = llava_inputs(SHAPE, batch=1, seed=0)
    with prunekit.apply(llava32, "transprune-high") as pruner, torch.no_grad():
        llava32(**inputs)
    dims = DecoderDims.from_config(llava32.config)
    analytic = estimate(prunekit.load_recipe("transprune-high").schedule.resolve(dims.num_layers), dims,
                        SHAPE.visual_tokens)
    assert pruner.last_report.visual_tokens_per_layer[0].tolist() == analytic.visual_tokens


def test_the_quickstart_example_runs():
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")


def test_flops_command_reproduces_the_transprune_paper_table(tmp_path, capsys):
    """The TransPrune paper's LLaVA-1.5-7B TFLOPs, within 1%; SparseVLM's official 192 setting gives 1.353."""
    LlavaConfig().save_pretrained(tmp_path)
    recipes = ["fastv", "pdrop", "sparsevlm", "transprune-high", "transprune-low"]
    assert main(["flops", str(tmp_path), "--recipe", *recipes, "--json"]) == 0
    rows = {r["recipe"]: r["tflops"] for r in json.loads(capsys.readouterr().out)["recipes"]}
    paper = {"none": 3.82, "fastv": 2.01, "pdrop": 1.78, "transprune-high": 1.56, "transprune-low": 1.19}
    for name, tflops in paper.items():
        assert rows[name] == pytest.approx(tflops, rel=0.01), name
    # SparseVLM: 3 layers x 576, 4 x (300+9), 9 x (200+4), 16 x (110+3) recycled tokens included
    assert rows["sparsevlm"] == pytest.approx(_papers_flops([576] * 3 + [309] * 4 + [204] * 9 + [113] * 16), abs=1e-4)
