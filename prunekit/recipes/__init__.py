"""Built-in recipes: the YAML files in this folder, found by name."""

from __future__ import annotations

from pathlib import Path

from prunekit.hookspecs import hookimpl


@hookimpl
def prunekit_add_recipe_dirs() -> list[Path]:
    return [Path(__file__).parent]
