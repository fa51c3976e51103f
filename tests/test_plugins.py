"""The pluggy registry: built-ins arrive through entry points; third-party plugins add names; clashes are clear."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

import prunekit
from conftest import SHAPE
from prunekit.errors import PluginError
from prunekit.plugins import Registry
from prunekit.testing import llava_inputs


def test_builtins_come_through_the_prunekit_entry_points():
    registry = Registry()  # a fresh one, loaded from installed entry points only
    assert {"ttv", "accumulated_ttv", "iga", "attention", "fastv_attention", "random"} <= set(registry.names("criterion"))
    assert "weighted_sum" in registry.names("combiner")
    assert "stages" in registry.names("schedule")
    assert "llava" in registry.names("adapter")
    entry = registry.get("criterion", "iga")
    assert entry.distribution == "prunekit" and entry.plugin == "builtin_criteria"
    assert entry.description.startswith("TransPrune's instruction-guided attention")
    assert registry.all_problems() == []


@dataclass
class NormScore(prunekit.Criterion):
    """L2 norm of each token's hidden state at the layer before the prune (a test plugin)."""

    name: ClassVar[str] = "test_norm"
    scale: float = 1.0

    def probes(self, stage_layers, num_layers):
        return [prunekit.ModuleIO(layer=layer - 1, module="mlp") for layer in stage_layers]

    def observe(self, ctx, probe, inputs, output):
        ctx.buffers[f"{self.key}/{probe.layer}"] = self.scale * output.norm(dim=-1)

    def score(self, ctx):
        return ctx.buffers[f"{self.key}/{ctx.layer - 1}"]


class TestPlugin:
    @prunekit.hookimpl
    def prunekit_add_criteria(self):
        return [NormScore]


class BrokenPlugin:
    @prunekit.hookimpl
    def prunekit_add_criteria(self):
        return ["not a class"]


def test_a_registered_plugin_criterion_runs_through_generate(llava32):
    prunekit.register_plugin(TestPlugin(), name="test-plugin")
    try:
        recipe = {"name": "norm", "criteria": {"n": {"type": "test_norm", "scale": 2.0}},
                  "schedule": {"type": "stages", "stages": [{"layer": 4, "keep": 0.25}]}}
        inputs = llava_inputs(SHAPE, batch=2, seed=3)
        with prunekit.apply(llava32, recipe) as pruner:
            out = llava32.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        assert pruner.last_report[0].kept.shape == (2, 9)
    finally:
        prunekit.unregister_plugin("test-plugin")
    with pytest.raises(prunekit.RecipeError, match="unknown criterion 'test_norm'"):
        prunekit.load_recipe(recipe)


def test_a_name_registered_twice_is_a_clear_error_naming_both():
    registry = Registry()
    registry.register(TestPlugin(), name="first")
    registry.register(TestPlugin(), name="second")
    with pytest.raises(prunekit.PluginError, match=r"criterion 'test_norm' is registered twice.*'first'.*'second'"):
        registry.get("criterion", "test_norm")
    assert any("registered twice" in p for p in registry.all_problems())
    assert registry.get("criterion", "iga").obj.name == "iga"  # the rest keep working


def test_a_missing_name_lists_what_exists():
    with pytest.raises(prunekit.PluginError, match=r"unknown combiner 'avg'; registered combiners: .*'weighted_sum'"):
        Registry().get("combiner", "avg")


def test_a_malformed_contribution_is_reported_and_skipped():
    registry = Registry()
    registry.register(BrokenPlugin(), name="broken")
    assert "iga" in registry.names("criterion")
    assert any("broken" in p and "not a class" in p for p in registry.all_problems())


def test_plugins_lists_the_recipe_folders_and_recipes_name_their_file(capsys):
    import json

    from prunekit.cli import main

    assert main(["plugins", "--json"]) == 0
    folders = json.loads(capsys.readouterr().out)["recipe_dirs"]
    assert any(f.endswith("recipes") and "toy" in f for f in folders)  # the toy's oracle recipe folder
    assert main(["recipes", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["oracle"]["file"].endswith("oracle.yaml") and "toy" in rows["oracle"]["file"]
    assert rows["fastv"]["file"].endswith("fastv.yaml")


class _BrokenEntryPoint:
    """An entry point whose import fails, from the named distribution."""

    def __init__(self, name: str, distribution: str) -> None:
        self.name, self.value, self.dist = name, f"{distribution}_missing.module", type("D", (), {"name": distribution})

    def load(self):
        raise ImportError(f"cannot import name 'blockwise_overlay' (from {self.value})")


def test_a_built_in_plugin_that_fails_to_import_is_an_error_at_once_with_the_version_hint(monkeypatch):
    import importlib.metadata

    from prunekit.plugins import Registry

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [_BrokenEntryPoint("builtin_adapters",
                                                                                             "prunekit")])
    with pytest.raises(PluginError, match=r"prunekit's built-in plugin 'builtin_adapters' failed to import .*"
                                          r"blockwise_overlay.*prunekit needs transformers.*>=5\.19\.0.*installed"):
        Registry()


def test_a_third_party_plugin_that_fails_to_import_is_named_in_lookup_errors(monkeypatch):
    import importlib.metadata

    from prunekit.plugins import Registry

    real = importlib.metadata.entry_points(group="prunekit")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [*real, _BrokenEntryPoint("their_criteria", "someones-criteria")])
    registry = Registry()
    assert registry.get("criterion", "ttv").name == "ttv"  # the others still load
    with pytest.raises(PluginError, match=r"unknown criterion 'theirs'; .*plugins that failed to load: plugin "
                                          r"'their_criteria' \(someones-criteria\): import of .* failed"):
        registry.get("criterion", "theirs")
