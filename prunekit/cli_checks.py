"""Checks of command-line arguments, files and folders before any work starts (shared by every command).

Each check names the bad value and what is valid; failures are :class:`CommandLineError` (printed by the
command line as one ``prunekit: error: ...`` line, exit status 2) or ``argparse.ArgumentTypeError``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from prunekit.errors import PrunekitError


class CommandLineError(PrunekitError):
    """A command-line argument is invalid: printed as ``prunekit: error: ...`` (exit status 2)."""

    def __init__(self, message: str, usage: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")  # 'name' or 'namespace/name'


# ---- argument types: each names the bad value and what is valid ----

def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; valid: an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is invalid; valid: an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def keep_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: a keep fraction in (0, 1]") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{value:g} is not a keep fraction; valid: a number in (0, 1]")
    return value


def device_name(text: str) -> str:
    """A torch device that exists here: 'cpu', or 'cuda' / 'cuda:N' / 'mps' where available."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device; valid: cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available here (torch {torch.__version__}, "
                                             f"built with {built}); valid here: cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s); valid: "
                                             f"cuda:0..cuda:{count - 1}")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here; valid here: cpu")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: prunekit bench runs on cpu, cuda or mps")
    return text


# ---- checks of files and folders, before any work starts ----

def check_model_source(source: str, what: str = "model") -> str:
    """A model folder holding a readable config.json, or something that can only be a hub id."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CommandLineError(f"{what} {source!r} is a file; give a model folder (holding config.json and "
                                   f"the weights) or a hub id")
        config = path / "config.json"
        if not config.is_file():
            contents = "it is empty" if not any(path.iterdir()) else "it has no config.json"
            raise CommandLineError(f"{what} folder {source!r} is not a model folder: {contents} (a Hugging Face "
                                   f"model folder holds config.json and the weights)")
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CommandLineError(f"{config} is not valid JSON ({exc}); it should be a model's config.json") from None
        except OSError as exc:
            raise CommandLineError(f"cannot read {config}: {exc.strerror or exc}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise CommandLineError(f"{config} has no 'model_type' key; it should be a transformers model's config.json")
        return str(path)
    if not HUB_ID.match(source):  # a path ('/...', './...', 'a/b/c'), not 'name' or 'namespace/name'
        raise CommandLineError(f"{what} folder {source!r} does not exist (give a model folder or a hub id "
                               f"'namespace/name')")
    return source  # a hub id: transformers finds it (or says why not)


@contextmanager
def loading(what: str) -> Iterator[None]:
    """Turn transformers' and PIL's loading errors (OSError, ValueError, ...) into one CommandLineError line."""
    try:
        yield
    except PrunekitError:
        raise
    except (OSError, ValueError, KeyError, AttributeError, ImportError) as exc:  # JSONDecodeError is a ValueError;
        # ImportError: a part the model needs is not installed (Gemma 3n's timm vision tower)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandLineError(f"cannot load {what}: {first}") from exc


def check_image(path: str) -> None:
    """An image file that PIL can read."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.exists():
        raise CommandLineError(f"argument --image: {path!r} does not exist")
    if not file.is_file():
        raise CommandLineError(f"argument --image: {path!r} is not a file; give an image file (PNG, JPEG, ...)")
    if file.stat().st_size == 0:
        raise CommandLineError(f"argument --image: {path!r} is empty (0 bytes); give an image file (PNG, JPEG, ...)")
    try:
        with Image.open(file) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CommandLineError(f"argument --image: {path!r} is not an image file PIL can read ({exc}); "
                               f"give a PNG, JPEG or other image file") from None


def check_writable(path: str, option: str) -> None:
    """``path`` can be written (tried for real: as root, permission bits alone say nothing)."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise CommandLineError(f"argument {option}: {path!r} is a folder; give a file path such as "
                               f"{str(file / 'out.png')!r}")
    if not file.parent.is_dir():
        raise CommandLineError(f"argument {option}: cannot write {path!r}: the folder {str(file.parent)!r} "
                               f"does not exist")
    existed = file.exists()
    try:
        with open(file, "ab"):
            pass
    except OSError as exc:
        raise CommandLineError(f"argument {option}: cannot write {path!r}: {exc.strerror or exc}") from None
    if not existed:
        file.unlink(missing_ok=True)


def check_fits_depth(recipe: Any, num_layers: int, model_name: str) -> None:
    """The checks ``prunekit.apply`` makes of a recipe against a ``num_layers``-deep model, from the depth alone.

    The same calls, in the same order, as the Pruner's (criteria layers, stages, probe layers), so a
    recipe ``apply`` refuses is refused here with the same message.
    """
    from prunekit.recipe import check_stages, collect_probes, scale_to_depth

    scaled = scale_to_depth(recipe, num_layers)
    stages = check_stages(scaled, num_layers, model_name)
    collect_probes(scaled.parts(), tuple(stage.layer for stage in stages), num_layers, "decoder",
                   f"recipe {scaled.name!r}")


def best_attention(device: str) -> str:
    """flash_attention_2 where the optional flash-attn package imports and the device is CUDA, else sdpa."""
    if device.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"
