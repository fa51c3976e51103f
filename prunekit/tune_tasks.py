"""What ``prunekit tune`` scores a candidate on: the toy task, a JSONL file, or an lmms-eval task.

Each task holds a calibration split (what the study sees) and a held-out split (never shown to the
study) and answers :meth:`Task.correct`: per question, whether the model under a recipe (None: no
pruning) answers right. The toy and JSONL tasks score the same one-word greedy answer as
``prunekit eval``: the argmax of the next-token logits after the prompt.
"""

from __future__ import annotations

import json
import string
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit.errors import PrunekitError
from prunekit.flops import DecoderDims

SPLITS = ("calibration", "heldout")
TOY = "toy"


class Task:
    """A scored question set with two splits; subclasses fill the attributes and :meth:`correct`."""

    label: str = ""
    model: Any = None
    model_name: str = ""
    n_visual: int = 0
    sizes: dict[str, int]

    @property
    def dims(self) -> DecoderDims:
        return DecoderDims.from_config(self.model.config)

    def correct(self, recipe: dict | None, split: str) -> np.ndarray:
        """``[n]`` bool: which questions of ``split`` the model answers right under ``recipe``."""
        raise NotImplementedError


def load_model(source: str | None) -> tuple[Any, Any, Any, str]:
    """(model, processor, prompt builder ``(processor, question) -> text``, label) for ``toy``,
    ``toy:FOLDER`` or a model folder / hub id."""
    from prunekit.cli_checks import check_model_source, loading

    source = source or TOY
    if source == TOY or source.startswith(f"{TOY}:"):
        from prunekit.toy.model import load_toy
        from prunekit.toy.task import prompt

        folder = source.partition(":")[2] or None
        if folder is not None:
            check_model_source(folder, "--model")
        with loading(f"the toy model from {folder or 'the package'!r}"):
            model, processor = load_toy(folder)
        return model, processor, lambda processor, text: prompt(text), source
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from prunekit.run import chat_prompt

    source = check_model_source(source)
    with loading(f"the model {source!r}"):
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source).eval()
    processor.tokenizer.padding_side = "left"
    return model, processor, lambda processor, text: chat_prompt(processor, text), source


def _visual_ids(model: Any) -> list[int]:
    return [getattr(model.config, k) for k in ("image_token_id", "video_token_id")
            if getattr(model.config, k, None) is not None]


def count_visual(model: Any, input_ids: torch.Tensor) -> int:
    """Visual tokens of the first sample of a batch (what the FLOPs model is rated on)."""
    ids = _visual_ids(model)
    if not ids:
        raise PrunekitError(f"{type(model).__name__}'s config names no image_token_id: cannot count its visual tokens")
    return int(torch.isin(input_ids[0], torch.tensor(ids)).sum())


TOYS = {"toy": "prunekit.toy", "toy-v2": "prunekit.toy.v2"}  # --task name -> package with task.py and model.py


class ToyTask(Task):
    """A built-in toy task: calibration questions from one seed, held-out ones from another.

    ``toy`` is the shipped toy (``prunekit.toy``), ``toy-v2`` the LLaVA-layout one (``prunekit.toy.v2``);
    ``model`` is a folder of its weights (default: the package's)."""

    def __init__(self, model: str | None, calibration: int, heldout: int, seed: int = 0, heldout_seed: int = 1,
                 batch_size: int = 50, toy: str = "toy") -> None:
        import importlib

        from prunekit.cli_checks import check_model_source, loading
        from prunekit.toy.evaluate import _batches

        if seed == heldout_seed:
            raise PrunekitError(f"the held-out seed {heldout_seed} is the calibration seed: held-out questions must "
                                f"be ones the study never saw; give --heldout-seed another value")
        self.module = importlib.import_module(f"{TOYS[toy]}.task")
        folder = model.partition(":")[2] if model and model.startswith(f"{TOY}:") else model
        folder = None if folder in (None, "", TOY) else folder
        if folder is not None:
            check_model_source(folder, "--model")
        with loading(f"the {toy} model from {folder or 'the package'!r}"):
            self.model, self.processor = importlib.import_module(f"{TOYS[toy]}.model").load_toy(folder)
        self.model_name = f"{toy}:{folder}" if folder else toy
        self.label = f"{toy} (calibration seed {seed}, held-out seed {heldout_seed})"
        self.questions = {"calibration": self.module.ToyTask(seed).questions(calibration),
                          "heldout": self.module.ToyTask(heldout_seed).questions(heldout)}
        self.batches = {split: _batches(self.processor, qs, batch_size, prompt=self.module.prompt)
                        for split, qs in self.questions.items()}
        self.sizes = {split: len(qs) for split, qs in self.questions.items()}
        first = next(iter(self.batches["calibration"].values()))[0]
        self.n_visual = count_visual(self.model, first["input_ids"])

    def correct(self, recipe: dict | None, split: str) -> np.ndarray:
        from prunekit.toy.evaluate import _answers

        results = _answers(self.model, self.processor, self.batches[split], recipe)
        answers = [a for index in sorted(results) for a in results[index][0]]
        return np.array([a == q.answer for a, q in zip(answers, self.questions[split])])


def normalise(text: str) -> list[str]:
    """Lower-case words without surrounding punctuation."""
    return [w for w in (word.strip(string.punctuation) for word in text.lower().split()) if w]


def matches(answer: str, truth: str, mode: str) -> bool:
    """``exact``: the answer's first words are the truth's words (case and punctuation aside); ``contains``:
    the truth's words appear in order, side by side, in the answer."""
    said, want = normalise(answer), normalise(truth)
    if not want:
        return False
    if mode == "exact":
        return said[:len(want)] == want
    return any(said[i:i + len(want)] == want for i in range(len(said) - len(want) + 1))


class JsonlTask(Task):
    """Lines ``{"image": path, "question": str, "answer": str}``: the first ``calibration`` lines are the
    calibration split, the next ``heldout`` the held-out one. Image paths are relative to the file."""

    def __init__(self, path: str, model: str | None, calibration: int, heldout: int, match: str = "exact",
                 batch_size: int = 16, max_new_tokens: int = 1) -> None:
        if model is None:
            raise PrunekitError(f"task jsonl:{path} needs --model (a model folder, a hub id, or toy / toy:FOLDER)")
        if match not in ("exact", "contains"):
            raise PrunekitError(f"--match {match!r} is not valid; valid: 'contains', 'exact'")
        rows = read_jsonl(path)
        if len(rows) < calibration + heldout:
            raise PrunekitError(f"{path} has {len(rows)} questions; --calibration {calibration} and --heldout "
                                f"{heldout} need {calibration + heldout} (or lower them)")
        self.model, self.processor, self.prompt, self.model_name = load_model(model)
        self.match, self.batch_size, self.max_new_tokens = match, batch_size, max_new_tokens
        self.label = f"jsonl:{path} ({match} match)"
        self.rows = {"calibration": rows[:calibration], "heldout": rows[calibration:calibration + heldout]}
        self.sizes = {split: len(r) for split, r in self.rows.items()}
        self.batches = {split: self._batches(r) for split, r in self.rows.items()}
        self.n_visual = count_visual(self.model, self.batches["calibration"][0]["input_ids"])

    def _batches(self, rows: Sequence[dict]) -> list[dict]:
        from PIL import Image

        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            images = [Image.open(r["image"]).convert("RGB") for r in chunk]
            texts = [self.prompt(self.processor, r["question"]) for r in chunk]
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
            out.append({k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()})
        return out

    def correct(self, recipe: dict | None, split: str) -> np.ndarray:
        import prunekit

        answers: list[str] = []
        tokenizer = self.processor.tokenizer
        with (nullcontext() if recipe is None else prunekit.apply(self.model, recipe)), torch.no_grad():
            for batch in self.batches[split]:
                if self.max_new_tokens == 1:  # prunekit eval's one-word greedy answer
                    ids = self.model(**batch).logits[:, -1].argmax(-1)  # [batch]
                    answers += [tokenizer.decode([int(i)], skip_special_tokens=True) for i in ids]
                else:
                    length = batch["input_ids"].shape[1]
                    out = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=tokenizer.pad_token_id)
                    answers += tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
        return np.array([matches(a, r["answer"], self.match) for a, r in zip(answers, self.rows[split])])


def read_jsonl(path: str) -> list[dict]:
    """The checked lines of a JSONL task file (each error names the line)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise PrunekitError(f"task file {path!r} does not exist; give jsonl:PATH with lines "
                            f'{{"image": path, "question": str, "answer": str}}')
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise PrunekitError(f"{path}:{number} is not valid JSON ({exc})") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("image", "question", "answer")):
            raise PrunekitError(f"{path}:{number} must be an object with string keys 'image', 'question', 'answer'; "
                                f"got {line.strip()[:120]!r}")
        image = Path(row["image"]).expanduser()
        image = image if image.is_absolute() else file.parent / image
        if not image.is_file():
            raise PrunekitError(f"{path}:{number}: image {row['image']!r} does not exist (relative paths are "
                                f"relative to {str(file.parent)!r})")
        rows.append({**row, "image": str(image)})
    if not rows:
        raise PrunekitError(f"task file {path!r} has no questions")
    return rows


class LmmsTask(Task):
    """An lmms-eval task through prunekit's lmms-eval plugin: the calibration split is the task's first
    ``calibration`` documents, the held-out split the next ``heldout`` ones."""

    def __init__(self, name: str, model: str | None, calibration: int, heldout: int, include_path: str | None = None,
                 metric: str | None = None, batch_size: int = 8) -> None:
        try:
            from prunekit.integrations.lmms_eval import PrunekitLMM
        except PrunekitError as exc:  # the plugin names the extra to install
            raise PrunekitError(f"task lmms:{name}: {exc}") from None
        from lmms_eval.tasks import TaskManager

        self.name, self.metric = name, metric
        self.lm = PrunekitLMM(pretrained=model or TOY, recipe="none", batch_size=batch_size,
                              device="cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.model_name = self.lm.model, model or TOY
        # a local task needs no index of lmms-eval's hundreds of built-in ones (minutes to build)
        self.task_manager = TaskManager("WARNING", include_path=include_path, include_defaults=False) \
            if include_path else TaskManager("WARNING")
        if name not in self.task_manager.all_tasks:
            raise PrunekitError(f"lmms-eval knows no task {name!r}" + (f" in --include-path {include_path!r}"
                                                                       if include_path else "")
                                + "; list them with `lmms-eval --tasks list`")
        self.label = f"lmms:{name}"
        self.ranges = {"calibration": (0, calibration), "heldout": (calibration, heldout)}
        self.sizes = {"calibration": calibration, "heldout": heldout}
        self.n_visual = int(getattr(self.model.config, "image_seq_length", 0) or 0)  # 0: give --visual-tokens

    def correct(self, recipe: dict | None, split: str) -> np.ndarray:
        import logging

        import prunekit
        from lmms_eval.evaluator import simple_evaluate

        offset, limit = self.ranges[split]
        self.lm.model = self.model  # lmms-eval's end of run (clean()) takes the model off the plugin
        self.lm.pruner = None if recipe is None else prunekit.apply(self.model, recipe)
        try:
            logging.getLogger("lmms-eval").setLevel(logging.WARNING)
            results = simple_evaluate(model=self.lm, tasks=[self.name], limit=limit, offset=offset, log_samples=True,
                                      task_manager=self.task_manager, bootstrap_iters=0, verbosity="WARNING")
        finally:
            if self.lm.pruner is not None:
                self.lm.pruner.remove()  # safe twice: the plugin's clean() removes it too
            self.lm.pruner = None
            self.lm.model = self.model
        samples = sorted(results["samples"][self.name], key=lambda s: s["doc_id"])
        metric = self.metric or _first_metric(results["results"][self.name])
        if not samples or metric not in samples[0]:
            raise PrunekitError(f"lmms-eval task {self.name!r} has no per-sample metric {metric!r}; valid: "
                                f"{sorted(k for k in samples[0] if isinstance(samples[0][k], (int, float)))}"
                                if samples else f"lmms-eval task {self.name!r} returned no samples")
        return np.array([float(s[metric]) >= 0.5 for s in samples])


def _first_metric(results: dict) -> str:
    for key in results:
        if "," in key and "stderr" not in key:
            return key.split(",")[0]
    raise PrunekitError(f"no metric in lmms-eval's results {sorted(results)}")


def make_task(spec: str, model: str | None, calibration: int, heldout: int, seed: int = 0, heldout_seed: int = 1,
              match: str = "exact", include_path: str | None = None, metric: str | None = None,
              batch_size: int | None = None, max_new_tokens: int = 1) -> Task:
    """``toy``, ``toy-v2``, ``jsonl:PATH`` or ``lmms:TASK``."""
    kind, _, rest = spec.partition(":")
    if spec in TOYS:
        return ToyTask(model, calibration, heldout, seed, heldout_seed, batch_size or 50, toy=spec)
    if kind == "jsonl" and rest:
        return JsonlTask(rest, model, calibration, heldout, match, batch_size or 16, max_new_tokens)
    if kind == "lmms" and rest:
        return LmmsTask(rest, model, calibration, heldout, include_path, metric, batch_size or 8)
    raise PrunekitError(f"task {spec!r} is not valid; valid: toy, toy-v2, jsonl:PATH, lmms:TASK")

