"""Errors raised by prunekit. Each names the bad value, where it came from and what is valid."""

from __future__ import annotations

from collections.abc import Iterable


class PrunekitError(Exception):
    """Base class of every error prunekit raises on purpose."""


class RecipeError(PrunekitError, ValueError):
    """A recipe (YAML, dict, name or override) is malformed or asks for something that does not exist."""


class PluginError(PrunekitError):
    """A plugin is missing, registered twice, or contributed something malformed."""


class AdapterError(PrunekitError):
    """No adapter fits the model, or the model's structure is not what the adapter expects."""


class LayoutError(PrunekitError, ValueError):
    """The inputs of a forward pass cannot be pruned (no visual tokens, no input_ids, ...)."""


class PrunerStateError(PrunekitError, RuntimeError):
    """A pruner is used in a state that does not allow it (applied twice, used after remove, ...)."""


def valid_list(names: Iterable[object]) -> str:
    """Format the valid choices for an error message: ``'a', 'b', 'c'`` (sorted)."""
    items = sorted({str(n) for n in names})
    return ", ".join(repr(n) for n in items) if items else "(none)"
