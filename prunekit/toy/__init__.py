"""The built-in default: a synthetic visual question task and a small LLaVA trained on it.

``prunekit run`` and ``prunekit eval`` use it when no model is given: a real
``LlavaForConditionalGeneration`` (CLIP-style tower, MLP projector, 16-layer Llama decoder) whose
weights and tokenizer ship with the package, so the main job runs offline on a CPU.

Two toys exist (``--toy``): ``llava``, the default (:mod:`prunekit.toy.v2`, LLaVA-1.5's layout: image
first, 144 visual tokens, small objects), and ``question-first``, the first toy (:mod:`prunekit.toy.task`,
64 visual tokens, the question shown before and after the image). docs/toy.md compares them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from prunekit.toy.task import Question, ToyTask

TOYS = {"question-first": "prunekit.toy", "llava": "prunekit.toy.v2"}  # --toy name -> package with task, model
DEFAULT_TOY = "llava"


def toy_parts(name: str | None = None) -> tuple[ModuleType, ModuleType]:
    """The task module and the model module of the toy ``name`` (default :data:`DEFAULT_TOY`)."""
    from prunekit.errors import PrunekitError

    name = DEFAULT_TOY if name is None else name
    if name not in TOYS:
        raise PrunekitError(f"unknown toy {name!r}; valid: {', '.join(repr(t) for t in TOYS)}")
    package = TOYS[name]
    return importlib.import_module(f"{package}.task"), importlib.import_module(f"{package}.model")


__all__ = ["DEFAULT_TOY", "TOYS", "Question", "ToyTask", "toy_parts"]
