"""The documentation: its code runs, the site builds with warnings as errors, the example plugin installs."""

from __future__ import annotations

import re
import shutil
import textwrap
import types
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- no-test[^>]*-->\s*\n)?[ ]*```python\n(.*?)```", re.S)


def python_blocks(path: Path) -> list[str]:
    """The ```python blocks of a page that are meant to run (not preceded by a no-test comment)."""
    return [textwrap.dedent(code) for skip, code in BLOCK.findall(path.read_text()) if not skip]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_the_code_in_the_docs_runs(page, monkeypatch):
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for code in python_blocks(page):  # blocks of one page share a namespace, as a reader runs them
        exec(compile(code, str(page), "exec"), module.__dict__)


def test_every_docs_page_with_code_has_something_to_run():
    assert python_blocks(ROOT / "docs" / "index.md") and python_blocks(ROOT / "docs" / "plugins.md")


def test_the_committed_reference_pages_are_current():
    """docs/reference/ is generated but committed, so a checkout can read it; regenerate when it drifts."""
    from prunekit.docgen import pages

    for name, text in pages().items():
        path = ROOT / "docs" / "reference" / name
        assert path.is_file() and path.read_text() == text, (
            f"{path.relative_to(ROOT)} is stale: run `python -m prunekit.docgen docs/reference` and commit it")


@pytest.mark.skipif(shutil.which("mkdocs") is None, reason="mkdocs is not installed (pip install -e '.[dev]')")
def test_the_site_builds_with_warnings_as_errors(tmp_path):
    result = subprocess.run(["mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "reference" / "plugins" / "index.html").is_file()
    reference = (ROOT / "docs" / "reference" / "plugins.md").read_text()
    assert "### `accumulated_ttv`" in reference and "| `first_layer` | `int` | `6` |" in reference


def test_the_example_plugin_installs_and_its_recipe_runs(tmp_path, monkeypatch):
    target = tmp_path / "site-packages"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "prunekit-example-plugin")], check=True)
    monkeypatch.syspath_prepend(str(target))
    import prunekit
    from prunekit import plugins
    from prunekit.testing import llava_inputs, tiny_llava

    registry = plugins.Registry()  # reads the entry points again, the new distribution included
    monkeypatch.setattr(plugins, "_REGISTRY", registry)
    entry = registry.get("criterion", "mlp_output_norm")
    assert entry.distribution == "prunekit-example-plugin" and entry.plugin == "example"
    assert registry.get("combiner", "geometric_mean").description.startswith("Weighted geometric mean")
    assert "mlp-norm-iga" in prunekit.builtin_recipe_names()
    model = tiny_llava()
    with prunekit.apply(model, "mlp-norm-iga") as pruner, torch.no_grad():
        out = model.generate(**llava_inputs(batch=2), max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and [s.layer for s in pruner.last_report] == [7, 9, 12]
    assert registry.all_problems() == []


def test_a_broken_plugin_is_reported_by_name_and_the_rest_keep_working(tmp_path, monkeypatch, capsys):
    package = tmp_path / "broken_plugin"
    (package / "broken_plugin-0.1.dist-info").mkdir(parents=True)
    (package / "broken_plugin-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\n"
                                                                       "Version: 0.1\n")
    (package / "broken_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[prunekit]\nbroken = broken_plugin_module\n")
    (package / "broken_plugin_module.py").write_text("raise ImportError('missing dependency foo')\n")
    monkeypatch.syspath_prepend(str(package))
    from prunekit import plugins
    from prunekit.cli import main

    monkeypatch.setattr(plugins, "_REGISTRY", plugins.Registry())
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "problems:" in out and "plugin 'broken' (broken-plugin)" in out and "missing dependency foo" in out
    assert "transprune" not in out or "iga" in out  # the built-ins are still listed
    assert "accumulated_ttv" in out
