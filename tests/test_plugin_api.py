"""The public plugin API: per-head / per-query attention rows, the reference_depth contract, the testing
helpers, probe installers, adapter lookup, and an engine that keeps no tensors between forwards."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, get_args

import pytest
import torch
from conftest import SHAPE

import prunekit
from prunekit.testing import forward_context, llava_inputs, token_layout


@dataclass
class RowsSpy(prunekit.Criterion):
    """Reads attention rows at each prune layer in every shape; scores with the default ones."""

    name: ClassVar[str] = "test_rows_spy"
    queries: str = "instruction"
    seen: ClassVar[list] = []

    def _probes(self, layer):
        return [prunekit.AttentionRows(layer=layer, queries=self.queries, per_head=h, per_query=q)
                for h in (False, True) for q in (False, True)]

    def probes(self, stage_layers, num_layers):
        return [p for layer in stage_layers for p in self._probes(layer)]

    def score(self, ctx):
        mean, per_query, per_head, both = (ctx.capture(p) for p in self._probes(ctx.layer))
        RowsSpy.seen.append((ctx.layout.instruction.clone(), mean, per_query, per_head, both))
        return mean


@dataclass
class LateLayer(prunekit.Criterion):
    """A criterion with a layer field (a test plugin)."""

    name: ClassVar[str] = "test_late_layer"
    layer: int = field(default=3, metadata={"layer": True})

    def score(self, ctx):
        return torch.zeros(ctx.layout.visual.shape)


@dataclass
class NeedsDepth(prunekit.Schedule):
    """Prunes at three quarters of the depth; refuses a shallow decoder (a test plugin)."""

    name: ClassVar[str] = "test_needs_depth"
    minimum: int = 8

    def resolve(self, num_layers):
        if num_layers < self.minimum:
            raise ValueError(f"needs at least {self.minimum} layers, got {num_layers}")
        return [prunekit.Stage(layer=num_layers * 3 // 4, keep=0.5)]


class ApiPlugin:
    @prunekit.hookimpl
    def prunekit_add_criteria(self):
        return [RowsSpy, LateLayer]

    @prunekit.hookimpl
    def prunekit_add_schedules(self):
        return [NeedsDepth]


@pytest.fixture
def api_plugin():
    prunekit.register_plugin(ApiPlugin(), name="test-api")
    yield
    prunekit.unregister_plugin("test-api")


@pytest.mark.parametrize("queries", ["instruction", "last"])
def test_per_head_and_per_query_rows_reduce_to_the_default_rows(llava64, api_plugin, queries):
    RowsSpy.seen.clear()
    recipe = {"criteria": {"spy": {"type": "test_rows_spy", "queries": queries}},
              "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}, {"layer": 5, "keep": 0.25}]}}
    with prunekit.apply(llava64, recipe), torch.no_grad():
        llava64(**llava_inputs(SHAPE, batch=2, seed=3, dtype=torch.float64))
    assert len(RowsSpy.seen) == 2
    heads = llava64.config.text_config.num_attention_heads
    for instruction, mean, per_query, per_head, both in RowsSpy.seen:
        batch, seq = mean.shape
        n_q = both.shape[2]
        assert per_head.shape == (batch, seq, heads) and per_query.shape == (batch, seq, n_q)
        assert both.shape == (batch, seq, n_q, heads)
        counts = instruction.sum(dim=1) if queries == "instruction" else torch.ones(batch, dtype=torch.long)
        assert n_q == int(counts.max())
        # the default rows weight queries by 1/n in float32 (query_weights): equal to ~1e-7 relative
        torch.testing.assert_close(per_head.mean(dim=-1), mean, rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(both.mean(dim=-1), per_query, rtol=0, atol=1e-12)
        torch.testing.assert_close(per_query.sum(dim=-1) / counts[:, None], mean, rtol=1e-6, atol=1e-12)
        for b in range(batch):  # each present query's row is a distribution over the keys; absent ones are 0
            sums = both[b].sum(dim=0)  # [n_q, heads]
            present = torch.arange(n_q) < counts[b]
            torch.testing.assert_close(sums[present], torch.ones_like(sums[present]))
            assert torch.all(sums[~present] == 0)


def test_a_schedule_that_does_not_fit_the_depth_is_a_recipe_error(llava32, api_plugin):
    recipe = {"criteria": {"random": {}}, "schedule": {"type": "test_needs_depth", "minimum": 20}}
    with pytest.raises(prunekit.RecipeError, match=r"schedule \(NeedsDepth 'test_needs_depth'\), resolve\(16\): "
                                                   r"needs at least 20 layers, got 16"):
        prunekit.apply(llava32, recipe)


def test_reference_depth_resolves_the_schedule_in_its_own_coordinates(llava32, api_plugin):
    recipe = {"criteria": {"random": {}}, "schedule": {"type": "test_needs_depth", "minimum": 20},
              "reference_depth": 32}
    with prunekit.apply(llava32, recipe) as pruner:  # resolve(32) -> layer 24 -> ceil(24 * 16 / 32) = 12
        assert pruner.stage_layers == (12,)


@pytest.mark.parametrize("overrides,message", [
    (["criteria.late.layer=16"], r"criteria.late \('test_late_layer'\): layer=16 does not fit: valid layers 0..15 "
                                 r"\(the model has 16 decoder layers\)"),
    (["criteria.late.layer=40", "reference_depth=32"], r"layer=40 does not fit: valid layers 0..31 \(reference_depth 32"),
    (["criteria.late.layer=-1"], r"layer=-1 does not fit: valid layers 0..15"),
])
def test_a_criterion_layer_field_that_does_not_fit_names_the_field_and_range(llava32, api_plugin, overrides, message):
    recipe = {"criteria": {"late": {"type": "test_late_layer"}},
              "schedule": {"type": "stages", "stages": [{"layer": 8, "keep": 0.5}]}}
    with pytest.raises(prunekit.RecipeError, match=message):
        prunekit.apply(llava32, recipe, overrides)


def test_layer_fields_are_scaled_with_reference_depth(llava32, api_plugin):
    recipe = {"criteria": {"late": {"type": "test_late_layer", "layer": 31}}, "reference_depth": 32,
              "schedule": {"type": "stages", "stages": [{"layer": 30, "keep": 0.5}]}}
    with prunekit.apply(llava32, recipe) as pruner:
        assert pruner.recipe.criteria["late"].layer == 15 and pruner.stage_layers == (15,)


def test_a_decoder_criterion_asking_for_a_vision_probe_is_refused(llava32, api_plugin):
    recipe = {"criteria": {"vz": {"type": "visionzip"}}, "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
    with pytest.raises(prunekit.RecipeError, match=r"criteria.vz: VisionAttention.*reads the vision.*decoder"):
        prunekit.apply(llava32, recipe)


def test_every_probe_type_has_an_installer():
    from prunekit.capture import INSTALLERS
    from prunekit.probes import Probe

    assert set(INSTALLERS) == set(get_args(Probe))
    assert {p.site for p in get_args(Probe)} == {"decoder", "vision"}


def test_the_public_names_plugin_authors_use():
    for name in ("Criterion", "Combiner", "Schedule", "Stage", "Merger", "ForwardContext", "TokenLayout", "ModuleIO",
                 "LayerInput", "AttentionRows", "VisionAttention", "VisionKeys", "VisionHidden", "hookimpl"):
        assert hasattr(prunekit, name) and name in prunekit.__all__, name


def test_token_layout_and_forward_context_build_what_a_criterion_sees():
    layout = token_layout([[False, True, True, False, False], [True, True, False, True, False]],
                          valid=[[False, True, True, True, True], [True, True, True, True, True]])
    assert layout.instruction.tolist() == [[False, False, False, True, True], [False, False, False, False, True]]
    assert layout.image_index.tolist() == [[-1, 0, 0, -1, -1], [0, 0, -1, 1, -1]]
    assert layout.original_index.tolist() == [list(range(5))] * 2
    rows = torch.rand(2, 5)
    probe = prunekit.AttentionRows(layer=3)
    ctx = forward_context(layout, stage_layers=(3, 6), num_layers=8, stage=1, keep=0.5, captures={probe: rows})
    assert ctx.layer == 6 and ctx.keep_counts.tolist() == [1, 1] and ctx.capture(probe) is rows
    with pytest.raises(ValueError, match="stage 2 is not one of the 2 stages"):
        forward_context(layout, stage_layers=(3, 6), stage=2)
    with pytest.raises(ValueError, match="valid has shape"):
        token_layout([[True, False]], valid=[[True]])


def test_the_generic_adapter_resolves_to_a_concrete_adapter():
    from prunekit.adapters import DecoderAdapter, GenericAdapter, MRopeAdapter

    from prunekit.plugins import find_adapter
    from prunekit.testing import tiny_family_model

    model = tiny_family_model("llava_next_video", num_layers=2)
    adapter = find_adapter(model)
    assert type(adapter) in (DecoderAdapter, MRopeAdapter) and not isinstance(adapter, GenericAdapter)
    assert adapter.name == "generic" and adapter.spec.language_model == "model.language_model"
    assert adapter.explain(model) is None


def test_the_pruner_and_its_vision_stage_keep_no_tensors_between_forwards(llava576):
    from conftest import SHAPE576

    pruner = prunekit.apply(llava576, "visionzip+transprune")
    try:
        with torch.no_grad():
            llava576.generate(**llava_inputs(SHAPE576, batch=1, seed=1, dtype=torch.float64), max_new_tokens=2,
                              do_sample=False)
        assert pruner.last_report is not None and pruner.last_report[0].where == "vision"
        assert _tensors_in(pruner) == [] and _tensors_in(pruner._vision) == []
        assert pruner._running.forward is None and pruner._running.vision is None
    finally:
        pruner.remove()


def _tensors_in(obj, seen=None, depth=0) -> list[str]:
    """Paths of the tensors reachable from ``obj``'s attributes, skipping the model, its modules and
    what is kept on purpose (the last report, the per-cache records, the built recipe)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 5 or isinstance(obj, torch.nn.Module):
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [""]
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = vars(obj).items()
    else:
        return []
    found = []
    for key, value in items:
        if key in ("model", "last_report", "_reports", "_latest", "_caches", "recipe", "adapter", "projector", "layers"):
            continue
        found += [f"{key}.{path}" for path in _tensors_in(value, seen, depth + 1)]
    return found
