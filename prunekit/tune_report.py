"""What ``prunekit tune`` reports: the held-out check, the best recipe as YAML, tables, a PNG and JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from prunekit.toy import stats


@dataclass
class HeldoutRow:
    label: str  # "tuned", the base recipe's name, "<base>@<budget>" (its schedule scaled), "none"
    accuracy: float
    interval: tuple[float, float]  # 95% bootstrap
    flops_ratio: float
    note: str = ""


def heldout_check(space: Any, task: Any, best: Any, seed: int = 0) -> dict[str, Any]:
    """Re-score the best recipe on the held-out split, with the base recipe, the base recipe's own
    schedule scaled to the budget and no pruning, each with a 95% bootstrap interval; paired
    comparisons of the tuned recipe with the two base rows."""
    base = space.recipe.name
    from prunekit.tune_storage import recipe_of

    jobs: list[tuple[str, dict | None, str]] = [("tuned", recipe_of(best), "")]
    jobs.append((base, space.config, "the base recipe as published"))
    scaled = space.scaled_base()
    if scaled is not None and _tokens(space, scaled) != _tokens(space, space.config):  # else: the base row again
        jobs.append((scaled["name"], scaled, f"{base}'s stages, keeps scaled to the budget"))
    jobs.append(("none", None, "no pruning"))
    rows, correct = [], {}
    for label, config, note in jobs:
        ratio = 1.0
        if config is not None:
            try:
                _, ratio = space.check(config)
            except ValueError as exc:  # the base recipe may not fit the model
                rows.append(HeldoutRow(label, float("nan"), (float("nan"), float("nan")), float("nan"),
                                       f"does not run on {task.model_name}: {exc}"))
                continue
        right = task.correct(config, "heldout")
        correct[label] = right
        rows.append(HeldoutRow(label, float(right.mean()), stats.accuracy_interval(right, seed), ratio, note))
    comparisons = [stats.compare("tuned", correct["tuned"], label, correct[label], seed)
                   for label in correct if label not in ("tuned", "none")]
    return {"questions": task.sizes["heldout"], "rows": rows, "comparisons": comparisons}


def _tokens(space: Any, config: dict) -> list[int] | None:
    """Visual tokens per decoder layer under a recipe (None where it does not load)."""
    import prunekit
    from prunekit.flops import recipe_estimate

    try:
        return recipe_estimate(prunekit.load_recipe(config), space.dims, space.n_visual).visual_tokens
    except ValueError:
        return None


def schedule_text(config: Mapping[str, Any]) -> str:
    """``7:0.875 9:0.625 12:0.125`` (layer:keep per stage) or the schedule's own parameters."""
    schedule = config.get("schedule") or {}
    if schedule.get("type") == "stages":
        return " ".join(f"{s['layer']}:{s['keep'] if s.get('keep') is not None else s.get('count')}"
                        for s in schedule.get("stages", []))
    return ", ".join(f"{k}={v}" for k, v in schedule.items() if k != "type")


def params_text(trial: Any) -> str:
    """The trial's non-schedule parameters, e.g. ``alpha(ttv)=0.62 first_layer=4``."""
    parts = []
    for name, value in sorted(trial.params.items()):
        if name.startswith("schedule."):
            continue
        short = name.split(".")[-1]
        if ".weights." in name:
            short = f"w({short})"
        parts.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(parts)


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """The points no other point beats on both accuracy (higher) and FLOPs (lower), by FLOPs."""
    front = [p for p in points if not any(q["accuracy"] >= p["accuracy"] and q["flops_ratio"] <= p["flops_ratio"]
                                          and (q["accuracy"], -q["flops_ratio"]) != (p["accuracy"], -p["flops_ratio"])
                                          for q in points)]
    unique: dict[tuple[float, float], dict] = {}
    for p in sorted(front, key=lambda p: (p["flops_ratio"], p["trial"])):
        unique.setdefault((p["accuracy"], p["flops_ratio"]), p)
    return list(unique.values())


def summarise(config: Any, space: Any, task: Any, study: Any, best: Any, heldout: dict | None) -> dict[str, Any]:
    import optuna

    from prunekit.tune_storage import accuracy, flops_ratio, recipe_of, shown_url

    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    points = [{"trial": t.number, "accuracy": accuracy(t), "flops_ratio": flops_ratio(t),
               "schedule": schedule_text(recipe_of(t)), "params": params_text(t),
               "copy_of": t.user_attrs["scored"].get("copy_of")}
              for t in trials if t.state == state.COMPLETE]
    over = [{"trial": t.number, "flops_ratio": (t.user_attrs.get("candidate") or {}).get("flops_ratio"),
             "reason": t.user_attrs.get("feasible")} for t in trials if t.state == state.PRUNED]
    recipe = dict(recipe_of(best))
    recipe["description"] = (f"tuned by prunekit tune from {space.recipe.name} for {task.model_name} under a FLOPs "
                             f"budget of {config.budget:g}: stages {schedule_text(recipe)}")
    return {
        "study": study.study_name, "storage": shown_url(config.storage), "sampler": config.sampler,
        "pareto_objective": config.pareto, "base": space.recipe.name, "model": task.model_name, "task": task.label,
        "layers": space.dims.num_layers, "visual_tokens": space.n_visual, "budget": config.budget,
        "base_flops_ratio": space.base_ratio, "min_flops_ratio": space.min_ratio, "space": space.describe(),
        "calibration_questions": task.sizes["calibration"],
        "trials": {"complete": len(points), "pruned": len(over),
                   "failed": sum(t.state == state.FAIL for t in trials),
                   "running": sum(t.state == state.RUNNING for t in trials)},
        "points": points, "pruned": over, "front": pareto_front(points),
        "best": {"trial": best.number, "accuracy": accuracy(best),
                 "flops_ratio": flops_ratio(best), "schedule": schedule_text(recipe),
                 "params": params_text(best), "recipe": recipe},
        "heldout": heldout,
    }


def _clean(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe without top-level keys left at None and stage keys left at None (their defaults)."""
    out = {k: v for k, v in recipe.items() if v is not None}
    schedule = out.get("schedule")
    if isinstance(schedule, dict) and isinstance(schedule.get("stages"), list):
        out["schedule"] = {**schedule, "stages": [{k: v for k, v in s.items() if v is not None}
                                                  if isinstance(s, dict) else s for s in schedule["stages"]]}
    return out


def header(result: Mapping[str, Any]) -> list[str]:
    best = result["best"]
    lines = [
        f"Tuned by `prunekit tune` from {result['base']}: study {result['study']!r} in {result['storage']} "
        f"({result['trials']['complete']} trials, sampler {result['sampler']}{', multi-objective' if result['pareto_objective'] else ''})",
        f"model {result['model']} ({result['layers']} decoder layers, {result['visual_tokens']} visual tokens); "
        f"task {result['task']}",
        f"budget: FLOPs ratio <= {result['budget']:g} (papers' convention); this recipe: {best['flops_ratio']:.4f}; "
        f"{result['base']}: {result['base_flops_ratio']:.4f}",
        f"calibration accuracy: {best['accuracy']:.4f} ({result['calibration_questions']} questions, trial {best['trial']})",
    ]
    heldout = result.get("heldout")
    if heldout:
        for row in heldout["rows"]:
            if row.label == "tuned":
                lines.append(f"held-out accuracy: {row.accuracy:.4f} [{row.interval[0]:.4f}, {row.interval[1]:.4f}] "
                             f"(95% bootstrap interval, {heldout['questions']} questions the study never saw)")
            elif row.accuracy == row.accuracy:  # not NaN
                lines.append(f"  {row.label}: {row.accuracy:.4f} [{row.interval[0]:.4f}, {row.interval[1]:.4f}] "
                             f"at FLOPs ratio {row.flops_ratio:.4f}")
        for c in heldout["comparisons"]:
            lines.append(f"  tuned - {c.b}: {c.difference:+.4f} [{c.interval[0]:+.4f}, {c.interval[1]:+.4f}] "
                         f"(paired bootstrap), McNemar p {c.p_value:.2g}: {c.verdict}")
    else:
        lines.append("held-out accuracy: not measured (--heldout 0)")
    return lines


def recipe_text(result: Mapping[str, Any]) -> str:
    """The best recipe as YAML with the comment header."""
    body = yaml.safe_dump(_clean(result["best"]["recipe"]), sort_keys=False, default_flow_style=None, width=110)
    return "".join(f"# {line}\n" for line in header(result)) + body


def write_recipe(result: Mapping[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.write(recipe_text(result))


def _markdown(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def points_table(points: Sequence[dict], front: Sequence[dict] = ()) -> str:
    on_front = {p["trial"] for p in front}
    lines = [["trial", "calibration acc.", "FLOPs ratio", "stages (layer:keep)", "parameters", "front"]]
    lines += [[str(p["trial"]), f"{p['accuracy']:.4f}", f"{p['flops_ratio']:.4f}", p["schedule"], p["params"] or "-",
               "*" if p["trial"] in on_front else ""] for p in points]
    return _markdown(lines)


def format_report(result: Mapping[str, Any]) -> str:
    t = result["trials"]
    out = [f"study {result['study']!r} ({result['storage']}): {t['complete']} trials scored, {t['pruned']} "
           f"candidates pruned (over budget {result['budget']:g} or not runnable) on {result['model']}",
           "search space: " + "; ".join(result["space"]), "",
           "Pareto front (calibration accuracy against FLOPs):", points_table(result["front"], result["front"]), "",
           "best calibration accuracies:",
           points_table(sorted(result["points"], key=lambda p: (-p["accuracy"], p["flops_ratio"]))[:10], result["front"]),
           ""]
    heldout = result.get("heldout")
    if heldout:
        rows = [["recipe", f"held-out accuracy [95% CI] ({heldout['questions']} q.)", "FLOPs ratio", "note"]]
        rows += [[r.label, f"{r.accuracy:.4f} [{r.interval[0]:.4f}, {r.interval[1]:.4f}]", f"{r.flops_ratio:.4f}",
                  r.note] for r in heldout["rows"]]
        out += ["held-out check:", _markdown(rows), ""]
        rows = [["a", "b", "a - b [95% CI]", "only a / only b right", "McNemar p", "verdict"]]
        rows += [[c.a, c.b, f"{c.difference:+.4f} [{c.interval[0]:+.4f}, {c.interval[1]:+.4f}]",
                  f"{c.a_only} / {c.b_only}", f"{c.p_value:.2g}", c.verdict] for c in heldout["comparisons"]]
        out += [_markdown(rows), ""]
    if result.get("out"):
        out.append(f"best recipe: {result['out']} (trial {result['best']['trial']}, stages "
                   f"{result['best']['schedule']})")
    if result.get("plot"):
        out.append(f"plot: {result['plot']}")
    return "\n".join(out)


def to_json(result: Mapping[str, Any]) -> str:
    data = dict(result)
    heldout = data.get("heldout")
    if heldout:
        data["heldout"] = {**heldout, "rows": [asdict(r) for r in heldout["rows"]],
                           "comparisons": [{**asdict(c), "verdict": c.verdict} for c in heldout["comparisons"]]}
    return json.dumps(data, indent=2, default=lambda o: None if isinstance(o, float) and o != o else str(o))


def plot_study(result: Mapping[str, Any], path: str) -> None:
    """Explored points (calibration accuracy against FLOPs), the Pareto front, the budget, the best point
    and the held-out figures with their intervals; pruned over-budget candidates as ticks along the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    points = result["points"]
    ax.scatter([p["flops_ratio"] for p in points], [p["accuracy"] for p in points], s=14, alpha=0.6,
               label=f"explored ({len(points)} trials, calibration)")
    front = result["front"]
    if front:
        xs = [p["flops_ratio"] for p in front]
        ys = [p["accuracy"] for p in front]
        ax.step(xs, ys, where="post", color="tab:orange", linewidth=1.5, label="Pareto front")
    over = [p["flops_ratio"] for p in result["pruned"] if p["flops_ratio"] is not None]
    low = min([p["accuracy"] for p in points] + [0.0])
    if over:
        ax.scatter(over, [low] * len(over), marker="|", color="gray", alpha=0.4, label="pruned (over budget)")
    ax.axvline(result["budget"], color="red", linestyle="--", linewidth=1, label=f"budget {result['budget']:g}")
    best = result["best"]
    ax.scatter([best["flops_ratio"]], [best["accuracy"]], marker="*", s=160, color="tab:green", zorder=5,
               label=f"best (trial {best['trial']})")
    heldout = result.get("heldout")
    if heldout:
        for row, marker in zip([r for r in heldout["rows"] if r.accuracy == r.accuracy], "Dsv^"):
            ax.errorbar([row.flops_ratio], [row.accuracy], yerr=[[row.accuracy - row.interval[0]],
                                                                [row.interval[1] - row.accuracy]],
                        marker=marker, color="black", markersize=5, capsize=2, linestyle="none")
            ax.annotate(f"{row.label} (held-out)", (row.flops_ratio, row.accuracy), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("prefill FLOPs / no pruning (papers' convention)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"prunekit tune: {result['base']} on {result['model']}, study {result['study']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["HeldoutRow", "format_report", "heldout_check", "pareto_front", "plot_study", "recipe_text",
           "summarise", "to_json", "write_recipe"]
