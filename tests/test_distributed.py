"""`prunekit eval` data-parallel: two gloo processes under torchrun give what one process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

EVAL = ["-m", "prunekit.cli", "eval", "-n", "14", "--batch-size", "4", "--recipes", "fastv", "transprune-high",
        "--sweep", "random", "--ratios", "0.25", "--json"]


def _eval(prefix: list[str], weights, plot) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *prefix, *EVAL, "--weights", str(weights), "--plot", str(plot)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_two_processes_on_gloo_give_the_single_process_result(toy_weights, tmp_path):
    single = _eval([], toy_weights, tmp_path / "one.png")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = _eval(torchrun, toy_weights, tmp_path / "two.png")
    assert (single.pop("processes"), double.pop("processes")) == (1, 2)
    assert double == single
    assert [row["recipe"] for row in single["rows"]] == ["none", "fastv", "transprune-high"]
    assert len(single["sweep"]) == 1 and single["questions"] == 14
    assert (tmp_path / "two.png").is_file()
