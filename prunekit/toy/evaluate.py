"""``prunekit eval``: accuracy, retention, FLOPs and relevance recall of recipes on the toy task."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

import prunekit
from prunekit.errors import PrunekitError
from prunekit.flops import DecoderDims, estimate, measured_estimate, recipe_estimate
from prunekit.toy import stats
from prunekit.toy.oracle import ground_truth
from prunekit.toy import task as default_task
from prunekit.toy.task import Question

NO_PRUNING = "none"
DEFAULT_SWEEP = ("random", "fastv", "pdrop", "l2norm", "transprune-high", "oracle")
DEFAULT_RATIOS = (0.5, 0.25, 0.125, 0.0625)
SWEEP_SHAPE = "transprune-high"  # every sweep point uses this recipe's schedule, scaled: equal FLOPs per point


@dataclass
class EvalRow:
    recipe: str
    accuracy: float
    accuracy_interval: tuple[float, float]  # 95% bootstrap interval
    retention: float  # accuracy / accuracy without pruning
    retention_interval: tuple[float, float]  # 95% bootstrap interval (paired with no pruning)
    flops_ratio: float  # analytic prefill FLOPs (papers' convention) / no pruning, on the toy model
    relevance_recall: float | None  # share of the question's relevant patches still kept at the last stage
    final_keep: float | None = None  # for sweep points: the last stage's keep fraction
    by_kind: dict[str, float] = field(default_factory=dict)


def split_names(names: Sequence[str] | None) -> list[str] | None:
    """Recipe names given as ``a b``, ``a,b`` (lmms-eval's ``--tasks`` form) or both."""
    if names is None:
        return None
    return [part for name in names for part in str(name).split(",") if part]


def _batches(processor, questions: Sequence[Question], batch_size: int, rank: int = 0, world: int = 1,
             prompt=default_task.prompt) -> dict[int, tuple[dict, list[list[int]]]]:
    """Per batch index: processed inputs and each question's relevant patches, for every ``world``-th batch.

    Made once for all recipes. Whole batches per process keep the padding, hence the answers,
    identical to one process's.
    """
    starts = range(0, len(questions), batch_size)
    return {index: (processor(images=[q.image for q in questions[start:start + batch_size]],
                              text=[prompt(q.question) for q in questions[start:start + batch_size]],
                              return_tensors="pt", padding=True),
                    [q.relevant for q in questions[start:start + batch_size]])
            for index, start in enumerate(starts) if index % world == rank}


def _answers(model, processor, batches: dict[int, tuple[dict, list[list[int]]]],
             recipe: str | dict | None) -> dict[int, tuple[list[str], list[set[int]], list[list[int]]]]:
    """Per batch index: greedy one-word answers and, per question, the patches kept at the last stage and the
    visual tokens each decoder layer ran on."""
    results: dict[int, tuple[list[str], list[set[int]], list[list[int]]]] = {}
    context = nullcontext() if recipe is None else prunekit.apply(model, recipe)
    with context as pruner, torch.no_grad():
        for index, (batch, relevant) in batches.items():
            ids = batch["input_ids"]  # [batch, seq]
            with ground_truth(relevant):  # read by the oracle criterion only
                logits = model(**batch).logits[:, -1]  # [batch, vocab]
            answers = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
            if pruner is None:
                results[index] = (answers, [set(range(int((ids[row] == model.config.image_token_id).sum())))
                                            for row in range(len(answers))], [])
                continue
            first_visual = (ids == model.config.image_token_id).long().argmax(dim=1)  # [batch]
            last = pruner.last_report.stages[-1].kept  # [batch, n] original positions, -1 pads
            kept = [set((last[row][last[row] >= 0] - first_visual[row]).tolist()) for row in range(len(answers))]
            results[index] = (answers, kept, pruner.last_report.visual_tokens_per_layer.tolist())
    return results


def _row(name: str, questions, answers, kept, base_correct: np.ndarray | None, flops_ratio: float,
         final_keep: float | None = None, seed: int = 0) -> tuple[EvalRow, np.ndarray]:
    """The row of one recipe and its per-question correctness (``[n]`` bool)."""
    correct = np.array([a == q.answer for a, q in zip(answers, questions)])
    reference = correct if base_correct is None else base_correct
    recalls = [len(k & set(q.relevant)) / len(q.relevant) for k, q in zip(kept, questions) if q.relevant]
    by_kind: dict[str, list[bool]] = {}
    for ok, q in zip(correct.tolist(), questions):
        by_kind.setdefault(q.kind, []).append(ok)
    base_accuracy = float(reference.mean())
    row = EvalRow(
        recipe=name, accuracy=float(correct.mean()), accuracy_interval=stats.accuracy_interval(correct, seed),
        retention=float(correct.mean()) / base_accuracy if base_accuracy else 1.0,
        retention_interval=stats.retention_interval(correct, reference, seed),
        flops_ratio=flops_ratio,
        relevance_recall=sum(recalls) / len(recalls) if recalls else None,
        final_keep=final_keep,
        by_kind={k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
    )
    return row, correct


def _check_fraction(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and 0 < ratio <= 1):
        raise PrunekitError(f"sweep ratio {ratio!r} is not a keep fraction; valid: (0, 1]")
    return float(ratio)


def sweep_recipe(name: str, final_keep: float, num_layers: int, shape: str = SWEEP_SHAPE) -> dict:
    """Recipe ``name``'s criteria and combiner on ``shape``'s schedule, scaled so its last stage keeps ``final_keep``.

    Every recipe of one sweep point then prunes the same number of tokens at the same layers: equal
    FLOPs, so the points compare criteria alone.
    """
    _check_fraction(final_keep)
    base = prunekit.load_recipe(name)
    if base.vision is not None or base.schedule is None:
        raise PrunekitError(f"recipe {base.name!r} prunes before the language model (a 'vision' block); the sweep "
                            "scales decoder stages only: compare it in the table (--recipes) instead")
    stages = [s for s in prunekit.load_recipe(shape).schedule.resolve(num_layers) if s.keep is not None]  # keep fractions
    if not stages:
        raise PrunekitError(f"sweep shape {shape!r} has no stage with a keep fraction")
    factor = final_keep / stages[-1].keep
    config = OmegaConf.to_container(base.config, resolve=True)
    config["schedule"] = {"type": "stages", "stages": [{"layer": s.layer, "keep": min(1.0, s.keep * factor)}
                                                       for s in stages]}
    config["reference_depth"] = prunekit.load_recipe(shape).config.get("reference_depth")
    config["name"] = f"{base.name}@{final_keep:g}"
    return config


def run_eval(model, processor, recipes: Sequence[str], n: int = 500, seed: int = 1234,
             sweep: Sequence[str] = DEFAULT_SWEEP, ratios: Sequence[float] = DEFAULT_RATIOS,
             batch_size: int = 50, progress: bool = True, task=None) -> dict[str, Any] | None:
    """Evaluate each recipe (and the keep-ratio sweep) on ``n`` seeded toy questions.

    Every figure carries a 95% bootstrap interval; at each sweep point (equal FLOPs) every pair of
    swept recipes gets a paired comparison (:mod:`prunekit.toy.stats`). Under ``torchrun`` /
    ``accelerate launch`` each process answers every ``world``-th batch and rank 0 gathers the
    answers: it returns the result, the other ranks return None. ``task`` is the toy task's module
    (default: the default toy's, ``prunekit.toy.v2.task``; ``prunekit.toy.task`` for the question-first toy).
    """
    if task is None:
        from prunekit.toy import toy_parts

        task = toy_parts()[0]
    if n < 1:
        raise PrunekitError(f"-n must be a positive number of questions, got {n}")
    if batch_size < 1:
        raise PrunekitError(f"batch size must be a positive number of questions, got {batch_size}")
    ratios = [_check_fraction(r) for r in ratios]
    questions = task.ToyTask(seed).questions(n)
    n_visual = task.GRID * task.GRID
    dims = DecoderDims.from_config(model.config)
    n_text = 16  # the toy prompt's text tokens, roughly (for the whole-sequence ratio only)
    # (label, recipe source, sweep keep) for every configuration; built and validated before any forward
    jobs: list[tuple[str, str | dict | None, float | None]] = [(NO_PRUNING, None, None)]
    for name in split_names(recipes) or []:
        if name != NO_PRUNING:
            jobs.append((prunekit.load_recipe(name).name, name, None))
    for name in split_names(sweep) or []:
        jobs += [(f"{prunekit.load_recipe(name).name}@{ratio:g}", sweep_recipe(name, ratio, dims.num_layers), ratio) for ratio in ratios]
    rows, sweep_rows = [], []
    correct_by_label: dict[str, np.ndarray] = {}
    base_correct = None
    rank, world, started = _distributed()
    mine = _batches(processor, questions, batch_size, rank, world, task.prompt)  # this process's share of whole batches
    for label, recipe, ratio in tqdm(jobs, desc="prunekit eval", unit="recipe", disable=not progress or rank != 0):
        answers, kept, per_layer = _gather(_answers(model, processor, mine, recipe), world)
        if recipe is None:
            flops = estimate([], dims, n_visual, n_text).visual_ratio
        else:
            analytic = recipe_estimate(prunekit.load_recipe(recipe), dims, n_visual, n_text)
            flops = analytic.visual_ratio
            if analytic.bound:  # counts that depend on the input: the FLOPs of the layers' measured mean counts
                flops = measured_estimate(np.mean(per_layer, axis=0).tolist(), dims, n_visual, n_text).visual_ratio
        row, correct = _row(label, questions, answers, kept, base_correct, flops, ratio, seed)
        if recipe is None:
            base_correct = correct
        correct_by_label[label] = correct
        (sweep_rows if ratio is not None else rows).append(row)
    if started:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return None
    comparisons = []
    for ratio in ratios:  # equal FLOPs within a point: compare every pair of swept recipes
        point = [r.recipe for r in sweep_rows if r.final_keep == ratio]
        comparisons += [stats.compare(a, correct_by_label[a], b, correct_by_label[b], seed)
                        for i, a in enumerate(point) for b in point[i + 1:]]
    return {"questions": n, "seed": seed, "processes": world, "sweep_shape": SWEEP_SHAPE, "rows": rows,
            "sweep": sweep_rows, "comparisons": comparisons}


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


def _gather(results: dict[int, tuple[list[str], list[set[int]], list[list[int]]]],
            world: int) -> tuple[list[str], list[set[int]], list[list[int]]]:
    """Every process's answers, kept patches and per-layer visual tokens, in question order (batches are keyed by
    their index)."""
    if world > 1:
        import torch.distributed as dist

        shards: list[Any] = [None] * world
        dist.all_gather_object(shards, results)
        results = {index: value for shard in shards for index, value in shard.items()}
    ordered = [results[index] for index in sorted(results)]
    return ([a for answers, _, _ in ordered for a in answers], [k for _, kept, _ in ordered for k in kept],
            [c for _, _, counts in ordered for c in counts])


def format_table(rows: Sequence[EvalRow]) -> str:
    """A markdown table: accuracy and retention with their 95% intervals, FLOPs ratio, relevance recall."""
    header = ["recipe", "accuracy [95% CI]", "retention [95% CI]", "FLOPs x none", "relevance recall"]
    lines = [header] + [[
        r.recipe, f"{r.accuracy:.3f} [{r.accuracy_interval[0]:.3f}, {r.accuracy_interval[1]:.3f}]",
        f"{r.retention:.3f} [{r.retention_interval[0]:.3f}, {r.retention_interval[1]:.3f}]", f"{r.flops_ratio:.3f}",
        "-" if r.relevance_recall is None else f"{r.relevance_recall:.3f}",
    ] for r in rows]
    return _markdown(lines)


def format_comparisons(comparisons: Sequence[stats.PairedComparison]) -> str:
    """A markdown table of paired comparisons: difference, its interval, McNemar's p, the verdict."""
    lines = [["a", "b", "accuracy a - b [95% CI]", "only a / only b right", "McNemar p", "verdict"]] + [[
        c.a, c.b, f"{c.difference:+.3f} [{c.interval[0]:+.3f}, {c.interval[1]:+.3f}]", f"{c.a_only} / {c.b_only}",
        f"{c.p_value:.2g}", c.verdict,
    ] for c in comparisons]
    return _markdown(lines)


def _markdown(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({**result, "rows": [asdict(r) for r in result["rows"]],
                       "sweep": [asdict(r) for r in result["sweep"]],
                       "comparisons": [{**asdict(c), "verdict": c.verdict} for c in result["comparisons"]]},
                      indent=2)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy (95% intervals) against FLOPs ratio: one curve per swept recipe, a cross per table recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    curves: dict[str, list[EvalRow]] = {}
    for row in result["sweep"]:
        curves.setdefault(row.recipe.split("@")[0], []).append(row)
    none = next(r for r in result["rows"] if r.recipe == NO_PRUNING)
    for offset, (name, points) in enumerate(curves.items()):
        points = sorted(points, key=lambda r: r.flops_ratio)
        x = [p.flops_ratio + 0.002 * (offset - len(curves) / 2) for p in points]  # equal FLOPs: spread a little
        y = [p.accuracy for p in points]
        error = [[p.accuracy - p.accuracy_interval[0] for p in points], [p.accuracy_interval[1] - p.accuracy for p in points]]
        ax.errorbar(x, y, yerr=error, marker="o", markersize=4, capsize=2, linewidth=1, label=name)
    for row in result["rows"]:
        if row.recipe == NO_PRUNING:
            continue
        ax.scatter([row.flops_ratio], [row.accuracy], marker="x", color="black", s=20)
        ax.annotate(row.recipe, (row.flops_ratio, row.accuracy), fontsize=6, xytext=(2, 2),
                    textcoords="offset points")
    ax.axhline(none.accuracy, color="gray", linestyle="--", linewidth=1, label="no pruning")
    ax.set_xlabel("prefill FLOPs / no pruning (papers' convention)")
    ax.set_ylabel(f"accuracy ({result['questions']} toy questions)")
    ax.set_title(f"prunekit eval: accuracy against FLOPs (curves on {result['sweep_shape']}'s schedule)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
