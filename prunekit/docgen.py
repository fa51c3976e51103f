"""Generate the reference pages of the documentation from the recipe schema and the plugins' docstrings.

``python -m prunekit.docgen docs/reference`` (the docs build runs it through ``docs/hooks.py``). The
pages are committed, so they read from a checkout too; ``tests/test_docs.py`` checks they are current.
They document prunekit's own plugins only, whatever else is installed.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from pathlib import Path

from prunekit.plugins import KINDS, PLURALS, get_registry
from prunekit.schema import DecodeSchema, RecipeSchema, VisionSchema


def _type_name(tp: object) -> str:
    text = getattr(tp, "__name__", None) if not typing.get_args(tp) else None
    return text or str(tp).replace("typing.", "")


def _fields_table(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    documented = any("doc" in f.metadata for f in dataclasses.fields(cls))
    rows = ["| parameter | type | default |" + (" meaning |" if documented else ""),
            "| --- | --- | --- |" + (" --- |" if documented else "")]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        row = f"| `{f.name}` | `{_type_name(hints.get(f.name, f.type))}` | `{default}` |"
        doc = f.metadata.get("doc", "").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
        rows.append(row + (f" {doc} |" if documented else ""))
    return rows if len(rows) > 2 else ["(no parameters)"]


def recipe_reference() -> str:
    lines = ["# Recipe schema", "",
             "Generated from `prunekit.schema.RecipeSchema`: the keys a recipe may have. Criterion, combiner,",
             "merger and schedule parameters are listed per plugin in [plugins.md](plugins.md).", "",
             "## Top level", ""]
    lines += _fields_table(RecipeSchema)
    lines += ["", "## `vision` block", ""] + _fields_table(VisionSchema)
    lines += ["", "## `decode` block", ""] + _fields_table(DecodeSchema)
    lines += ["", "## Built-in recipes", ""]
    from prunekit.recipe import load_recipe, recipe_files

    own = Path(__file__).resolve().parent
    lines += ["| recipe | description |", "| --- | --- |"]
    for name, path in sorted(recipe_files().items()):
        if own in path.resolve().parents:  # prunekit's own recipes, not those of other installed plugins
            lines.append(f"| `{name}` | {load_recipe(name).description} |")
    return "\n".join(lines) + "\n"


OWN_DISTRIBUTION = "prunekit"


def plugin_reference() -> str:
    registry = get_registry()
    lines = ["# Criteria, combiners, mergers, schedules and adapters", "",
             "Generated from the registered plugins' docstrings and parameters (`prunekit plugins` lists the",
             "same at the command line).", ""]
    for kind in KINDS:
        lines += [f"## {PLURALS[kind].capitalize()}", ""]
        for name, claims in sorted(registry.entries(kind).items()):
            entry = claims[0]
            if entry.distribution != OWN_DISTRIBUTION:
                continue
            lines += [f"### `{name}`", "", f"From `{entry.distribution}` (plugin `{entry.plugin}`).", ""]
            obj = entry.obj
            doc = inspect.getdoc(obj) if kind != "adapter" else entry.description
            lines += [(doc or "").replace("Example::", "Example:"), ""]
            if kind != "adapter" and dataclasses.is_dataclass(obj):
                lines += _fields_table(obj) + [""]
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> text of every reference page."""
    return {"recipe-schema.md": recipe_reference(), "plugins.md": plugin_reference()}


def write(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in pages().items():
        path = folder / name
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write(sys.argv[1] if len(sys.argv) > 1 else "docs/reference"):
        print(path)
