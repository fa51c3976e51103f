"""``prunekit doctor``: which adapter fits a model and what it supports, without running the model."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from prunekit.errors import AdapterError, PrunekitError
from prunekit.plugins import get_registry
from prunekit.probes import AttentionRows
from prunekit.vision import TowerProbes, VisionPruner, tower_depth
from prunekit.vision_input import runs_before_projector, tower_probes_read, tower_readers


def build_skeleton(source: str) -> nn.Module:
    """The model of a config (a folder or hub id) on the meta device: structure only, no weights."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        try:
            return AutoModelForImageTextToText.from_config(config)
        except ValueError:
            return AutoModel.from_config(config)


def _uses_attention_interface(attention: nn.Module) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(attention).forward)
    except (OSError, TypeError):
        return False


def diagnose(model: nn.Module) -> dict[str, Any]:
    """What prunekit can do with ``model``: the adapter, why others do not fit, and the probes it supports."""
    registry = get_registry()
    adapters = registry.adapters()
    report: dict[str, Any] = {"model": type(model).__name__,
                              "model_type": getattr(getattr(model, "config", None), "model_type", None),
                              "adapter": None, "rejected": {}}
    chosen = None
    for adapter in adapters:
        why = adapter.explain(model)
        if why is None:
            chosen = adapter.resolve(model)
            break
        report["rejected"][adapter.name] = why
    if chosen is None:
        return report
    report["adapter"] = chosen.name
    try:
        layers = list(chosen.decoder_layers(model))
        lm = chosen.language_model(model)
        attention = chosen.attention(layers[0])
        chosen.mlp(layers[0])
        chosen.input_norm(layers[0])
    except AdapterError as exc:
        report["error"] = str(exc)
        return report
    kinds: dict[str, int] = {}
    for i in range(len(layers)):
        kind = chosen.layer_kind(model, i)
        kinds[kind] = kinds.get(kind, 0) + 1
    rope = getattr(lm.config, "rope_parameters", None) or {}
    report.update({
        "language_model": type(lm).__name__,
        "decoder_layers": len(layers),
        "layer_kinds": kinds,
        "rope": "M-RoPE (3-D)" if "mrope_section" in rope else "RoPE",
        "visual_tokens": chosen.describe_visual(model),
        "video_frames": (chosen.describe_frames(model) if hasattr(chosen, "describe_frames") else None),
        "probes": {
            "ModuleIO (attention / MLP input and output)": True,
            "LayerInput": True,
            "AttentionRows (through the attention interface)": _uses_attention_interface(attention),
        },
    })
    before = runs_before_projector(chosen, model)
    report["vision_stage"] = ("before the projector, per image (or video frame)" if before else
                              "at the language model's input, per image (or video frame), on the projected features")
    report["probes"][VISION_FEATURES] = True
    report["probes"][VISION_TOWER] = before
    report["probes"][VISION_RECEIVED] = before or bool(tower_probes_read(chosen, model))
    layer_kinds = [chosen.layer_kind(model, i) for i in range(len(layers))]
    report["recipes"] = recipe_support(chosen, type(model).__name__, layer_kinds, report["probes"], model)
    return report


VISION_FEATURES = "vision stage: VisionFeatures (the image features it shortens; LayerInput(0) criteria)"
VISION_TOWER = "vision stage: VisionAttention / VisionKeys / VisionHidden (inside the vision tower)"
VISION_RECEIVED = "vision stage: VisionAttentionReceived / VisionKeys (inside the vision tower, per merged token)"


def recipe_support(adapter: Any, model_name: str, layer_kinds: list[str], probes: dict[str, bool],
                   model: nn.Module | None = None) -> dict[str, str]:
    """For every built-in recipe, ``"runs"`` or why it will not on this model (as written, without
    ``reference_depth`` overrides): its stages fit the depth, its probes are supported, and every
    layer from its first prune on is a kind the adapter can feed a shorter sequence."""
    from prunekit.recipe import builtin_recipe_names, check_stages, collect_probes, load_recipe, scale_to_depth

    num_layers = len(layer_kinds)
    fed = getattr(adapter, "fed_layer_kinds", None)  # None: the adapter does not say (assume every kind)
    rows_ok = probes["AttentionRows (through the attention interface)"]
    tower_ok = probes[VISION_TOWER]
    readable = tower_probes_read(adapter, model) if model is not None else ()  # tower probes the input route reads
    depth = None if model is None else tower_depth(adapter, model) or 0  # decoder criteria reading the tower
    out: dict[str, str] = {}
    for name in builtin_recipe_names():
        try:
            recipe = scale_to_depth(load_recipe(name), num_layers)
            stages = check_stages(recipe, num_layers, model_name)
            layers = tuple(s.layer for s in stages)
            wanted = collect_probes(recipe.parts(), layers, num_layers, "decoder", f"recipe {name!r}",
                                    tower_layers=depth)
        except (PrunekitError, ValueError) as exc:
            out[name] = f"no: {exc}"
            continue
        if model is not None:
            try:
                adapter.check_prune_layers(model, layers)  # e.g. Gemma 3n's KV-shared layers
                tower_wanted = [(plugin, probe) for plugin, probe in wanted if probe.site == "vision"]
                if tower_wanted:  # decoder criteria that read the tower (MustDrop's key set): a CLS token to read
                    TowerProbes(model, adapter, tower_wanted, None, name)
                if recipe.vision is not None and runs_before_projector(adapter, model):  # its CLS readers, as apply
                    VisionPruner(model, adapter, recipe.vision, None)
            except PrunekitError as exc:
                out[name] = f"no: {exc}"
                continue
        tower = [] if recipe.vision is None or tower_ok else tower_readers(recipe.vision, readable)
        if tower:
            out[name] = (f"no: its vision block reads the vision tower ({', '.join(tower)}); adapter "
                         f"{adapter.name!r} runs vision blocks at the language model's input, on the projected "
                         "features")
            continue
        if not rows_ok and any(isinstance(p, AttentionRows) for _, p in wanted):
            out[name] = "no: it reads attention rows and the attention does not go through the attention interface"
            continue
        bad = next(((i, kind) for i, kind in enumerate(layer_kinds)
                    if layers and i >= layers[0] and fed is not None and kind not in fed), None)
        if bad is not None:
            out[name] = (f"no: decoder layer {bad[0]} is a {bad[1]!r} layer after its first prune (layer "
                         f"{layers[0]}); adapter {adapter.name!r} feeds {', '.join(fed)} layers only")
            continue
        out[name] = "runs"
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model: {report['model']} (model_type {report['model_type']!r})"]
    if report["adapter"] is None:
        lines.append("adapter: none fits")
        lines += [f"  {name}: {why}" for name, why in report["rejected"].items()]
        return "\n".join(lines)
    lines.append(f"adapter: {report['adapter']}")
    if "error" in report:
        lines.append(f"  but: {report['error']}")
        return "\n".join(lines)
    lines.append(f"language model: {report['language_model']}, {report['decoder_layers']} decoder layers "
                 f"({', '.join(f'{n} {k}' for k, n in report['layer_kinds'].items())}), {report['rope']}")
    lines.append(f"visual tokens: {report['visual_tokens']}")
    lines.append(f"vision stage: {report['vision_stage']}")
    if report.get("video_frames"):
        lines.append(f"video frames: {report['video_frames']}")
    lines.append("probes:")
    lines += [f"  {'yes' if ok else 'no '}  {name}" for name, ok in report["probes"].items()]
    recipes = report.get("recipes", {})
    running = [name for name, status in recipes.items() if status == "runs"]
    lines.append(f"recipes that run as written ({len(running)} of {len(recipes)}): {', '.join(running) or 'none'}")
    lines += [f"  {name}: {status[4:]}" for name, status in recipes.items() if status != "runs"]
    return "\n".join(lines)


def describe_frames(layout: Any) -> list[str]:
    """One line per video span of a :class:`~prunekit.layout.TokenLayout`: its frames x grid, e.g.
    ``sample 0, visual span 0: 8 frames x 6x6 grid (+1 token per frame outside the grid)``."""
    lines = []
    for b in range(layout.batch_size):
        visual = layout.visual[b]
        for span in layout.image_index[b][visual].unique().tolist():
            here = visual & (layout.image_index[b] == span)
            frames = layout.frame_index[b][here]
            if not bool((frames >= 0).any()):
                continue
            in_frames = here & (layout.frame_index[b] >= 0)
            rows, cols = layout.grid_row[b][in_frames], layout.grid_col[b][in_frames]
            count = int(frames.max()) + 1
            line = (f"sample {b}, visual span {span}: {count} frames x {int(rows.max()) + 1}x{int(cols.max()) + 1} "
                    f"grid")
            lead = int((rows < 0).sum()) // count
            if lead:
                line += f" (+{lead} token per frame outside the grid)"
            outside = int((frames < 0).sum())
            if outside:
                line += f" (+{outside} video token(s) in no frame)"
            lines.append(line)
    return lines


def video_frames(model: nn.Module, inputs: dict[str, Any]) -> list[str]:
    """Run one prefill of ``inputs`` (``model(**inputs)``) and describe its video spans as criteria see them
    (:func:`describe_frames`): frames x grid per span, from the adapter's frame facts."""
    import prunekit
    from prunekit.engine import current_layout

    recipe = {"name": "doctor-frames", "criteria": {"frames": {"type": "uniform_frames"}},
              "schedule": {"type": "stages", "stages": [{"layer": 0, "keep": 1.0}]}}
    seen: list[Any] = []
    with prunekit.apply(model, recipe) as pruner:
        # after the engine's own pre-hook on layer 0 (registered first), the layout of the running prefill
        handle = pruner.layers[0].register_forward_pre_hook(lambda module, args: seen.append(current_layout(model)))
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            handle.remove()
    layout = next((item for item in seen if item is not None), None)
    return [] if layout is None else describe_frames(layout)
