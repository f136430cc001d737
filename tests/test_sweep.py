"""What a sweep optimises: each job returns its best validation loss to Hydra's sweeper, never a test number."""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cli_command, cli_env
from maml_runner.cli import sweep_objective
from maml_runner.io import read_csv


def test_a_sweep_returns_each_jobs_best_validation_loss_not_its_test_mean(tmp_path):
    returns = tmp_path / "returns.jsonl"
    env = {**cli_env(), "PYTHONPATH": str(REPO / "tests")}  # the probe callback lives in tests/sweep_probe.py
    done = subprocess.run(cli_command(
        "-m", "seed=0,1", "train.iterations=20", "train.val_interval=5", "train.val_tasks=4",
        "train.meta_batch_size=4", "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1", "report.enabled=false",
        f"hydra.sweep.dir={tmp_path / 'sweep'}", "+hydra.callbacks.probe._target_=sweep_probe.ReturnValueProbe",
        f"+hydra.callbacks.probe.path={returns}"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = sorted((json.loads(line) for line in returns.read_text().splitlines()), key=lambda r: r["job"])
    assert [r["job"] for r in records] == [0, 1]
    for record in records:
        run_dir = Path(record["output_dir"])
        val_losses = [float(row["val_loss"]) for row in read_csv(run_dir / "metrics.csv")]
        assert len(val_losses) == 4
        result = read_csv(run_dir / "results.csv", typed=True)[0]
        assert record["value"] == pytest.approx(min(val_losses), rel=1e-12)
        assert result["best_val_loss"] == pytest.approx(min(val_losses), rel=1e-12)
        assert math.isnan(result["best_val_accuracy"])  # regression: no accuracy
        assert record["value"] != pytest.approx(result["mean"], rel=1e-6)  # not the test MSE
    assert records[0]["value"] != records[1]["value"]  # two seeds, two trainings


def test_sweep_objective_is_inf_without_a_finite_validation():
    assert sweep_objective({"mean": 0.5, "best_val_loss": 0.25}) == 0.25
    assert sweep_objective({"mean": 0.5, "best_val_loss": None}) == math.inf  # ranks last when minimizing
    assert sweep_objective({"mean": 0.5, "best_val_loss": math.nan}) == math.inf
