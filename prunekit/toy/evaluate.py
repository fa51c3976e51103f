"""``prunekit eval``: accuracy, retention, FLOPs and relevance recall of recipes on the toy task."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

import prunekit
from prunekit.flops import DecoderDims, estimate, recipe_estimate
from prunekit.toy.task import GRID, Question, ToyTask, prompt

NO_PRUNING = "none"
DEFAULT_SWEEP = ("random", "fastv", "pdrop", "l2norm", "transprune-high")
DEFAULT_RATIOS = (0.5, 0.25, 0.125, 0.0625)


@dataclass
class EvalRow:
    recipe: str
    accuracy: float
    retention: float  # accuracy / accuracy without pruning
    flops_ratio: float  # analytic prefill FLOPs (papers' convention) / no pruning, on the toy model
    relevance_recall: float | None  # share of the question's relevant patches still kept at the last stage
    final_keep: float | None = None  # for sweep points: the last stage's keep fraction
    by_kind: dict[str, float] = field(default_factory=dict)


def _batches(processor, questions: Sequence[Question], batch_size: int, rank: int = 0,
             world: int = 1) -> dict[int, dict]:
    """Processed inputs of every ``world``-th batch from ``rank`` on, keyed by batch index; made once for all recipes.

    Whole batches per process keep the padding, hence the answers, identical to one process's.
    """
    starts = range(0, len(questions), batch_size)
    return {index: processor(images=[q.image for q in questions[start:start + batch_size]],
                             text=[prompt(q.question) for q in questions[start:start + batch_size]],
                             return_tensors="pt", padding=True)
            for index, start in enumerate(starts) if index % world == rank}


def _answers(model, processor, batches: dict[int, dict], recipe: str | dict | None,
             overrides) -> dict[int, tuple[list[str], list[set[int]]]]:
    """Per batch index: greedy one-word answers and, per question, the patches kept at the last stage."""
    results: dict[int, tuple[list[str], list[set[int]]]] = {}
    context = nullcontext() if recipe is None else prunekit.apply(model, recipe, overrides)
    with context as pruner, torch.no_grad():
        for index, batch in batches.items():
            ids = batch["input_ids"]  # [batch, seq]
            logits = model(**batch).logits[:, -1]  # [batch, vocab]
            answers = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
            if pruner is None:
                results[index] = (answers, [set(range(GRID * GRID)) for _ in answers])
                continue
            first_visual = (ids == model.config.image_token_id).long().argmax(dim=1)  # [batch]
            last = pruner.last_report.stages[-1].kept  # [batch, n] original positions, -1 pads
            kept = [set((last[row][last[row] >= 0] - first_visual[row]).tolist()) for row in range(len(answers))]
            results[index] = (answers, kept)
    return results


def _row(name: str, questions, answers, kept, base_accuracy: float | None, flops_ratio: float,
         final_keep: float | None = None) -> EvalRow:
    correct = [a == q.answer for a, q in zip(answers, questions)]
    accuracy = sum(correct) / len(questions)
    recalls = [len(k & set(q.relevant)) / len(q.relevant) for k, q in zip(kept, questions) if q.relevant]
    by_kind: dict[str, list[bool]] = {}
    for ok, q in zip(correct, questions):
        by_kind.setdefault(q.kind, []).append(ok)
    return EvalRow(
        recipe=name, accuracy=accuracy,
        retention=accuracy / base_accuracy if base_accuracy else 1.0,
        flops_ratio=flops_ratio,
        relevance_recall=sum(recalls) / len(recalls) if recalls else None,
        final_keep=final_keep,
        by_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    )


def _scaled_overrides(recipe: prunekit.Recipe, final_keep: float) -> list[str] | None:
    """Overrides that scale a recipe's keep fractions so its last stage keeps ``final_keep``."""
    if recipe.schedule is None or recipe.vision is not None:
        return None
    config = recipe.config.schedule
    if config.get("type") == "pyramid":
        return [f"schedule.ratio={final_keep ** (1 / len(config.layers))}"]
    stages = config.get("stages", [])
    if not stages or any(s.get("keep") is None for s in stages):
        return None
    factor = final_keep / stages[-1]["keep"]
    return [f"schedule.stages.{i}.keep={min(1.0, s['keep'] * factor)}" for i, s in enumerate(stages)]


def run_eval(model, processor, recipes: Sequence[str], n: int = 500, seed: int = 1234,
             sweep: Sequence[str] = DEFAULT_SWEEP, ratios: Sequence[float] = DEFAULT_RATIOS,
             batch_size: int = 50, progress: bool = True) -> dict[str, Any] | None:
    """Evaluate each recipe (and the keep-ratio sweep) on ``n`` seeded toy questions.

    Under ``torchrun`` / ``accelerate launch`` each process answers every ``world``-th batch and rank 0
    gathers the answers: it returns the result, the other ranks return None.
    """
    questions = ToyTask(seed).questions(n)
    dims = DecoderDims.from_config(model.config)
    n_text = 8  # the toy prompt's text tokens, roughly (for the whole-sequence ratio only)
    jobs: list[tuple[str, str | None, list[str] | None, float | None]] = [(NO_PRUNING, None, None, None)]
    jobs += [(name, name, None, None) for name in recipes if name != NO_PRUNING]
    for name in sweep:
        base = prunekit.load_recipe(name)
        for ratio in ratios:
            overrides = _scaled_overrides(base, ratio)
            if overrides is not None:
                jobs.append((f"{name}@{ratio:g}", name, overrides, ratio))
    rows, sweep_rows = [], []
    base_accuracy = None
    rank, world, started = _distributed()
    mine = _batches(processor, questions, batch_size, rank, world)  # this process's share of whole batches
    for label, recipe, overrides, ratio in tqdm(jobs, desc="prunekit eval", unit="recipe",
                                                disable=not progress or rank != 0):
        answers, kept = _gather(_answers(model, processor, mine, recipe, overrides), world)
        if recipe is None:
            flops = estimate([], dims, GRID * GRID, n_text).visual_ratio
        else:
            flops = recipe_estimate(prunekit.load_recipe(recipe, overrides), dims, GRID * GRID, n_text).visual_ratio
        row = _row(label, questions, answers, kept, base_accuracy, flops, ratio)
        if recipe is None:
            base_accuracy = row.accuracy
            row.retention = 1.0
        (sweep_rows if ratio is not None else rows).append(row)
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
    return {"questions": n, "seed": seed, "processes": world, "rows": rows, "sweep": sweep_rows} if rank == 0 else None


def _distributed() -> tuple[int, int, bool]:
    """(rank, world size, whether a process group was started here) under torchrun / accelerate launch.

    The group runs on gloo: it only gathers Python objects (the answers), whatever the device.
    """
    import os

    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, False
    dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _gather(results: dict[int, tuple[list[str], list[set[int]]]],
            world: int) -> tuple[list[str], list[set[int]]]:
    """Every process's answers and kept patches, in question order (batches are keyed by their index)."""
    if world > 1:
        import torch.distributed as dist

        shards: list[Any] = [None] * world
        dist.all_gather_object(shards, results)
        results = {index: value for shard in shards for index, value in shard.items()}
    ordered = [results[index] for index in sorted(results)]
    return [a for answers, _ in ordered for a in answers], [k for _, kept in ordered for k in kept]


def format_table(rows: Sequence[EvalRow]) -> str:
    header = ["recipe", "accuracy", "retention", "FLOPs x none", "relevance recall"]
    lines = [header] + [[
        r.recipe, f"{r.accuracy:.3f}", f"{r.retention:.3f}", f"{r.flops_ratio:.3f}",
        "-" if r.relevance_recall is None else f"{r.relevance_recall:.3f}",
    ] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({**result, "rows": [asdict(r) for r in result["rows"]],
                       "sweep": [asdict(r) for r in result["sweep"]]}, indent=2)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy against FLOPs ratio: one curve per swept recipe, a point per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    curves: dict[str, list[EvalRow]] = {}
    for row in result["sweep"]:
        curves.setdefault(row.recipe.split("@")[0], []).append(row)
    none = next(r for r in result["rows"] if r.recipe == NO_PRUNING)
    for name, points in curves.items():
        points = sorted(points, key=lambda r: r.flops_ratio)
        ax.plot([p.flops_ratio for p in points], [p.accuracy for p in points], marker="o", label=name)
    for row in result["rows"]:
        if row.recipe == NO_PRUNING:
            continue
        ax.scatter([row.flops_ratio], [row.accuracy], marker="x", color="black", s=20)
        ax.annotate(row.recipe, (row.flops_ratio, row.accuracy), fontsize=6, xytext=(2, 2),
                    textcoords="offset points")
    ax.axhline(none.accuracy, color="gray", linestyle="--", linewidth=1, label="no pruning")
    ax.set_xlabel("prefill FLOPs / no pruning (papers' convention)")
    ax.set_ylabel(f"accuracy ({result['questions']} toy questions)")
    ax.set_title("prunekit eval: accuracy against FLOPs")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
