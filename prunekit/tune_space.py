"""The search space of ``prunekit tune``: read from the ``tune`` metadata of each plugin's parameters.

A criterion, combiner, merger or schedule declares which of its parameters may be tuned, and over
what range, in the dataclass field's metadata, next to its default::

    first_layer: int = field(default=6, metadata={"layer": True, "tune": True})   # any decoder layer
    alpha: float = field(default=0.5, metadata={"tune": (0.0, 1.0)})                # a float range
    k0: float = field(default=60.0, metadata={"tune": (1.0, 200.0, "log")})         # log scale
    window: int = field(default=4, metadata={"tune": (1, 8)})                       # an int range
    direction: str = field(default="one_minus_cos", metadata={"tune": ["one_minus_cos", "one_minus_abs_cos"]})
    weights: Optional[dict[str, float]] = field(default=None, metadata={"tune": "simplex"})
    stages: list[Stage] = field(default_factory=list, metadata={"tune": "stages"})
    layers: list[int] = field(default_factory=list, metadata={"tune": "layers"})

``(low, high)`` is a range (ints when both bounds are ints), ``[a, b, ...]`` a choice, ``True`` on a
layer field any layer of the decoder (in the recipe's coordinates: ``reference_depth`` when it has
one; a plugin's layer fields are sampled in field order, each at or after the one before, as a
window ``first_layer..last_layer`` needs), ``"simplex"`` weights over the recipe's criteria that sum to 1 (one ``alpha`` for two),
``"stages"`` a list of prune stages (how many, their layers and keeps), ``"layers"`` ascending prune
layers. Third-party plugins declare theirs the same way; nothing in prunekit names them.

Candidates are recipe configs; :class:`Space` checks one against the model (the same checks as
``prunekit.apply``) and rates its analytic FLOPs before any forward.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf

from prunekit.api import Schedule, Stage
from prunekit.errors import PrunekitError, RecipeError
from prunekit.flops import DecoderDims, recipe_estimate

TUNE = "tune"
STRUCTURED = ("simplex", "stages", "layers")
MIN_KEEP = 0.01  # the smallest keep fraction a searched stage may have (at least one token is kept)


@dataclass(frozen=True)
class Knob:
    """One tunable parameter: where it lives in the recipe config and what values it may take."""

    path: tuple[str, ...]  # config keys, e.g. ("criteria", "ttv", "first_layer")
    kind: str  # "int" | "float" | "choice" | "layer" | "simplex" | "stages" | "layers"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def name(self) -> str:
        return ".".join(self.path)

    def describe(self) -> str:
        if self.kind in ("int", "float", "layer"):
            return f"{self.name}: {self.kind} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")
        if self.kind == "choice":
            return f"{self.name}: one of {list(self.choices)}"
        if self.kind == "simplex":
            return f"{self.name}: weights over {list(self.choices)} summing to 1"
        return f"{self.name}: 1..{int(self.high)} stages, layers {int(self.low)}..{self.choices[0] - 1}, keeps"


def _knob(path: tuple[str, ...], spec: Any, field: dataclasses.Field, current: Any, depth: int,
          criteria: Sequence[str], max_stages: int, where: str) -> Knob | None:
    """The knob a field's ``tune`` metadata declares (None where it cannot apply to this recipe)."""
    bad = (f"{where}: field {field.name!r} has metadata tune={spec!r}; valid: (low, high), (low, high, 'log'), "
           f"[choices], True (on a layer field) or one of {list(STRUCTURED)}")
    if spec is True:
        if not field.metadata.get("layer"):
            raise PrunekitError(bad)
        return Knob(path, "layer", 0, depth - 1)
    if isinstance(spec, str):
        if spec == "simplex":
            return Knob(path, "simplex", choices=tuple(criteria)) if len(criteria) > 1 else None
        if spec in ("stages", "layers"):
            return Knob(path, spec, low=1, high=max_stages, choices=(depth,))
        raise PrunekitError(bad)
    if isinstance(spec, list):
        if not spec:
            raise PrunekitError(bad)
        return Knob(path, "choice", choices=tuple(spec))
    if isinstance(spec, tuple) and len(spec) in (2, 3):
        low, high, *rest = spec
        log = rest == ["log"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
        if not numbers or low >= high or (rest and not log) or (log and low <= 0):
            raise PrunekitError(bad)
        if field.metadata.get("layer"):
            return Knob(path, "layer", max(0, int(low)), min(depth - 1, int(high)))
        integer = isinstance(low, int) and isinstance(high, int) and not isinstance(current, float)
        return Knob(path, "int" if integer else "float", low, high, log)
    raise PrunekitError(bad)


def _plugins(config: Mapping[str, Any], recipe: Any) -> list[tuple[tuple[str, ...], Any]]:
    """(config path, built plugin) of every part of a recipe that may declare knobs."""
    out = [(("criteria", key), plugin) for key, plugin in recipe.criteria.items()]
    if recipe.combiner is not None and config.get("combiner") is not None:
        out.append((("combiner",), recipe.combiner))
    if recipe.merger is not None:
        out.append((("merge",), recipe.merger))
    if recipe.schedule is not None:
        out.append((("schedule",), recipe.schedule))
    return out


class Space:
    """The knobs of a base recipe on one model, and the candidates built from their values.

    ``dims`` and ``n_visual`` give the FLOPs model; ``budget`` (a FLOPs ratio in (0, 1]) is checked
    before anything runs: a budget no schedule of the space reaches is a :class:`PrunekitError`.
    """

    def __init__(self, base: Any, dims: DecoderDims, n_visual: int, budget: float, model_name: str = "the model",
                 max_stages: int = 3, freeze: Sequence[str] = ()) -> None:
        import prunekit

        check_budget(budget)
        self._scaled: dict[float, dict[str, Any] | None] = {}
        self.recipe = prunekit.load_recipe(base)
        self.config: dict[str, Any] = OmegaConf.to_container(self.recipe.config, resolve=True)  # type: ignore[assignment]
        self.dims, self.n_visual, self.budget, self.model_name = dims, n_visual, float(budget), model_name
        self.depth = self.recipe.reference_depth or dims.num_layers
        self.max_stages = max(1, min(max_stages, self.depth - 1))
        criteria = list(self.recipe.criteria)
        self.knobs: list[Knob] = []
        for path, plugin in _plugins(self.config, self.recipe):
            if not dataclasses.is_dataclass(plugin):
                continue
            where = f"recipe {self.recipe.name!r}, {'.'.join(path)} ({type(plugin).__name__})"
            for field in dataclasses.fields(plugin):
                spec = field.metadata.get(TUNE)
                if spec is None or not field.init:
                    continue
                knob = _knob(path + (field.name,), spec, field, getattr(plugin, field.name, None), self.depth,
                             criteria, self.max_stages, where)
                if knob is not None and not any(knob.name == f or knob.name.startswith(f + ".") for f in freeze):
                    self.knobs.append(knob)
        if not self.knobs:
            raise PrunekitError(
                f"recipe {self.recipe.name!r} has nothing tunable: none of its parameters declares a search range "
                f"({self._parts()}); a plugin declares one with field metadata such as "
                f"{{'tune': (low, high)}} (see docs/tune.md)" + (f"; frozen: {list(freeze)}" if freeze else ""))
        self.base_ratio = self.ratio(self.recipe)
        self.min_ratio = self._min_ratio()
        if self.budget < self.min_ratio - 1e-12:
            raise PrunekitError(
                f"budget {self.budget:g} is below what any schedule of the search space reaches on "
                f"{model_name}: the smallest FLOPs ratio is {self.min_ratio:.4f} ({self._min_note}); "
                f"valid budgets: [{self.min_ratio:.4f}, 1]")

    def _parts(self) -> str:
        parts = []
        for path, plugin in _plugins(self.config, self.recipe):
            names = [f.name for f in dataclasses.fields(plugin) if f.init] if dataclasses.is_dataclass(plugin) else []
            parts.append(f"{'.'.join(path)} ({type(plugin).__name__}: {', '.join(names) or 'no parameters'})")
        return "; ".join(parts) or "no criteria, combiner or schedule"

    # ---- FLOPs ----------------------------------------------------------------------------
    def ratio(self, recipe: Any) -> float:
        """Analytic prefill FLOPs ratio (papers' convention) of a loaded recipe on the model."""
        return recipe_estimate(recipe, self.dims, self.n_visual).visual_ratio

    def _min_ratio(self) -> float:
        """The smallest FLOPs ratio a candidate can have: one stage at the earliest layer keeping the least
        (a structural schedule knob), else the corners of the schedule's numeric knobs, else the base's."""
        from prunekit.recipe import load_recipe

        schedule = [k for k in self.knobs if k.path[0] == "schedule"]
        structural = [k for k in schedule if k.kind in ("stages", "layers")]
        if structural:
            knob = structural[0]
            value = ([{"layer": 1, "keep": self._min_keep()}] if knob.kind == "stages" else [1])
            config = _set(copy.deepcopy(self.config), knob.path, value)
            if knob.kind == "layers":
                for other in schedule:
                    if other.kind in ("float", "int") and other is not knob:
                        config = _set(config, other.path, other.low)
            self._min_note = "one stage before layer 1 keeping the fewest tokens"
            return self.ratio(load_recipe(config))
        numeric = [k for k in schedule if k.kind in ("int", "float", "layer")][:8]
        if not numeric:
            self._min_note = "the schedule is not tunable, so it is the base recipe's own"
            return self.base_ratio
        best = math.inf
        for corner in range(2 ** len(numeric)):
            config = copy.deepcopy(self.config)
            for i, knob in enumerate(numeric):
                config = _set(config, knob.path, knob.high if corner >> i & 1 else knob.low)
            try:
                best = min(best, self.ratio(load_recipe(config)))
            except (RecipeError, ValueError):
                continue
        self._min_note = "the lowest over the corners of the schedule's ranges"
        return best if math.isfinite(best) else self.base_ratio

    def _min_keep(self) -> float:
        return max(MIN_KEEP, 1.0 / self.n_visual)

    # ---- candidates -----------------------------------------------------------------------
    def sample(self, trial: Any) -> dict[str, Any]:
        """Ask an Optuna trial for one value per knob: ``{knob name: value}`` (structured knobs expand)."""
        values: dict[str, Any] = {}
        floor: dict[tuple[str, ...], int] = {}  # a plugin's layer knobs, in field order, never go down (a window)
        for knob in self.knobs:
            name = knob.name
            if knob.kind == "layer":
                low = max(int(knob.low), floor.get(knob.path[:-1], 0))
                values[name] = floor[knob.path[:-1]] = trial.suggest_int(name, low, max(low, int(knob.high)))
            elif knob.kind == "int":
                values[name] = trial.suggest_int(name, int(knob.low), int(knob.high), log=knob.log)
            elif knob.kind == "float":
                values[name] = round(trial.suggest_float(name, knob.low, knob.high, log=knob.log), 4)
            elif knob.kind == "choice":
                values[name] = trial.suggest_categorical(name, list(knob.choices))
            elif knob.kind == "simplex":
                values[name] = self._simplex(trial, knob)
            else:
                values[name] = self._stages(trial, knob)
        return values

    def _simplex(self, trial: Any, knob: Knob) -> dict[str, float]:
        keys = list(knob.choices)
        if len(keys) == 2:  # one alpha: w_a = alpha, w_b = 1 - alpha
            alpha = round(trial.suggest_float(f"{knob.name}.{keys[0]}", 0.0, 1.0), 4)
            return {keys[0]: alpha, keys[1]: round(1 - alpha, 4)}
        raw = {k: trial.suggest_float(f"{knob.name}.{k}", 1e-3, 1.0) for k in keys}
        total = sum(raw.values())
        return {k: round(v / total, 4) for k, v in raw.items()}

    def _stages(self, trial: Any, knob: Knob) -> list:
        """``stages``: 1..max prune stages at ascending layers, keeps never growing (each stage keeps a
        fraction ``ratio`` of the stage before); ``layers``: the ascending layers alone."""
        n = trial.suggest_int(f"{knob.name}.n", 1, int(knob.high))
        layers, previous = [], 0
        for i in range(n):
            layer = trial.suggest_int(f"{knob.name}.{i}.layer", previous + 1, self.depth - (n - i))
            layers.append(layer)
            previous = layer
        if knob.kind == "layers":
            return layers
        stages, keep = [], 1.0
        for i, layer in enumerate(layers):
            if i == 0:
                keep = trial.suggest_float(f"{knob.name}.0.keep", self._min_keep(), 1.0, log=True)
            else:
                keep *= trial.suggest_float(f"{knob.name}.{i}.ratio", self._min_keep(), 1.0, log=True)
            stages.append({"layer": layer, "keep": max(round(keep, 4), self._min_keep())})
        return stages

    def candidate(self, values: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
        """The base recipe config with the knobs set to ``values`` (as :meth:`sample` returns them)."""
        config = copy.deepcopy(self.config)
        for knob in self.knobs:
            if knob.name in values:
                config = _set(config, knob.path, values[knob.name])
        config["name"] = name or f"{self.recipe.name}-tuned"
        return config

    def check(self, config: Mapping[str, Any]) -> tuple[Any, float]:
        """Load a candidate and check it against the model as ``prunekit.apply`` would; returns the recipe
        and its FLOPs ratio. Raises :class:`RecipeError` naming what does not fit."""
        import prunekit
        from prunekit.recipe import check_stages, collect_probes, scale_to_depth

        recipe = prunekit.load_recipe(dict(config))
        scaled = scale_to_depth(recipe, self.dims.num_layers)
        stages = check_stages(scaled, self.dims.num_layers, self.model_name)
        collect_probes(scaled.parts(), tuple(s.layer for s in stages), self.dims.num_layers, "decoder",
                       f"recipe {scaled.name!r}")
        return recipe, self.ratio(recipe)

    def scaled_base(self, budget: float | None = None) -> dict[str, Any] | None:
        """The base recipe with its own stages' keeps scaled by one factor so that its FLOPs ratio is the
        largest within ``budget`` (keeps capped at 1); None when its stages have no keep fraction or even
        the smallest keeps exceed the budget."""
        from prunekit.recipe import resolve_stages

        budget = self.budget if budget is None else budget
        if budget in self._scaled:
            return copy.deepcopy(self._scaled[budget])
        stages = resolve_stages(self.recipe, self.recipe.reference_depth or self.dims.num_layers)
        if not stages or any(s.keep is None for s in stages):
            return None

        def build(factor: float) -> dict[str, Any]:
            config = copy.deepcopy(self.config)
            config["schedule"] = {"type": "stages", "stages": [
                {"layer": s.layer, "keep": min(1.0, max(self._min_keep(), round(s.keep * factor, 4)))} for s in stages]}
            config["name"] = f"{self.recipe.name}@{budget:g}"
            return config

        def ratio(factor: float) -> float:  # the FLOPs model alone: no recipe is built per step
            keeps = [min(1.0, max(self._min_keep(), round(s.keep * factor, 4))) for s in stages]
            fixed = _Fixed([Stage(layer=s.layer, keep=k) for s, k in zip(stages, keeps)])
            return self.ratio(dataclasses.replace(self.recipe, schedule=fixed))

        low, high = 0.0, 1.0 / min(s.keep for s in stages)  # at `high` every keep is 1
        if ratio(low) > budget + 1e-12:
            return None
        if ratio(high) <= budget:
            self._scaled[budget] = build(high)
            return copy.deepcopy(self._scaled[budget])
        for _ in range(50):
            mid = (low + high) / 2
            low, high = (mid, high) if ratio(mid) <= budget else (low, mid)
        self._scaled[budget] = build(low) if ratio(low) <= budget + 1e-12 else None
        return copy.deepcopy(self._scaled[budget])

    def values_of(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The Optuna parameters :meth:`sample` turns into ``config``'s knob values (to enqueue a known
        recipe as a trial); None when ``config`` lies outside the space."""
        params: dict[str, Any] = {}
        for knob in self.knobs:
            parent, base_parent = _get(config, knob.path[:-1]), _get(self.config, knob.path[:-1])
            if not isinstance(parent, Mapping) or parent.get("type") != (base_parent or {}).get("type"):
                return None
            value = parent.get(knob.path[-1])
            if knob.kind in ("int", "layer", "float"):
                if not isinstance(value, (int, float)) or not knob.low <= value <= knob.high:
                    return None
                params[knob.name] = value
            elif knob.kind == "choice":
                if value not in knob.choices:
                    return None
                params[knob.name] = value
            elif knob.kind == "simplex":
                keys = list(knob.choices)
                weights = value or {k: 1.0 for k in keys}
                if set(weights) != set(keys) or any(weights[k] < 0 for k in keys) or sum(weights.values()) <= 0:
                    return None
                if len(keys) == 2:
                    params[f"{knob.name}.{keys[0]}"] = weights[keys[0]] / (weights[keys[0]] + weights[keys[1]])
                else:
                    top = max(weights.values())
                    if any(weights[k] / top < 1e-3 for k in keys):
                        return None
                    params.update({f"{knob.name}.{k}": weights[k] / top for k in keys})
            else:
                stages = [s if isinstance(s, Mapping) else {"layer": s} for s in (value or [])]
                if not 1 <= len(stages) <= knob.high:
                    return None
                params[f"{knob.name}.n"] = len(stages)
                previous, keep = 0, 1.0
                for i, stage in enumerate(stages):
                    layer = stage.get("layer")
                    if not isinstance(layer, int) or not previous < layer <= self.depth - (len(stages) - i):
                        return None
                    params[f"{knob.name}.{i}.layer"] = previous = layer
                    if knob.kind == "layers":
                        continue
                    new = stage.get("keep")
                    if new is None or stage.get("count") is not None:
                        return None
                    fraction = new if i == 0 else new / keep
                    if not self._min_keep() <= fraction <= 1:
                        return None
                    params[f"{knob.name}.{i}.{'keep' if i == 0 else 'ratio'}"] = fraction
                    keep = new
        return params

    def describe(self) -> list[str]:
        return [knob.describe() for knob in self.knobs]


@dataclass
class _Fixed(Schedule):
    """Given stages as they are (to rate a schedule with the FLOPs model without building a recipe)."""

    stages: list

    def resolve(self, num_layers: int) -> list[Stage]:
        return list(self.stages)


def _get(config: Mapping[str, Any], path: Sequence[str]) -> Any:
    node: Any = config
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def _set(config: dict[str, Any], path: Sequence[str], value: Any) -> dict[str, Any]:
    node = config
    for key in path[:-1]:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return config


def check_budget(budget: Any) -> float:
    """A FLOPs budget in (0, 1] or a :class:`PrunekitError` naming it."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) \
            or not 0 < budget <= 1:
        raise PrunekitError(f"budget {budget!r} is not a FLOPs ratio; valid: a number in (0, 1] (the pruned "
                            f"prefill's FLOPs over the unpruned one's, papers' convention)")
    return float(budget)
