"""``prunekit tune``: search a base recipe's schedule and parameters for a model under a FLOPs budget.

    prunekit tune --recipe transprune-high --budget 0.45 --trials 60 --storage sqlite:///study.db

An Optuna study (TPE; ``--pareto``: accuracy against FLOPs, multi-objective) samples candidates
from the search space the recipe's plugins declare (:mod:`prunekit.tune_space`). Each candidate is
checked against the model and rated by the analytic FLOPs model before any forward: one over the
budget, or one the model cannot run, ends as a *pruned* trial and does not count. The others are
scored on the task's calibration split (:mod:`prunekit.tune_tasks`). The study lives in an Optuna
storage (SQLite file by default): a crashed run resumes where it stopped, and workers that run the
same command share one study. The best recipe is re-scored on held-out questions against the base
recipe and the base recipe's own schedule scaled to the budget (:mod:`prunekit.tune_report`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.tune_space import Space, check_budget
from prunekit.tune_storage import (  # noqa: F401 (re-exported)
    HEARTBEAT,
    INSTALL_HINT,
    accuracy,
    flops_ratio,
    open_storage,
    recipe_of,
    require_optuna,
    shown_url,
)

DEFAULT_STORAGE = "sqlite:///prunekit-tune.db"
WORKER = f"{socket.gethostname()}:{os.getpid()}"  # which worker sampled a trial (in its user attributes)
CLAIM_WAIT = 60.0  # seconds a trial waits for earlier trials to say whether they fit the budget


# ---- the study --------------------------------------------------------------------------------
@dataclass
class TuneConfig:
    recipe: str
    budget: float
    trials: int = 40
    pareto: bool = False
    sampler: str = "tpe"
    storage: str = DEFAULT_STORAGE
    study: str | None = None
    seed: int | None = None
    timeout: float | None = None
    max_stages: int = 3
    freeze: list[str] = field(default_factory=list)
    heartbeat: int = HEARTBEAT
    progress: bool = True


def study_name(config: TuneConfig, task: Any) -> str:
    return config.study or f"{config.recipe}-{task.label.split(' ')[0]}-{config.budget:g}{'-pareto' if config.pareto else ''}"


def make_study(config: TuneConfig, space: Space, task: Any, name: str) -> Any:
    """Create the study (and enqueue the base recipe and its scaled schedule as first candidates), or load
    it when it exists: a study made by another command (other recipe, budget, task) is refused."""
    optuna = require_optuna()
    storage = open_storage(config.storage, config.heartbeat)
    directions = ["maximize", "minimize"] if config.pareto else ["maximize"]
    if config.sampler == "nsga2":
        if not config.pareto:
            raise PrunekitError("--sampler nsga2 is a multi-objective sampler; use it with --pareto (or --sampler tpe)")
        sampler = optuna.samplers.NSGAIISampler(seed=config.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=min(10, max(3, config.trials // 4)))
    identity = {"recipe": space.recipe.name, "budget": config.budget, "task": task.label, "model": task.model_name,
                "pareto": config.pareto}
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, sampler=sampler)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        deadline = time.monotonic() + 30
        while not all(k in study.user_attrs for k in identity) and time.monotonic() < deadline:
            time.sleep(0.1)  # another worker made the study a moment ago and is labelling it
        made = {k: study.user_attrs.get(k) for k in identity}
        if made != identity or len(study.directions) != len(directions):
            differ = [f"{k}: {made[k]!r} there, {identity[k]!r} here" for k in identity if made[k] != identity[k]]
            raise PrunekitError(f"study {name!r} in {shown_url(config.storage)!r} was made by another command "
                                f"({'; '.join(differ) or 'objectives differ'}); give another --study name") from None
        return study
    for key, value in identity.items():
        study.set_user_attr(key, value)
    for seed_config in (space.config, space.scaled_base()):  # the base recipe's own points, when they fit
        values = space.values_of(seed_config) if seed_config is not None else None
        if values is not None:
            study.enqueue_trial(values, skip_if_exists=True)
    return study


def _fingerprint(config: dict) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in ("name", "description")}, sort_keys=True)


class Objective:
    """One trial: sample, check and rate before any forward (pruned when it does not fit), then score."""

    def __init__(self, space: Space, task: Any, trials: int, pareto: bool) -> None:
        self.space, self.task, self.trials, self.pareto = space, task, trials, pareto

    def __call__(self, trial: Any) -> Any:
        import optuna

        values = self.space.sample(trial)
        config = self.space.candidate(values)
        try:
            _, ratio = self.space.check(config)
        except (PrunekitError, ValueError) as exc:
            return self._prune(trial, f"the model cannot run it: {exc}")
        # one attribute per fact: each is a write to the storage
        trial.set_user_attr("candidate", {"recipe": config, "flops_ratio": ratio, "worker": WORKER})
        if ratio > self.space.budget + 1e-12:
            return self._prune(trial, f"FLOPs ratio {ratio:.4f} > budget {self.space.budget:g}")
        trial.set_user_attr("feasible", True)
        for done in completed(trial.study):
            if _fingerprint(done.user_attrs["candidate"]["recipe"]) == _fingerprint(config):  # scored already
                trial.set_user_attr("scored", {"accuracy": done.user_attrs["scored"]["accuracy"],
                                               "copy_of": done.number})
                return self._values(done.user_attrs["scored"]["accuracy"], ratio)
        if not self._claim(trial):
            trial.study.stop()
            raise optuna.TrialPruned(f"the study already has {self.trials} trials")
        accuracy = float(self.task.correct(config, "calibration").mean())
        trial.set_user_attr("scored", {"accuracy": accuracy})
        return self._values(accuracy, ratio)

    def _values(self, accuracy: float, ratio: float) -> Any:
        return (accuracy, ratio) if self.pareto else accuracy

    def _prune(self, trial: Any, reason: str) -> None:
        import optuna

        trial.set_user_attr("feasible", reason)  # anything but True: why it was pruned
        raise optuna.TrialPruned(reason)

    def _claim(self, trial: Any) -> bool:
        """Whether this trial is one of the study's ``trials``: completed ones, then the running candidates
        that fit the budget, in trial-number order (so workers together score exactly ``trials``)."""
        import optuna

        state = optuna.trial.TrialState
        deadline = time.monotonic() + CLAIM_WAIT
        while True:
            everything = trial.study.get_trials(deepcopy=False)
            done = sum(t.state == state.COMPLETE for t in everything)
            ahead = [t for t in everything if t.state == state.RUNNING and t.number < trial.number]
            taken = done + sum(t.user_attrs.get("feasible") is True for t in ahead)
            if taken >= self.trials:
                return False
            if all("feasible" in t.user_attrs for t in ahead) or time.monotonic() > deadline:
                return True
            time.sleep(0.05)


def completed(study: Any) -> list[Any]:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]


def best_trial(study: Any) -> Any:
    """The completed trial with the highest calibration accuracy (then the fewest FLOPs, then the first)."""
    trials = completed(study)
    if not trials:
        raise PrunekitError(f"study {study.study_name!r} has no completed trial: no candidate fit the budget")
    return max(trials, key=lambda t: (accuracy(t), -flops_ratio(t), -t.number))


def run_study(config: TuneConfig, space: Space, task: Any, name: str) -> Any:
    """Run (or resume, or join) the study until it holds ``config.trials`` completed trials."""
    import optuna
    from tqdm.auto import tqdm

    study = make_study(config, space, task, name)
    optuna.storages.fail_stale_trials(study)  # trials of a killed run: failed, then retried with their values
    objective = Objective(space, task, config.trials, config.pareto)
    bar = tqdm(total=config.trials, initial=min(config.trials, len(completed(study))), desc="prunekit tune",
               unit="trial", disable=not config.progress)
    pruned_here = [0]
    limit = max(200, 50 * config.trials)  # candidates over the budget cost no forward, but are not free

    def after(study: Any, trial: Any) -> None:
        done = len(completed(study))
        bar.n = min(done, config.trials)
        if done:
            best = max(accuracy(t) for t in completed(study))
            bar.set_postfix(best=f"{best:.3f}", refresh=False)
        bar.refresh()
        pruned_here[0] += trial.state == optuna.trial.TrialState.PRUNED
        if done >= config.trials or pruned_here[0] >= limit:
            study.stop()

    start = time.monotonic()
    while len(completed(study)) < config.trials and pruned_here[0] < limit:
        left = None if config.timeout is None else config.timeout - (time.monotonic() - start)
        if left is not None and left <= 0:
            break
        study.optimize(objective, callbacks=[after], timeout=left, catch=())
    bar.close()
    if not completed(study):
        raise PrunekitError(f"no candidate of {pruned_here[0]} sampled fit budget {config.budget:g} on "
                            f"{task.model_name} and ran (the smallest FLOPs ratio the space reaches is "
                            f"{space.min_ratio:.4f}); raise --budget or widen the space")
    return study


def tune(config: TuneConfig, task: Any, out: str | None = None, plot: str | None = None,
         heldout_seed: int = 0) -> dict[str, Any]:
    """Search, then re-score the best recipe on the held-out split; write the YAML and the PNG."""
    from prunekit.tune_report import heldout_check, plot_study, summarise, write_recipe

    require_optuna()
    check_budget(config.budget)
    space = Space(config.recipe, task.dims, task.n_visual, config.budget, task.model_name, config.max_stages,
                  config.freeze)
    name = study_name(config, task)
    study = run_study(config, space, task, name)
    best = best_trial(study)
    heldout = heldout_check(space, task, best, heldout_seed) if task.sizes.get("heldout") else None
    result = summarise(config, space, task, study, best, heldout)
    if out:
        write_recipe(result, out)
        result["out"] = out
    if plot:
        plot_study(result, plot)
        result["plot"] = plot
    return result


# ---- command line -----------------------------------------------------------------------------
def _budget(text: str) -> float | str:
    """A FLOPs ratio in (0, 1], or ``base`` / ``base*F``: the base recipe's own ratio on the model (times F)."""
    text = text.strip()
    if text == "base" or text.startswith("base*"):
        factor = text.partition("*")[2] or "1"
        try:
            value = float(factor)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{text!r}: {factor!r} is not a positive factor; valid: base, base*F "
                                             f"(F > 0) or a FLOPs ratio in (0, 1]")
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; valid: a FLOPs ratio in (0, 1], base or "
                                         f"base*F") from None
    if not (math.isfinite(value) and 0 < value <= 1):
        raise argparse.ArgumentTypeError(f"{value:g} is not a FLOPs ratio; valid: a number in (0, 1]")
    return value


def resolve_budget(budget: float | str, recipe: str, task: Any) -> float:
    """``base`` / ``base*F`` as a number: the base recipe's FLOPs ratio on the task's model (times F)."""
    if not isinstance(budget, str):
        return check_budget(budget)
    import prunekit
    from prunekit.flops import recipe_estimate

    factor = float(budget.partition("*")[2] or 1)
    base = recipe_estimate(prunekit.load_recipe(recipe), task.dims, task.n_visual).visual_ratio
    value = base * factor
    if not 0 < value <= 1:
        raise PrunekitError(f"budget {budget!r} is {value:g} ({recipe}'s FLOPs ratio on {task.model_name} is "
                            f"{base:.4f}); valid: a FLOPs ratio in (0, 1]")
    return value


def add_tune_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``tune`` subcommand."""
    from prunekit.cli_checks import int_at_least as _int_at_least

    tune_parser = subparsers.add_parser(
        "tune", help="search a recipe's schedule and parameters for a model under a FLOPs budget (Optuna)")
    tune_parser.add_argument("--recipe", default="transprune-high", help="the base recipe (name or YAML path)")
    tune_parser.add_argument("--budget", type=_budget, required=True,
                             help="the largest prefill FLOPs ratio a candidate may have, in (0, 1] (papers' convention), "
                                  "or base / base*F: the base recipe's own ratio on the model (times F)")
    tune_parser.add_argument("--model", help="with a toy task: a folder of its weights (default: the package's); "
                                             "otherwise toy, toy:FOLDER, a model folder or a hub id")
    tune_parser.add_argument("--task", default="toy",
                             help="toy, toy-v2 (the LLaVA-layout toy), jsonl:PATH or lmms:TASK (default: toy)")
    tune_parser.add_argument("--trials", type=_int_at_least(1), default=40,
                             help="completed trials the study holds when it ends (over-budget candidates do not count)")
    tune_parser.add_argument("--pareto", action="store_true", help="multi-objective: accuracy against FLOPs")
    tune_parser.add_argument("--sampler", choices=("tpe", "nsga2"), default="tpe",
                             help="Optuna sampler (nsga2 with --pareto only)")
    tune_parser.add_argument("--storage", default=DEFAULT_STORAGE,
                             help=f"an Optuna storage URL (default: {DEFAULT_STORAGE}; also postgresql://..., "
                                  f"mysql://..., journal:PATH); workers running the same command share the study")
    tune_parser.add_argument("--study", help="the study name (default: from the recipe, task and budget)")
    tune_parser.add_argument("--calibration", type=_int_at_least(1), default=300, help="calibration questions")
    tune_parser.add_argument("--heldout", type=_int_at_least(0), default=500,
                             help="held-out questions the study never sees (0: no held-out check)")
    tune_parser.add_argument("--seed", type=int, default=0, help="toy calibration seed")
    tune_parser.add_argument("--heldout-seed", type=int, default=1, help="toy held-out seed")
    tune_parser.add_argument("--sampler-seed", type=int, default=None,
                             help="seed Optuna's sampler (one worker only: workers with one seed sample alike)")
    tune_parser.add_argument("--match", choices=("exact", "contains"), default="exact", help="jsonl answer scoring")
    tune_parser.add_argument("--max-new-tokens", type=_int_at_least(1), default=1,
                             help="jsonl: greedy tokens per answer (1: the one-word answer prunekit eval scores)")
    tune_parser.add_argument("--include-path", help="lmms: a folder of local lmms-eval task YAMLs")
    tune_parser.add_argument("--metric", help="lmms: the per-sample metric (default: the task's first)")
    tune_parser.add_argument("--visual-tokens", type=_int_at_least(1),
                             help="visual tokens per image for the FLOPs model (default: counted from the task)")
    tune_parser.add_argument("--batch-size", type=_int_at_least(1), help="questions per forward pass")
    tune_parser.add_argument("--max-stages", type=_int_at_least(1), default=3, help="most prune stages searched")
    tune_parser.add_argument("--freeze", nargs="*", default=[],
                             help="knobs (or prefixes) left as the base recipe has them, e.g. criteria.ttv")
    tune_parser.add_argument("--timeout", type=float, help="stop this worker after this many seconds")
    tune_parser.add_argument("--heartbeat", type=_int_at_least(1), default=HEARTBEAT,
                             help="seconds between a trial's heartbeats; a trial silent for 3x this is retried")
    tune_parser.add_argument("--out", default="tuned.yaml", help="the best recipe, as YAML prunekit.apply loads")
    tune_parser.add_argument("--plot", default="prunekit_tune.png", help="PNG of the explored points and Pareto front")
    tune_parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    tune_parser.set_defaults(func=cmd_tune)
    return tune_parser


def cmd_tune(args: argparse.Namespace) -> int:
    from prunekit.cli_checks import check_writable
    from prunekit.tune_report import format_report, to_json
    from prunekit.tune_tasks import make_task

    require_optuna()
    for path, option in ((args.out, "--out"), (args.plot, "--plot")):
        check_writable(path, option)
    open_storage(args.storage, args.heartbeat)  # an unreachable storage fails before the model loads
    task = make_task(args.task, args.model, args.calibration, args.heldout, args.seed, args.heldout_seed, args.match,
                     args.include_path, args.metric, args.batch_size, args.max_new_tokens)
    if args.visual_tokens:
        task.n_visual = args.visual_tokens
    if not task.n_visual:
        raise PrunekitError(f"cannot tell how many visual tokens {task.model_name} sees per image; give --visual-tokens")
    config = TuneConfig(recipe=args.recipe, budget=resolve_budget(args.budget, args.recipe, task), trials=args.trials, pareto=args.pareto,
                        sampler=args.sampler, storage=args.storage, study=args.study, seed=args.sampler_seed,
                        timeout=args.timeout, max_stages=args.max_stages, freeze=args.freeze,
                        heartbeat=args.heartbeat, progress=not args.json)
    result = tune(config, task, out=args.out, plot=args.plot, heldout_seed=args.seed)
    print(to_json(result) if args.json else format_report(result))
    return 0
