"""Recipes: criteria + combiner + schedule, validated by an OmegaConf schema and built through the registries.

A recipe in YAML::

    name: transprune-high
    positions: compact            # compact | original
    criteria:                     # key -> {type: <registered criterion>, <its parameters>}
      ttv: {type: accumulated_ttv, first_layer: 6, last_layer: 11}
      iga: {type: iga}
    combiner: {type: weighted_sum, weights: {ttv: 0.5, iga: 0.5}, normalize: sum}
    schedule:
      type: stages
      stages: [{layer: 7, keep: 0.875}, {layer: 9, keep: 0.625}, {layer: 12, keep: 0.125}]
    merge: null                   # optional: {type: <registered merger>, ...} for dropped tokens

``type`` defaults to the key (``criteria: {iga: {}}``). Overrides are dotted:
``["schedule.stages.0.keep=0.5", "criteria.ttv.direction=one_minus_abs_cos"]``.

This module also checks a recipe against a model's depth (:func:`check_stages`,
:func:`scale_to_depth`) and collects the probes its plugins ask for (:func:`collect_probes`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prunekit.api import Combiner, Criterion, Merger, Schedule, Stage, check_keep_count
from prunekit.errors import PluginError, RecipeError, valid_list
from prunekit.plugins import get_registry
from prunekit.probes import LayerInput, Probe, VisionFeatures
from prunekit.schema import RECIPE_KEYS, RecipeSchema


def _parts(criteria: dict[str, Criterion], merger: Merger | None) -> list[tuple[str, Any]]:
    """The criteria by key, then the merger as ``"merge"``."""
    return list(criteria.items()) + ([("merge", merger)] if merger is not None else [])


@dataclass(frozen=True)
class VisionRecipe:
    """The built ``vision`` block of a recipe: what prunes each image before the projector."""

    criteria: dict[str, Criterion]
    combiner: Combiner
    stage: Stage  # layer 0: the first decoder layer sees the reduced image
    merger: Merger | None

    def parts(self) -> list[tuple[str, Any]]:
        """(recipe key, plugin) of everything that may ask for vision probes."""
        return _parts(self.criteria, self.merger)


@dataclass(frozen=True)
class DecodeSelection:
    """The built ``decode`` block: layers from ``layer`` on read, in each decode step, the cached visual tokens
    the new token attends to most at ``layer - 1`` (``int(n * (1 - prune))`` of ``n``), unless its attention row
    is at least ``similar`` (cosine) to the previous step's, when they read them all."""

    layer: int
    prune: float
    similar: float | None


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: built criterion, combiner and schedule objects."""

    name: str
    description: str
    criteria: dict[str, Criterion]
    combiner: Combiner | None  # None when the recipe has only a vision stage
    schedule: Schedule | None
    adapter: str | None
    positions: str
    config: DictConfig = field(repr=False, compare=False)
    merger: Merger | None = None
    vision: VisionRecipe | None = None
    reference_depth: int | None = None
    decode: DecodeSelection | None = None

    def to_yaml(self) -> str:
        return OmegaConf.to_yaml(self.config)

    def parts(self) -> list[tuple[str, Any]]:
        """(recipe key, plugin) of everything that may ask for decoder probes."""
        return _parts(self.criteria, self.merger)


RecipeSource = Union[str, Path, Mapping, DictConfig, Recipe]


def builtin_recipe_names() -> list[str]:
    """Names of every recipe YAML that the registered recipe folders hold."""
    return sorted(recipe_files())


def recipe_files() -> dict[str, Path]:
    """Recipe name -> its YAML file, over every registered recipe folder (the first folder wins a name)."""
    files: dict[str, Path] = {}
    for folder in get_registry().recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            files.setdefault(path.stem, path)
    return files


def _read_source(source: RecipeSource) -> tuple[DictConfig, str]:
    """The raw config of a recipe source and a label for error messages."""
    if isinstance(source, (Mapping, DictConfig)):
        return OmegaConf.create(dict(source) if isinstance(source, Mapping) else source), "recipe dict"
    text = str(source)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise RecipeError(f"recipe file {text!r} does not exist")
        try:
            return OmegaConf.load(path), f"recipe file {text!r}"
        except (yaml.YAMLError, OmegaConfBaseException) as exc:
            raise RecipeError(f"recipe file {text!r} is not valid YAML: {exc}") from exc
    files = recipe_files()
    if text not in files:
        raise RecipeError(f"unknown recipe {text!r}; built-in recipes: {valid_list(files)} (or pass a YAML path)")
    return OmegaConf.load(files[text]), f"recipe {text!r}"


def _explain(exc: OmegaConfBaseException, where: str, valid: Sequence[str] | None = None) -> RecipeError:
    message = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    hint = f"; valid keys: {valid_list(valid)}" if valid is not None and "not in" in message else ""
    at = f" at {key!r}" if key else ""
    return RecipeError(f"{where}{at}: {message}{hint}")


def _yaml_value(item: str, raw: str, where: str) -> Any:
    """The value of an override, parsed as YAML (``[1, 2]``, ``0.5``, ``null``, ``{a: 1}``)."""
    if not raw.strip():
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise RecipeError(f"{where}, override {item!r}: the value {raw!r} is not valid YAML ({problem}); write "
                          f"a scalar (0.5, text), a list ([7, 9]) or a mapping ({{alpha: 0.5}})") from None


def _drop_criterion(cfg: DictConfig, key: str, item: str, where: str) -> bool:
    """``criteria.X=null`` (or ``vision.criteria.X=null``) removes criterion X; True when ``key`` is one."""
    parts = key.split(".")
    block = parts[:-1]
    if block not in (["criteria"], ["vision", "criteria"]):
        return False
    criteria = OmegaConf.select(cfg, ".".join(block))
    name = parts[-1]
    if criteria is None or name not in criteria:
        present = list(criteria or [])
        raise RecipeError(f"{where}, override {item!r}: '{key}=null' removes a criterion, but the recipe has no "
                          f"criterion {name!r} there; its criteria: {valid_list(present)}")
    del criteria[name]
    return True


def _check_kind(cfg: DictConfig, key: str, value: Any, item: str, where: str) -> None:
    """A mapping key takes a mapping (or null), a list key a list: never a silent container mix."""
    current = OmegaConf.select(cfg, key, default=None)
    if isinstance(current, DictConfig) and not isinstance(value, (Mapping, type(None))):
        raise RecipeError(f"{where}, override {item!r}: {key!r} is a mapping ({valid_list(current) or 'empty'}), "
                          f"got {type(value).__name__} {value!r}; set one of its keys ({key}.<name>=...) or give "
                          f"a mapping ({key}={{...}})")
    if isinstance(current, ListConfig) and isinstance(value, Mapping):
        raise RecipeError(f"{where}, override {item!r}: {key!r} is a list, got a mapping {value!r}")


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str], where: str) -> None:
    if isinstance(overrides, (str, bytes)):
        raise RecipeError(f"overrides must be a list of 'dotted.key=value' strings, got one string {overrides!r}; "
                          f"pass [{overrides!r}]")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise RecipeError(f"override {item!r} must look like 'dotted.key=value'")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = _yaml_value(item, raw, where)
        top = key.split(".")[0]
        if top not in RECIPE_KEYS:
            raise RecipeError(f"override {item!r}: unknown recipe key {top!r}; valid keys: {valid_list(RECIPE_KEYS)}")
        if value is None and _drop_criterion(cfg, key, item, where):
            continue
        _check_kind(cfg, key, value, item, where)
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as exc:
            raise _explain(exc, f"{where}, override {item!r}") from exc
        except (TypeError, ValueError) as exc:  # e.g. a mapping merged into a list that an earlier override nulled
            raise RecipeError(f"{where}, override {item!r}: cannot set {key!r} to {type(value).__name__} "
                              f"{value!r} ({exc})") from exc


def _build_plugin(kind: str, spec: Any, default_type: str | None, where: str) -> Any:
    """Build a criterion/combiner/schedule from ``{type: name, **params}``, checking the parameters."""
    if spec is None:
        spec = {}
    if not isinstance(spec, (Mapping, DictConfig)):
        raise RecipeError(f"{where} must be a mapping like {{type: <{kind} name>, ...}}, got {spec!r}")
    params = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    type_name = params.pop("type", default_type)
    if type_name is None:
        raise RecipeError(f"{where} needs a 'type'; registered {kind}s: {valid_list(get_registry().names(kind))}")
    try:
        cls = get_registry().get(kind, str(type_name)).obj
    except PluginError as exc:
        raise RecipeError(f"{where}: {exc}") from exc
    if not dataclasses.is_dataclass(cls):
        raise RecipeError(f"{where}: {kind} {type_name!r} is not a dataclass, so its parameters cannot be checked")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), params))
    except OmegaConfBaseException as exc:
        raise _explain(exc, f"{where} ({kind} {type_name!r})", fields) from exc
    except (TypeError, ValueError) as exc:  # a mapping where the plugin takes a list, or the other way round
        raise RecipeError(f"{where} ({kind} {type_name!r}): {exc}: a parameter holds a mapping where a list "
                          f"belongs or a list where a mapping belongs; its parameters: {valid_list(fields)}") from exc
    try:
        if kind != "combiner":
            obj.validate()
    except ValueError as exc:
        raise RecipeError(f"{where} ({kind} {type_name!r}): {exc}") from exc
    return obj


_MAPPING_KEYS = {"": ("criteria", "combiner", "schedule", "merge", "vision", "decode"),
                 "vision": ("criteria", "combiner", "merge")}


def _check_mappings(raw: Any, where: str) -> None:
    """The recipe itself, its plugin blocks and its vision block are mappings (or null): a clear error otherwise."""
    if not isinstance(raw, DictConfig):
        raise RecipeError(f"{where}: a recipe is a mapping of {valid_list(RECIPE_KEYS)}, got {type(raw).__name__}")
    for block, keys in _MAPPING_KEYS.items():
        node = raw if not block else raw.get(block)
        if not isinstance(node, DictConfig):
            continue
        for key in keys:
            value = node.get(key)
            if value is not None and not isinstance(value, DictConfig):
                dotted = f"{block}.{key}" if block else key
                shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
                raise RecipeError(f"{where}: {dotted!r} must be a mapping, got {type(shown).__name__} {shown!r} "
                                  f"(criteria: {{key: {{type: <criterion>, ...}}}}; combiner, schedule, merge: "
                                  f"{{type: <name>, ...}})")


def load_recipe(source: RecipeSource, overrides: Sequence[str] | None = None) -> Recipe:
    """Load, validate and build a recipe from a built-in name, a YAML path, a dict or a :class:`Recipe`."""
    if isinstance(source, Recipe):
        if not overrides:
            return source
        source = source.config
    raw, where = _read_source(source)
    _check_mappings(raw, where)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RecipeSchema), raw)
    except OmegaConfBaseException as exc:
        raise _explain(exc, where, RECIPE_KEYS) from exc
    except (TypeError, ValueError) as exc:  # containers of the wrong kind below the checked blocks
        raise RecipeError(f"{where}: {exc}; valid keys: {valid_list(RECIPE_KEYS)}") from exc
    _apply_overrides(cfg, overrides if overrides is not None else [], where)

    if cfg.reference_depth is not None and cfg.reference_depth < 1:
        raise RecipeError(f"{where}: reference_depth must be a positive layer count, got {cfg.reference_depth}")
    vision = None if cfg.vision is None else _build_vision(cfg.vision, f"{where}, vision")
    criteria: dict[str, Criterion] = {}
    combiner = schedule = merger = None
    if cfg.criteria or cfg.schedule or vision is None:
        criteria, combiner = _build_scoring(cfg.criteria, cfg.combiner, where, "")
        if not cfg.schedule:
            raise RecipeError(f"{where}: 'schedule' is missing; registered schedules: "
                              f"{valid_list(get_registry().names('schedule'))}")
        schedule = _build_plugin("schedule", cfg.schedule, None, f"{where}, schedule")
        merger = None if cfg.merge is None else _build_plugin("merger", cfg.merge, None, f"{where}, merge")

    if cfg.adapter is not None:
        try:
            get_registry().get("adapter", cfg.adapter)
        except PluginError as exc:
            raise RecipeError(f"{where}, adapter: {exc}") from exc
    return Recipe(
        name=cfg.name,
        description=cfg.description,
        criteria=criteria,
        combiner=combiner,
        schedule=schedule,
        adapter=cfg.adapter,
        positions=cfg.positions,
        config=cfg,
        merger=merger,
        vision=vision,
        reference_depth=cfg.reference_depth,
        decode=None if cfg.decode is None else _build_decode(cfg.decode, f"{where}, decode"),
    )


def _build_scoring(criteria_cfg: Any, combiner_cfg: Any, where: str, prefix: str) -> tuple[dict[str, Criterion], Combiner]:
    """The criteria and combiner of a recipe (or of its vision block, ``prefix='vision.'``)."""
    if not criteria_cfg:
        raise RecipeError(f"{where}: '{prefix}criteria' is empty; registered criteria: "
                          f"{valid_list(get_registry().names('criterion'))}")
    criteria: dict[str, Criterion] = {}
    for key, spec in criteria_cfg.items():
        criterion = _build_plugin("criterion", spec, str(key), f"{where}, {prefix}criteria.{key}")
        criterion.key = str(key)
        criteria[str(key)] = criterion
    if combiner_cfg is None:
        if len(criteria) > 1:
            raise RecipeError(f"{where}: {len(criteria)} criteria ({valid_list(criteria)}) need a "
                              f"'{prefix}combiner'; registered combiners: "
                              f"{valid_list(get_registry().names('combiner'))}")
        combiner_cfg = {"type": "weighted_sum", "normalize": "none"}
    combiner = _build_plugin("combiner", combiner_cfg, None, f"{where}, {prefix}combiner")
    try:
        combiner.validate(list(criteria))
    except ValueError as exc:
        raise RecipeError(f"{where}, {prefix}combiner: {exc}") from exc
    return criteria, combiner


def _build_vision(cfg: Any, where: str) -> VisionRecipe:
    criteria, combiner = _build_scoring(cfg.criteria, cfg.combiner, where, "")
    try:
        check_keep_count(cfg.keep, cfg.count, where)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc
    merger = None if cfg.merge is None else _build_plugin("merger", cfg.merge, None, f"{where}.merge")
    return VisionRecipe(criteria, combiner, Stage(layer=0, keep=cfg.keep, count=cfg.count), merger)


def _build_decode(cfg: Any, where: str) -> DecodeSelection:
    if cfg.layer < 1:
        raise RecipeError(f"{where}: layer={cfg.layer} must be at least 1 (the selection reads layer - 1)")
    if not 0 <= cfg.prune < 1:
        raise RecipeError(f"{where}: prune={cfg.prune} must lie in [0, 1) (the fraction of the cached visual "
                          "tokens a selecting step leaves out)")
    if cfg.similar is not None and not -1 <= cfg.similar <= 1:
        raise RecipeError(f"{where}: similar={cfg.similar} must be a cosine in [-1, 1], or null (every step selects)")
    return DecodeSelection(layer=int(cfg.layer), prune=float(cfg.prune), similar=cfg.similar)


def _ratio(recipe: Recipe, num_layers: int) -> float | None:
    if recipe.reference_depth is None or recipe.reference_depth == num_layers:
        return None
    return num_layers / recipe.reference_depth


def _depth_note(recipe: Recipe, num_layers: int) -> str:
    if recipe.reference_depth is None:
        return f"the model has {num_layers} decoder layers"
    return f"reference_depth {recipe.reference_depth}; the model has {num_layers} decoder layers"


def resolve_stages(recipe: Recipe, num_layers: int) -> list[Stage]:
    """The recipe's decoder stages for a ``num_layers``-layer model.

    The schedule resolves in the coordinates its layers are written in: ``resolve(reference_depth)``
    when the recipe has one, else ``resolve(num_layers)``. With ``reference_depth`` a prune before
    layer ``L`` then moves to ``ceil(L * num_layers / reference_depth)``. A schedule that raises
    ``ValueError`` or returns a stage outside ``0..depth-1`` is a :class:`RecipeError` naming it.
    """
    if recipe.schedule is None:
        return []
    depth = recipe.reference_depth or num_layers
    where = f"recipe {recipe.name!r}, schedule ({type(recipe.schedule).__name__} {recipe.schedule.name!r})"
    try:
        stages = list(recipe.schedule.resolve(depth))
        for i, stage in enumerate(stages):
            stage.check(f"stage {i}")
    except ValueError as exc:
        raise RecipeError(f"{where}, resolve({depth}): {exc} ({_depth_note(recipe, num_layers)})") from exc
    ratio = _ratio(recipe, num_layers)
    if ratio is None:
        return stages
    for i, stage in enumerate(stages):
        if stage.layer >= depth:
            raise RecipeError(f"{where}: stage {i} prunes before layer {stage.layer}, past reference_depth "
                              f"{depth} (valid layers 0..{depth - 1}; {_depth_note(recipe, num_layers)})")
    scaled = []
    for stage in stages:
        layer = int(math.ceil(stage.layer * ratio))
        cut_from = min(int(math.ceil(stage.cut_from * ratio)), max(layer - 1, 0))  # still before the stage
        scaled.append(dataclasses.replace(stage, layer=layer, cut_from=cut_from))
    layers = [stage.layer for stage in scaled]
    if len(set(layers)) < len(layers) and len({stage.layer for stage in stages}) == len(stages):
        raise RecipeError(
            f"{where}: reference_depth {depth} maps the stage layers {[stage.layer for stage in stages]} onto "
            f"{layers} of the model's {num_layers} decoder layers, so two stages land on one layer; give the "
            f"depth the layers were written for (the recipe's reference_depth, or none to use them as written)")
    return scaled


def check_stages(recipe: Recipe, num_layers: int, model_name: str = "the model") -> list[Stage]:
    """:func:`resolve_stages`, checked against the model: every stage inside its depth, layers
    ascending, keeps never growing (fractions against fractions, counts against counts)."""
    if recipe.schedule is None:  # a recipe with only a vision stage
        return []
    stages = resolve_stages(recipe, num_layers)
    where = f"recipe {recipe.name!r}, schedule"
    if not stages:
        raise RecipeError(f"{where}: the schedule has no stages")
    previous_layer, previous_keep = -1, None
    for i, stage in enumerate(stages):
        if not 0 <= stage.layer < num_layers:
            raise RecipeError(
                f"{where}: stage {i} prunes before layer {stage.layer}, past the model's depth: "
                f"{model_name} has {num_layers} decoder layers (valid layers 0..{num_layers - 1})"
            )
        if stage.layer <= previous_layer:
            raise RecipeError(f"{where}: stage {i} layer {stage.layer} must come after layer {previous_layer}")
        keep = stage.keep if stage.keep is not None else stage.count
        if previous_keep is not None and type(keep) is type(previous_keep) and keep > previous_keep:
            raise RecipeError(f"{where}: stage {i} keeps {keep}, more than the stage before ({previous_keep})")
        previous_layer, previous_keep = stage.layer, keep
    return stages


def layer_fields(plugin: Any) -> list[str]:
    """The dataclass fields of a criterion that name a decoder layer (``metadata={"layer": True}``)."""
    return [f.name for f in dataclasses.fields(plugin) if f.metadata.get("layer")]


def scale_to_depth(recipe: Recipe, num_layers: int) -> Recipe:
    """The recipe with the layers its criteria read mapped from ``reference_depth`` onto ``num_layers``.

    A criterion's layer (a dataclass field marked ``metadata={"layer": True}``) must lie in
    ``0..depth-1`` of the depth it is written for (``reference_depth``, else the model's), or this
    raises a :class:`RecipeError` naming the criterion, field, value and valid range. It moves to
    ``floor(l * num_layers / reference_depth)``, so a layer read before a prune stays before it
    (prunes move up, see :func:`resolve_stages`).
    """
    depth = recipe.reference_depth or num_layers
    for key, criterion in recipe.criteria.items():
        for name in layer_fields(criterion):
            value = getattr(criterion, name)
            if not isinstance(value, int) or not 0 <= value < depth:
                raise RecipeError(
                    f"recipe {recipe.name!r}, criteria.{key} ({criterion.name!r}): {name}={value!r} does not fit: "
                    f"valid layers 0..{depth - 1} ({_depth_note(recipe, num_layers)})"
                )
    ratio = _ratio(recipe, num_layers)
    if ratio is None:
        return recipe

    def scale_fields(obj: Any) -> Any:
        changes = {name: int(math.floor(getattr(obj, name) * ratio)) for name in layer_fields(obj)}
        if not changes:
            return obj
        scaled = dataclasses.replace(obj, **changes)
        scaled.key = obj.key
        return scaled

    decode = recipe.decode
    if decode is not None:  # a boundary like a stage's: moves up
        decode = dataclasses.replace(decode, layer=max(1, int(math.ceil(decode.layer * ratio))))
    return dataclasses.replace(recipe, criteria={key: scale_fields(c) for key, c in recipe.criteria.items()},
                               decode=decode)


def check_decode(recipe: Recipe, stages: Sequence[Stage], num_layers: int, model_name: str = "the model") -> None:
    """A ``decode`` block fits the model: its layer inside the depth, after a decoder stage (decode steps run
    on a pruned cache, whose slots say which cached tokens are visual)."""
    decode = recipe.decode
    if decode is None:
        return
    where = f"recipe {recipe.name!r}, decode"
    if not 1 <= decode.layer < num_layers:
        raise RecipeError(f"{where}: layer={decode.layer} does not fit: {model_name} has {num_layers} decoder "
                          f"layers (valid layers 1..{num_layers - 1}; {_depth_note(recipe, num_layers)})")
    if not stages or stages[0].layer > decode.layer - 1:
        first = f"its first stage prunes before layer {stages[0].layer}" if stages else "it has no decoder stage"
        raise RecipeError(f"{where}: the selection reads layer {decode.layer - 1}, but {first}; a decode block "
                          "needs a decoder stage at or before the layer it reads (a layer-0 stage that keeps "
                          "everything will do: {layer: 0, keep: 1.0})")


def collect_probes(parts: list[tuple[str, Any]], stage_layers: Sequence[int], num_layers: int, site: str,
                   where: str, tower_layers: int | None = None) -> list[tuple[Any, Any]]:
    """Every ``(plugin, probe)`` the parts ask for, checked: a known probe type read at ``site``
    (``"decoder"`` or ``"vision"``), inside the ``num_layers`` layers there (vision: negative from the end).
    ``tower_layers``: decoder criteria that say so (``tower_from_decoder``) may also read the vision tower, of this
    depth (0: the model's tower cannot be read from a decoder stage; None: not known here, such probes pass
    unchecked)."""
    known = get_args(Probe)
    out = []
    for key, plugin in parts:
        at = f"{where}, criteria.{key}" if key != "merge" else f"{where}, merge"
        try:
            probes = list(plugin.probes(stage_layers, num_layers))
        except ValueError as exc:
            raise RecipeError(f"{at}: {exc}") from exc
        for probe in probes:
            if site == "vision" and isinstance(probe, LayerInput) and probe.layer == 0 and not probe.final_norm:
                probe = VisionFeatures()  # in a vision block, "what enters layer 0" is the image's features
            if not isinstance(probe, known):
                raise RecipeError(f"{at}: {probe!r} is not a probe; valid: {valid_list(k.__name__ for k in known)}")
            depth, read = num_layers, site
            if probe.site == "vision" and site == "decoder" and getattr(plugin, "tower_from_decoder", False):
                if tower_layers is None:  # the model is not known here: apply() checks it on the model
                    out.append((plugin, probe))
                    continue
                if not tower_layers:
                    raise RecipeError(f"{at}: {probe} reads the vision tower from a decoder stage, which needs a "
                                      "projector that receives each image's patches one to one (LLaVA-1.5, "
                                      "Video-LLaVA); this model's images reach the language model another way")
                depth, read = tower_layers, "vision"  # a decoder criterion reading the tower (MustDrop's key set)
            if probe.site != read:
                raise RecipeError(f"{at}: {probe} reads the {probe.site}, but this stage runs in the {site} "
                                  f"(use {valid_list(k.__name__ for k in known if k.site == site)})")
            low = -depth if read == "vision" else 0
            if not low <= probe.layer < depth:
                raise RecipeError(f"{at}: {probe} reads {read} layer {probe.layer}, past the depth: "
                                  f"valid layers {low}..{depth - 1}")
            out.append((plugin, probe))
    return out
