"""What a run logs: the start line, an ETA that counts the validations still to come, the test's progress bar."""
from __future__ import annotations

import math

import pytest

from conftest import compose_config
from maml_runner.runlog import eta_seconds, start_line, test_progress as with_test_progress


def test_eta_adds_the_remaining_validations_at_their_measured_cost():
    # 100 of 1000 iterations at 0.1 s each (10 s), 2 validations took the other 4 s of the loop's 14 s wall time:
    # 900 steps x 0.1 s + 9 validations left (200, ..., 1000) x 2 s.
    assert eta_seconds(100, 1000, train_seconds=10.0, wall_seconds=14.0, validations_done=2,
                       val_interval=50) == pytest.approx(90 + 18 * 2)
    # A final validation at `total` that is not a multiple of the interval counts too (train.py validates there).
    assert eta_seconds(100, 1030, 10.0, 14.0, 2, 100) == pytest.approx(93 + 10 * 2)
    assert eta_seconds(100, 1000, 10.0, 14.0, 0, 100) == pytest.approx(90)  # no validation yet: cost unknown
    assert eta_seconds(1000, 1000, 100.0, 120.0, 10, 100) == 0
    assert math.isnan(eta_seconds(0, 1000, 0.0, 0.0, 0, 100))


def test_start_line_names_directory_device_threads_and_key_values(tmp_path):
    cfg = compose_config(["algorithm=fomaml", "train.iterations=77", "hardware=cpu"])
    line = start_line(cfg, tmp_path, "cpu", 3)
    assert line.startswith(f"run {tmp_path} | device cpu | threads 3 | algorithm.name=fomaml dataset.name=sinusoid")
    assert "train.iterations=77" in line and "algorithm.inner_lr=0.01" in line
    assert "train.resume" not in line  # shown only when resuming
    assert "train.resume=true" in start_line(compose_config(["train.resume=true"]), tmp_path, "cpu", 1)


def test_test_progress_yields_every_task_in_order():
    assert list(with_test_progress(iter(range(5)), 5)) == [0, 1, 2, 3, 4]


def test_the_cli_logs_the_start_line_once(tmp_path):
    from conftest import run_cli

    result = run_cli("train.iterations=4", "train.val_interval=2", "train.val_tasks=2", "train.meta_batch_size=2",
                     "eval.num_tasks=3", "hardware=cpu", "hardware.threads=1", "report.enabled=false",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in (tmp_path / "cli.log").read_text().splitlines() if " - run " in line]
    assert len(lines) == 1 and f"run {tmp_path} | device cpu | threads 1 | " in lines[0]
    assert "ETA" in (tmp_path / "cli.log").read_text()  # no terminal: progress lines in the log, with the ETA
