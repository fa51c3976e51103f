"""prunekit tune: the search space from plugin metadata, the budget check before any forward, storage
(resume after a kill, two workers on one study, PostgreSQL), tasks, outputs and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml

import prunekit
from prunekit.errors import PrunekitError
from prunekit.flops import DecoderDims
from prunekit.tune_space import Space, check_budget

optuna = pytest.importorskip("optuna", reason="prunekit tune needs Optuna: pip install 'prunekit[tune]'")

from prunekit.tune import (  # noqa: E402
    TuneConfig, flops_ratio, open_storage, recipe_of, require_optuna, run_study, tune)

TOY_DIMS = DecoderDims(num_layers=16, hidden_size=96, intermediate_size=256)  # the LLaVA-layout toy's decoder
N_VISUAL = 144  # and its visual tokens
REPO = Path(__file__).resolve().parents[1]


class FakeTask:
    """A task without a model: a candidate's accuracy is a fixed function of its recipe (fast, deterministic)."""

    label = "fake"
    model_name = "fake"
    n_visual = N_VISUAL
    dims = TOY_DIMS
    sizes = {"calibration": 20, "heldout": 20}

    def __init__(self) -> None:
        self.calls = 0

    def correct(self, recipe, split):
        self.calls += 1
        if recipe is None:
            return np.ones(20, dtype=bool)
        stages = recipe["schedule"]["stages"]
        kept = sum(s["layer"] / 16 + s["keep"] for s in stages) / len(stages)  # later and more: better
        rng = np.random.default_rng(0 if split == "calibration" else 1)
        return rng.random(20) < min(1.0, kept)


def _config(tmp_path, **kw) -> TuneConfig:
    defaults = dict(recipe="transprune-high", budget=0.6, trials=4, storage=f"sqlite:///{tmp_path / 's.db'}",
                    study="t", seed=0, progress=False)
    return TuneConfig(**{**defaults, **kw})


# ---- search space ------------------------------------------------------------------------------
def test_the_space_is_read_from_each_plugins_field_metadata():
    space = Space("transprune-high", TOY_DIMS, N_VISUAL, 0.6)
    names = [k.name for k in space.knobs]
    assert names == ["criteria.ttv.first_layer", "criteria.ttv.last_layer", "combiner.weights", "schedule.stages"]
    assert space.base_ratio == pytest.approx(0.6783, abs=1e-4)  # transprune-high on the toy's decoder
    pyramid = Space("pdrop", TOY_DIMS, N_VISUAL, 0.6)  # reference_depth 32: layers in its own coordinates
    assert [k.describe() for k in pyramid.knobs][0].endswith("layers 1..31, keeps")


def test_a_known_recipe_enqueued_samples_back_to_itself():
    space = Space("transprune-high", TOY_DIMS, N_VISUAL, 0.7)
    for config in (space.config, space.scaled_base(0.45)):
        values = space.values_of(config)
        assert values is not None
        rebuilt = space.candidate(space.sample(optuna.trial.FixedTrial(values)))
        assert rebuilt["schedule"] == config["schedule"] and rebuilt["combiner"] == config["combiner"]
        assert rebuilt["criteria"] == config["criteria"]


def test_the_base_schedule_scaled_to_a_budget_stays_within_it():
    space = Space("transprune-high", TOY_DIMS, N_VISUAL, 0.7)
    scaled = space.scaled_base(0.45)
    _, ratio = space.check(scaled)
    assert 0.44 < ratio <= 0.45
    assert [s["layer"] for s in scaled["schedule"]["stages"]] == [7, 9, 12]


@dataclass
class Tunable(prunekit.Criterion):
    """A third-party criterion: its search range sits in its own field metadata."""

    name: ClassVar[str] = "tunable_test"
    power: float = field(default=1.0, metadata={"tune": (0.5, 2.0)})
    window: int = field(default=2, metadata={"tune": (1, 4)})
    mode: str = field(default="a", metadata={"tune": ["a", "b"]})

    def score(self, ctx):
        return ctx.layout.visual.float()


class TunablePlugin:
    @prunekit.hookimpl
    def prunekit_add_criteria(self):
        return [Tunable]


def test_a_third_party_criterion_is_tunable_through_the_same_metadata():
    prunekit.register_plugin(TunablePlugin(), name="tunable-test")
    try:
        recipe = {"criteria": {"t": {"type": "tunable_test"}},
                  "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
        space = Space(recipe, TOY_DIMS, N_VISUAL, 0.6, freeze=["schedule"])
        assert [(k.name, k.kind) for k in space.knobs] == [
            ("criteria.t.power", "float"), ("criteria.t.window", "int"), ("criteria.t.mode", "choice")]
        values = space.sample(optuna.trial.FixedTrial({"criteria.t.power": 1.5, "criteria.t.window": 3,
                                                       "criteria.t.mode": "b"}))
        built = prunekit.load_recipe(space.candidate(values)).criteria["t"]
        assert (built.power, built.window, built.mode) == (1.5, 3, "b")
    finally:
        prunekit.unregister_plugin("tunable-test")


# ---- bad input ----------------------------------------------------------------------------------
def test_a_budget_below_every_schedule_names_the_value_and_the_valid_range():
    with pytest.raises(PrunekitError, match=r"budget 0.01 is below .* smallest FLOPs ratio is 0.0677.*valid budgets: "
                                            r"\[0.0677, 1\]"):
        Space("transprune-high", TOY_DIMS, N_VISUAL, 0.01)
    prunekit.register_plugin(TunablePlugin(), name="tunable-test")
    try:  # no schedule knob: the base recipe's own schedule is all there is
        recipe = {"criteria": {"t": {"type": "tunable_test"}},
                  "schedule": {"type": "stages", "stages": [{"layer": 2, "keep": 0.5}]}}
        with pytest.raises(PrunekitError, match=r"budget 0.3 is below .*the base recipe's own.*\[0.5188, 1\]"):
            Space(recipe, TOY_DIMS, N_VISUAL, 0.3, freeze=["schedule"])
    finally:
        prunekit.unregister_plugin("tunable-test")


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), True])
def test_a_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(PrunekitError, match=r"is not a FLOPs ratio; valid: a number in \(0, 1\]"):
        check_budget(budget)


def test_the_command_line_refuses_a_budget_outside_zero_one(capsys):
    from prunekit.cli import main

    assert main(["tune", "--budget", "1.2"]) == 2
    assert "argument --budget: 1.2 is not a FLOPs ratio; valid: a number in (0, 1]" in capsys.readouterr().err


def test_a_budget_relative_to_the_base_recipe():
    import argparse

    from prunekit.tune import _budget, resolve_budget

    assert resolve_budget(_budget("base"), "transprune-high", FakeTask()) == pytest.approx(0.6783203125)
    assert resolve_budget(_budget("base*0.5"), "transprune-high", FakeTask()) == pytest.approx(0.6783203125 / 2)
    for bad in ("base*x", "base*-1", "half"):
        with pytest.raises(argparse.ArgumentTypeError, match="valid:"):
            _budget(bad)
    with pytest.raises(PrunekitError, match=r"budget 'base\*2' is 1.35.*valid: a FLOPs ratio in \(0, 1\]"):
        resolve_budget("base*2", "transprune-high", FakeTask())


def test_a_base_recipe_with_nothing_tunable_is_named():
    with pytest.raises(PrunekitError, match=r"recipe 'fastv' has nothing tunable.*schedule \(Stages: stages\).*"
                                            r"\{'tune': \(low, high\)\}"):
        Space("fastv", TOY_DIMS, N_VISUAL, 0.6, freeze=["schedule"])


@pytest.mark.parametrize("url, says", [
    ("postgresql://nobody@127.0.0.1:1/nothing", r"storage 'postgresql://nobody@127.0.0.1:1/nothing' cannot be reached"),
    ("sqlite:////no/such/folder/s.db", r"storage 'sqlite:////no/such/folder/s.db' cannot be reached"),
    ("nonsense", r"storage 'nonsense' is not a storage URL; valid: sqlite:///PATH"),
    ("postgresql://user:secret@127.0.0.1:1/db", r"storage 'postgresql://user:\*\*\*@127.0.0.1:1/db' cannot be"),
])
def test_an_unreachable_storage_url_is_named(url, says):
    with pytest.raises(PrunekitError, match=says):
        open_storage(url)


def test_a_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(PrunekitError, match=r"pip install 'prunekit\[tune\]'"):
        require_optuna()


# ---- the study ----------------------------------------------------------------------------------
def test_over_budget_candidates_are_pruned_before_any_forward_and_do_not_count(tmp_path):
    task = FakeTask()
    config = _config(tmp_path, trials=5, budget=0.45)
    space = Space(config.recipe, TOY_DIMS, N_VISUAL, config.budget)
    study = run_study(config, space, task, "t")
    state = optuna.trial.TrialState
    complete = study.get_trials(states=(state.COMPLETE,))
    pruned = study.get_trials(states=(state.PRUNED,))
    assert len(complete) == 5 and pruned  # the base recipe itself (0.678) is over this budget
    assert all(flops_ratio(t) <= 0.45 for t in complete)
    over = [t for t in pruned if "FLOPs ratio" in t.user_attrs["feasible"]]
    assert over and all(flops_ratio(t) > 0.45 for t in over)
    assert task.calls == sum("copy_of" not in t.user_attrs["scored"] for t in complete)  # forwards: scored trials only


def test_a_study_made_by_another_command_is_refused(tmp_path):
    space = Space("transprune-high", TOY_DIMS, N_VISUAL, 0.6)
    run_study(_config(tmp_path, trials=1), space, FakeTask(), "t")
    other = Space("transprune-high", TOY_DIMS, N_VISUAL, 0.5)
    with pytest.raises(PrunekitError, match=r"study 't' in .* was made by another command \(budget: 0.6 there, "
                                            r"0.5 here\)"):
        run_study(_config(tmp_path, trials=1, budget=0.5), other, FakeTask(), "t")


def test_pareto_study_reports_a_front(tmp_path):
    result = tune(_config(tmp_path, trials=6, pareto=True), FakeTask(), out=str(tmp_path / "b.yaml"),
                  plot=str(tmp_path / "p.png"))
    front = result["front"]
    assert front and all(a["flops_ratio"] <= b["flops_ratio"] and a["accuracy"] < b["accuracy"]
                         for a, b in zip(front, front[1:]))
    assert (tmp_path / "p.png").stat().st_size > 0


# ---- the command, on the tiny random toy ---------------------------------------------------------
def _command(toy_weights, tmp_path, *extra, storage=None, study="s", trials=3, calibration=10):
    return ["tune", "--model", str(toy_weights), "--budget", "0.6", "--trials", str(trials), "--calibration",
            str(calibration), "--heldout", "10", "--batch-size", "10", "--storage",
            storage or f"sqlite:///{tmp_path / 'study.db'}", "--study", study, "--out", str(tmp_path / "best.yaml"),
            "--plot", str(tmp_path / "tune.png"), *extra]


@pytest.mark.slow
def test_tune_writes_a_recipe_apply_loads_as_is_with_its_figures(toy_weights, tmp_path, capsys):
    from prunekit.cli import main
    from prunekit.toy.model import load_toy

    assert main(_command(toy_weights, tmp_path, "--json")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["trials"]["complete"] == 3 and result["best"]["flops_ratio"] <= 0.6
    assert {r["recipe"] if "recipe" in r else r["label"] for r in result["heldout"]["rows"]} == {
        "tuned", "transprune-high", "transprune-high@0.6", "none"}
    assert [c["b"] for c in result["heldout"]["comparisons"]] == ["transprune-high", "transprune-high@0.6"]
    text = (tmp_path / "best.yaml").read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert any("study 's'" in line for line in comments) and any("budget: FLOPs ratio <= 0.6" in line for line in comments)
    assert any(line.startswith("# calibration accuracy:") for line in comments)
    assert any(line.startswith("# held-out accuracy:") and "95% bootstrap interval" in line for line in comments)
    model, _ = load_toy(toy_weights)
    with prunekit.apply(model, str(tmp_path / "best.yaml")) as pruner:  # as is
        assert pruner.recipe.config.schedule.stages
    assert yaml.safe_load(text)["schedule"] == result["best"]["recipe"]["schedule"]
    assert (tmp_path / "tune.png").stat().st_size > 0


@pytest.mark.slow
def test_the_jsonl_task_scores_the_same_one_word_answer_as_prunekit_eval(toy_weights, tmp_path):
    from prunekit.toy.evaluate import _answers, _batches
    from prunekit.toy.model import load_toy
    from prunekit.toy.task import ToyTask
    from prunekit.tune_tasks import make_task

    questions = ToyTask(3).questions(12)
    lines = []
    for i, q in enumerate(questions):
        q.image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": q.question, "answer": q.answer}))
    (tmp_path / "task.jsonl").write_text("\n".join(lines) + "\n")
    task = make_task(f"jsonl:{tmp_path / 'task.jsonl'}", f"toy:{toy_weights}", 6, 6, batch_size=4)
    model, processor = load_toy(toy_weights)
    for recipe in (None, "transprune-high"):
        results = _answers(model, processor, _batches(processor, questions[6:], 5), recipe)
        answers = [a for index in sorted(results) for a in results[index][0]]
        expected = [a == q.answer for a, q in zip(answers, questions[6:])]
        assert task.correct(recipe, "heldout").tolist() == expected
    with pytest.raises(PrunekitError, match=r"needs --model"):
        make_task(f"jsonl:{tmp_path / 'task.jsonl'}", None, 6, 6)
    (tmp_path / "bad.jsonl").write_text('{"image": "0.png", "question": "q"}\n')
    with pytest.raises(PrunekitError, match=r"bad.jsonl:1 must be an object with string keys"):
        make_task(f"jsonl:{tmp_path / 'bad.jsonl'}", "toy", 1, 0)


def test_jsonl_matching():
    from prunekit.tune_tasks import matches

    assert matches("Red.", "red", "exact") and not matches("dark red", "red", "exact")
    assert matches("it is dark red", "red", "contains") and matches("New York, USA", "new york", "exact")


def test_an_lmms_task_without_the_extra_names_it(monkeypatch):
    from prunekit.tune_tasks import make_task

    for name in ("lmms_eval", "lmms_eval.api", "lmms_eval.api.model"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "prunekit.integrations.lmms_eval", raising=False)
    with pytest.raises(PrunekitError, match=r"task lmms:mme: .*pip install 'prunekit\[lmms\]'"):
        make_task("lmms:mme", None, 4, 4)
    monkeypatch.delitem(sys.modules, "prunekit.integrations.lmms_eval", raising=False)


@pytest.mark.slow
def test_an_lmms_task_scores_through_the_plugin(toy_weights, tmp_path):
    pytest.importorskip("lmms_eval", reason="the lmms extra is not installed")
    from prunekit.integrations.toy_task import TASK, write_toy_task
    from prunekit.tune_tasks import make_task

    write_toy_task(tmp_path, n=8, seed=31)
    from prunekit.toy.task import GRID

    task = make_task(f"lmms:{TASK}", f"toy:{toy_weights}", 4, 4, include_path=str(tmp_path), batch_size=4)
    assert task.n_visual == GRID * GRID
    for split in ("calibration", "heldout"):
        assert task.correct(None, split).shape == (4,)


# ---- storage: resume after a kill, two workers, PostgreSQL ---------------------------------------
def _worker(args: list[str], tmp_path: Path, name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "prunekit.cli", *args], cwd=tmp_path, env=env,
                            stdout=open(tmp_path / f"{name}.out", "w"), stderr=open(tmp_path / f"{name}.err", "w"))


def _study_trials(url: str, study: str):
    return optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)


@pytest.mark.slow
def test_two_workers_complete_one_study_with_no_trial_lost_or_duplicated(toy_weights, tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        workers.append(_worker(_command(toy_weights, folder, "--json", storage=url, trials=8), folder, name))
    for worker, name in zip(workers, ("a", "b")):
        assert worker.wait(timeout=600) == 0, (tmp_path / name / f"{name}.err").read_text()[-2000:]
    trials = _study_trials(url, "s")
    state = optuna.trial.TrialState
    complete = [t for t in trials if t.state == state.COMPLETE]
    assert len(complete) == 8  # exactly the study's trials: none lost, none scored twice
    assert {t.user_attrs["candidate"]["worker"].split(":")[1] for t in complete} == {str(w.pid) for w in workers}
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert not [t for t in trials if t.state in (state.RUNNING, state.WAITING)]
    scored = [t for t in complete if "copy_of" not in t.user_attrs["scored"]]
    assert len({json.dumps(recipe_of(t), sort_keys=True) for t in scored}) == len(scored)  # none scored twice
    reports = [json.loads((tmp_path / n / f"{n}.out").read_text()) for n in ("a", "b")]
    assert {r["study"] for r in reports} == {"s"} and all(r["trials"]["complete"] == 8 for r in reports)


def _kill_mid_trial(args: list[str], tmp_path: Path, url: str) -> set[int]:
    """Start a worker and SIGKILL it once it has scored a trial and is running the next; the numbers of the
    trials the kill left RUNNING (empty when the running trial finished between the look and the kill)."""
    first = _worker(args, tmp_path, "first")
    state = optuna.trial.TrialState
    for _ in range(3000):
        if first.poll() is not None:
            break
        try:
            trials = _study_trials(url, "s")
        except Exception:  # the study is not made yet
            trials = []
        if any(t.state == state.COMPLETE for t in trials) and any(t.state == state.RUNNING for t in trials):
            first.send_signal(signal.SIGKILL)
            first.wait()
            break
        time.sleep(0.05)
    assert first.returncode == -signal.SIGKILL, "the first run ended before it could be killed"
    return {t.number for t in _study_trials(url, "s") if t.state == state.RUNNING}


@pytest.mark.slow
def test_a_killed_study_resumes(toy_weights, tmp_path):
    state = optuna.trial.TrialState
    for attempt in range(3):  # a kill can land just after the running trial finished: kill a fresh study again
        url = f"sqlite:///{tmp_path / f'resume{attempt}.db'}"
        args = _command(toy_weights, tmp_path, "--json", "--heartbeat", "1", storage=url, trials=5, calibration=40)
        interrupted = _kill_mid_trial(args, tmp_path, url)
        if interrupted:
            break
    assert interrupted, "three kills all landed between two trials"
    before = {t.number: t.values for t in _study_trials(url, "s") if t.state == state.COMPLETE}
    assert 1 <= len(before) < 5
    time.sleep(3.5)  # past the grace period (3 heartbeats): the killed trial is stale
    second = _worker(args, tmp_path, "second")
    assert second.wait(timeout=600) == 0, (tmp_path / "second.err").read_text()[-2000:]
    trials = _study_trials(url, "s")
    complete = {t.number: t.values for t in trials if t.state == state.COMPLETE}
    assert len(complete) == 5 and all(complete[n] == v for n, v in before.items())  # kept, not redone
    assert not [t for t in trials if t.state == state.RUNNING]
    stale = [t for t in trials if t.state == state.FAIL]
    assert {t.number for t in stale} == interrupted  # the trial the kill interrupted, failed by its heartbeat ...
    retried = [t for t in trials if t.system_attrs.get("failed_trial") in interrupted]
    assert retried and all(r.params[k] == v for r in retried for s in stale  # ... and retried with the values
                           if r.system_attrs["failed_trial"] == s.number for k, v in s.params.items())  # it had


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster (Debian's initdb / pg_ctl in a temporary folder), or a skip saying why."""
    pytest.importorskip("psycopg", reason="PostgreSQL storage needs the psycopg driver: pip install psycopg")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    pg_ctl = str(bins[-1]) if bins else shutil.which("pg_ctl")
    if pg_ctl is None:
        pytest.skip("no PostgreSQL server here (apt-get install postgresql; .ci/run installs it)")
    initdb = str(Path(pg_ctl).with_name("initdb"))
    folder = Path(tempfile.mkdtemp(prefix="prunekit-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres", "-c"]
    port = _free_port()
    data = folder / "data"

    def call(*command: str) -> subprocess.CompletedProcess:
        full = [*run_as, " ".join(command)] if run_as[:1] == ["su"] else [*run_as, *command]
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    made = call(initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    if made.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb could not make a cluster: {made.stderr.strip()[-300:]}")
    started = call(pg_ctl, "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60", "-o",
                   f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start")
    if started.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server did not start: {started.stderr.strip()[-300:]}")
    try:
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE tune")
        yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    finally:
        call(pg_ctl, "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_a_study_runs_and_resumes_on_a_postgresql_server(postgres_url, tmp_path):
    space = Space("transprune-high", TOY_DIMS, N_VISUAL, 0.6)
    config = _config(tmp_path, storage=postgres_url, study="pg", trials=3)
    run_study(config, space, FakeTask(), "pg")
    config = dataclasses.replace(config, trials=5)  # the same study, carried on to 5 trials
    run_study(config, space, FakeTask(), "pg")
    trials = _study_trials(postgres_url.replace("postgresql://", "postgresql+psycopg://"), "pg")
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5 and sorted(t.number for t in trials) == list(range(len(trials)))
