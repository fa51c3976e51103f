"""The plugin registry: criteria, combiners, schedules, adapters and recipe folders, found through pluggy.

Built-ins and third-party packages arrive the same way, through the ``prunekit`` entry-point
group. A plugin that fails to import or returns something malformed is reported in
``registry.problems`` and the others keep working; a name two plugins claim is an error only
when somebody asks for it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pluggy
from torch import nn

from prunekit import hookspecs
from prunekit.api import Adapter, Combiner, Criterion, Merger, Schedule
from prunekit.errors import AdapterError, PluginError, valid_list

PROJECT = "prunekit"

# kind -> (hook name, expected type, whether items are classes)
PLURALS = {"criterion": "criteria", "combiner": "combiners", "schedule": "schedules", "merger": "mergers",
           "adapter": "adapters"}
KINDS: dict[str, tuple[str, type, bool]] = {
    "criterion": ("prunekit_add_criteria", Criterion, True),
    "combiner": ("prunekit_add_combiners", Combiner, True),
    "schedule": ("prunekit_add_schedules", Schedule, True),
    "merger": ("prunekit_add_mergers", Merger, True),
    "adapter": ("prunekit_add_adapters", Adapter, False),
}


@dataclass(frozen=True)
class Entry:
    """One registered item and where it came from."""

    kind: str
    name: str
    obj: Any
    plugin: str
    distribution: str | None

    @property
    def description(self) -> str:
        """The first paragraph of the item's docstring, on one line (an adapter may say it itself)."""
        describe = getattr(self.obj, "summary", None)
        if callable(describe):
            return describe()
        doc = (inspect.getdoc(self.obj) or "").strip()
        return " ".join(doc.split("\n\n")[0].split())


class Registry:
    """Every plugin contribution, by kind and name."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.problems: list[str] = []
        self._distributions: dict[str, str | None] = {}
        self._catalog: dict[str, dict[str, list[Entry]]] | None = None
        self._build_problems: list[str] = []
        if load_entry_points:
            self._load_entry_points()

    # -- loading -------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=PROJECT):
            if self.pm.get_plugin(ep.name) is not None:
                continue
            dist = ep.dist.name if ep.dist is not None else None
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the others down
                if dist == BUILTIN_DISTRIBUTION:  # a broken installation: say so at once, never "(none)" later
                    raise PluginError(f"prunekit's built-in plugin {ep.name!r} failed to import ({ep.value}): "
                                      f"{exc!r}; {_version_hint()}") from exc
                self.problems.append(f"plugin {ep.name!r} ({dist}): import of {ep.value!r} failed: {exc!r}")
                continue
            self.register(plugin, name=ep.name, distribution=dist)

    def register(self, plugin: object, name: str | None = None, distribution: str | None = None) -> str:
        """Register a plugin object (a module or any object with ``@hookimpl`` functions)."""
        try:
            registered = self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc
        assert registered is not None
        self._distributions[registered] = distribution
        self._catalog = None
        return registered

    def unregister(self, name: str) -> None:
        if self.pm.get_plugin(name) is None:
            raise PluginError(f"no plugin named {name!r}; registered: {valid_list(self.plugin_names())}")
        self.pm.unregister(name=name)
        self._catalog = None

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    # -- catalog ---------------------------------------------------------------------------
    def _build(self) -> dict[str, dict[str, list[Entry]]]:
        catalog: dict[str, dict[str, list[Entry]]] = {kind: {} for kind in KINDS}
        problems: list[str] = []
        for kind, (hook_name, base, is_class) in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():  # registration order
                plugin = impl.plugin_name
                try:
                    items = impl.function()
                except Exception as exc:
                    problems.append(f"plugin {plugin!r}: {hook_name}() raised {exc!r}")
                    continue
                if not isinstance(items, (list, tuple)):
                    problems.append(f"plugin {plugin!r}: {hook_name}() must return a list, got {type(items).__name__}")
                    continue
                for item in items:
                    ok = issubclass(item, base) if (is_class and isinstance(item, type)) else (
                        not is_class and isinstance(item, base)
                    )
                    name = getattr(item, "name", "")
                    if not ok or not isinstance(name, str) or not name:
                        what = f"{base.__name__} subclass" if is_class else f"{base.__name__} instance"
                        problems.append(f"plugin {plugin!r}: {hook_name}() returned {item!r}, expected a named {what}")
                        continue
                    entry = Entry(kind, name, item, plugin, self._distributions.get(plugin))
                    catalog[kind].setdefault(name, []).append(entry)
        for kind, entries in catalog.items():
            for name, claims in entries.items():
                if len(claims) > 1:
                    who = ", ".join(f"{e.plugin!r} ({e.distribution})" for e in claims)
                    problems.append(f"{kind} {name!r} is registered twice: by {who}")
        self._build_problems = problems
        return catalog

    def entries(self, kind: str) -> dict[str, list[Entry]]:
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind {kind!r}; valid: {valid_list(KINDS)}")
        if self._catalog is None:
            self._catalog = self._build()
        return self._catalog[kind]

    def all_problems(self) -> list[str]:
        self.entries("criterion")
        return self.problems + self._build_problems

    def _problem_note(self) -> str:
        """What failed to load, for lookup errors (a missing name may be a plugin that did not import)."""
        problems = self.all_problems()
        return f" (plugins that failed to load: {'; '.join(problems)})" if problems else ""

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries(kind))

    def get(self, kind: str, name: str) -> Entry:
        """The item registered as ``name``; a clear error if it is missing or claimed twice."""
        claims = self.entries(kind).get(name)
        if not claims:
            raise PluginError(f"unknown {kind} {name!r}; registered {PLURALS[kind]}: {valid_list(self.names(kind))}"
                              f"{self._problem_note()}")
        if len(claims) > 1:
            who = ", ".join(f"plugin {e.plugin!r} (distribution {e.distribution})" for e in claims)
            raise PluginError(f"{kind} {name!r} is registered twice, by {who}; uninstall or rename one")
        return claims[0]

    def adapters(self) -> list[Adapter]:
        """Adapters in registration order (built-ins first), each name once."""
        return [self.get("adapter", name).obj for name in self.entries("adapter")]

    def adapter_for(self, model: nn.Module, name: str | None = None) -> Adapter:
        """The concrete adapter for ``model``: the one named, or the first registered one that matches,
        resolved for the model (``Adapter.resolve``). Raises :class:`AdapterError` saying why none fits."""
        if name is not None:
            adapter = self.get("adapter", name).obj
            why = adapter.explain(model)
            if why is not None:
                raise AdapterError(f"adapter {name!r} (from the recipe) does not fit {type(model).__name__}: {why}")
            return adapter.resolve(model)
        adapters = self.adapters()
        reasons = []
        for adapter in adapters:
            why = adapter.explain(model)
            if why is None:
                return adapter.resolve(model)
            reasons.append(f"{adapter.name}: {why}")
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise AdapterError(
            f"no adapter matches {type(model).__name__} (config.model_type={model_type!r}); registered adapters: "
            f"{valid_list(a.name for a in adapters)} ({'; '.join(reasons)}); `prunekit doctor` explains each"
            f"{self._problem_note()}"
        )

    def recipe_dirs(self) -> list[Path]:
        dirs: list[Path] = []
        for impl in self.pm.hook.prunekit_add_recipe_dirs.get_hookimpls():
            try:
                dirs.extend(Path(d) for d in impl.function())
            except Exception as exc:
                self.problems.append(f"plugin {impl.plugin_name!r}: prunekit_add_recipe_dirs() raised {exc!r}")
        return dirs


_REGISTRY: Registry | None = None
BUILTIN_DISTRIBUTION = "prunekit"


def _version_hint() -> str:
    """prunekit's declared transformers requirement against the installed version."""
    needed = next((r for r in importlib.metadata.requires(BUILTIN_DISTRIBUTION) or [] if r.startswith("transformers")),
                  "transformers")
    return (f"prunekit needs {needed.split(';')[0]} (installed: transformers "
            f"{importlib.metadata.version('transformers')}); reinstall prunekit or change transformers")


def get_registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin without an entry point (a module or object with ``@hookimpl`` functions)."""
    return get_registry().register(plugin, name=name)


def unregister_plugin(name: str) -> None:
    get_registry().unregister(name)


def find_adapter(model: nn.Module, name: str | None = None) -> Adapter:
    """The concrete adapter for ``model`` from the process-wide registry (see :meth:`Registry.adapter_for`)."""
    return get_registry().adapter_for(model, name)
