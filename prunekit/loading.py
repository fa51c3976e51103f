"""Loading checkpoints strictly: a weight the checkpoint lacks is an error, never a random initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError


def load_pretrained(cls: Any, source: str | Path, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, **kwargs)`` that raises :class:`PrunekitError` when the checkpoint lacks
    weights the model needs (transformers would initialise them at random with a warning: a model that
    loads but answers at chance)."""
    model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or [])
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weight(s) missing ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape ({', '.join(mismatched[:5])})")
        raise PrunekitError(f"the checkpoint {str(source)!r} does not fit {cls.__name__}: {'; '.join(parts)}; it was "
                            "saved for another architecture or another transformers version, or is incomplete")
    return model
