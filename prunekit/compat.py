"""The few places where transformers 5.x releases differ (5.24 renamed ``past_key_values`` to ``cache``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from transformers.masking_utils import create_causal_mask

CACHE_NAMES = ("cache", "past_key_values")  # the new name first
MASK_CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def cache_in(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a forward call was given, under either name (None without one)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_of(output: Any) -> Any:
    """The KV cache a model output carries, under either name (None without one)."""
    for name in CACHE_NAMES:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the name ``model.forward`` takes, to continue a generation by hand."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache}
