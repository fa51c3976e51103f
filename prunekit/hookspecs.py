"""What a prunekit plugin may contribute.

A plugin is a module (or object) with ``@prunekit.hookimpl`` functions named as below. Installed
packages are found through the ``prunekit`` entry-point group::

    [project.entry-points.prunekit]
    my_plugin = "my_package.plugin"

Each hook returns a list; every item has a unique ``name`` within its kind (the recipe's
``type``). Criterion, combiner, schedule and merger hooks return *classes* (dataclasses whose
fields are the parameters); the adapter hook returns *instances*; the recipe-folder hook returns
folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from prunekit.api import Adapter, Combiner, Criterion, Merger, Schedule

hookspec = pluggy.HookspecMarker("prunekit")
hookimpl = pluggy.HookimplMarker("prunekit")


@hookspec
def prunekit_add_criteria() -> list[type[Criterion]]:
    """Criterion classes (subclasses of :class:`prunekit.api.Criterion`)."""


@hookspec
def prunekit_add_combiners() -> list[type[Combiner]]:
    """Combiner classes (subclasses of :class:`prunekit.api.Combiner`)."""


@hookspec
def prunekit_add_schedules() -> list[type[Schedule]]:
    """Schedule classes (subclasses of :class:`prunekit.api.Schedule`)."""


@hookspec
def prunekit_add_mergers() -> list[type[Merger]]:
    """Merger classes (subclasses of :class:`prunekit.api.Merger`): what a stage does with dropped tokens."""


@hookspec
def prunekit_add_adapters() -> list[Adapter]:
    """Adapter instances (:class:`prunekit.api.Adapter`), tried in order of registration."""


@hookspec
def prunekit_add_recipe_dirs() -> list[Path | str]:
    """Folders (not files), each holding recipe files ``<name>.yaml``.

    ``load_recipe(name)`` and ``prunekit.apply(model, name)`` find a recipe by its file name
    without ``.yaml`` (``recipes/mlp-norm-iga.yaml`` is ``"mlp-norm-iga"``); the first folder
    registered wins a name two folders hold, built-ins first.
    """
