"""``prunekit run``: answer one question about one image with and without pruning, and show what was kept."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

import prunekit
from prunekit.flops import DecoderDims, recipe_estimate


@dataclass
class RunResult:
    question: str
    truth: str | None
    answer: str
    pruned_answer: str
    report: Any  # PruneReport
    flops_ratio: float
    relevance_recall: float | None
    visual_tokens: int
    figure: str | None


def _grid(n: int) -> int | None:
    side = int(math.isqrt(n))
    return side if side * side == n else None


def overlay(image: Image.Image, report: Any, first_visual: int, n_visual: int, path: str | Path,
            title: str = "") -> str | None:
    """A PNG with the image and, per stage, the kept visual tokens bright and the dropped ones dimmed."""
    side = _grid(n_visual)
    if side is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = list(report.stages)
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(3 * (len(stages) + 1), 3.3))
    axes = np.atleast_1d(axes)
    shown = np.asarray(image.convert("RGB").resize((side * 16, side * 16), Image.NEAREST), dtype=float) / 255
    axes[0].imshow(shown)
    axes[0].set_title("input", fontsize=9)
    for ax, stage in zip(axes[1:], stages):
        kept = stage.kept[0][stage.kept[0] >= 0] - first_visual
        mask = np.zeros(side * side, dtype=bool)
        mask[kept[(kept >= 0) & (kept < side * side)].numpy()] = True
        cell = np.kron(mask.reshape(side, side), np.ones((16, 16)))[..., None]
        ax.imshow(shown * (0.15 + 0.85 * cell))
        where = "before the LLM" if stage.where == "vision" else f"from layer {stage.layer}"
        merged = int(stage.merged_counts[0])
        extra = f" + {merged} merged" if merged else ""
        ax.set_title(f"{where}: {int(stage.kept_counts[0])}/{n_visual} kept{extra}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def run_toy(recipe: str, overrides=None, seed: int = 0, out: str | Path = "prunekit_run.png",
            toy: str | None = None) -> RunResult:
    """The built-in default: the trained toy LLaVA (``toy``: a name of :data:`prunekit.toy.TOYS`) and a
    generated question."""
    from prunekit.toy import toy_parts
    from prunekit.toy.oracle import ground_truth

    task, toy_model = toy_parts(toy)
    GRID = task.GRID
    model, processor = toy_model.load_toy()
    question = task.ToyTask(seed).question()
    inputs = processor(images=[question.image], text=[task.prompt(question.question)], return_tensors="pt")
    with torch.no_grad():
        answer = processor.tokenizer.convert_ids_to_tokens(int(model(**inputs).logits[0, -1].argmax()))
        with prunekit.apply(model, recipe, overrides) as pruner, ground_truth([question.relevant]):  # oracle only
            pruned = processor.tokenizer.convert_ids_to_tokens(int(model(**inputs).logits[0, -1].argmax()))
    report = pruner.last_report
    first_visual = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    kept = report.stages[-1].kept[0]
    kept = set((kept[kept >= 0] - first_visual).tolist())
    recall = len(kept & set(question.relevant)) / len(question.relevant) if question.relevant else None
    dims = DecoderDims.from_config(model.config)
    flops = recipe_estimate(pruner.recipe, dims, GRID * GRID).visual_ratio
    title = f"{question.question} (truth: {question.answer}) | none: {answer} | {recipe}: {pruned}"
    figure = overlay(question.image, report, first_visual, GRID * GRID, out, title)
    return RunResult(question.question, question.answer, answer, pruned, report, flops, recall, GRID * GRID, figure)


def chat_prompt(processor, text: str, n_images: int = 1) -> str:
    """``text`` after ``n_images`` images in the processor's chat template (image tokens first where it has none)."""
    if not getattr(processor, "chat_template", None):
        token = getattr(processor, "image_token", None)
        return text if n_images == 0 or token is None or token in text else f"{token * n_images}\n{text}"
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def run_model(model_id: str, image_path: str, prompt_text: str, recipe: str, overrides=None,
              max_new_tokens: int = 32, out: str | Path = "prunekit_run.png") -> RunResult:
    """A real checkpoint (a folder or hub id) with its processor and chat template."""
    from PIL import UnidentifiedImageError
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from prunekit.errors import PrunekitError
    from prunekit.loading import load_pretrained

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = load_pretrained(AutoModelForImageTextToText, model_id).eval()
    except (OSError, ValueError, KeyError) as exc:  # no weights, a broken file, an unknown architecture, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PrunekitError(f"cannot load the model {model_id!r}: {first}") from exc
    try:
        image = Image.open(image_path).convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise PrunekitError(f"cannot read the image {str(image_path)!r}: {exc}") from exc
    inputs = processor(images=[image], text=[chat_prompt(processor, prompt_text)], return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        with prunekit.apply(model, recipe, overrides) as pruner:
            pruned = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    decode = processor.batch_decode
    report = pruner.last_report
    visual_ids = torch.isin(inputs["input_ids"][0], torch.tensor(
        [getattr(model.config, k) for k in ("image_token_id", "video_token_id")
         if getattr(model.config, k, None) is not None]))
    first_visual = int(visual_ids.nonzero()[0])
    n_visual = int(report.visual_tokens[0])
    dims = DecoderDims.from_config(model.config)
    text_tokens = length - n_visual
    flops = recipe_estimate(pruner.recipe, dims, n_visual, text_tokens).visual_ratio
    figure = overlay(image, report, first_visual, n_visual, out, prompt_text)
    return RunResult(prompt_text, None, decode(plain[:, length:], skip_special_tokens=True)[0].strip(),
                     decode(pruned[:, length:], skip_special_tokens=True)[0].strip(), report, flops, None,
                     n_visual, figure)


def describe(result: RunResult, recipe: str) -> str:
    lines = [f"question: {result.question}"]
    if result.truth is not None:
        lines.append(f"truth: {result.truth}")
    lines.append(f"answer without pruning: {result.answer}")
    lines.append(f"answer with {recipe}: {result.pruned_answer}")
    for stage in result.report.stages:
        where = "before the language model" if stage.where == "vision" else f"from decoder layer {stage.layer}"
        merged = int(stage.merged_counts[0])
        lines.append(f"  {where}: {int(stage.kept_counts[0])} of {result.visual_tokens} visual tokens kept"
                     + (f" (+{merged} merged)" if merged else ""))
    lines.append(f"prefill FLOPs: {result.flops_ratio:.3f} x no pruning (papers' convention)")
    if result.relevance_recall is not None:
        lines.append(f"relevance recall: {result.relevance_recall:.2f} of the patches covering the asked object kept")
    if result.figure:
        lines.append(f"kept tokens drawn in {result.figure}")
    return "\n".join(lines)
