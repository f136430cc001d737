"""`maml-run eval.only=true train.resume=<run>`: re-test a trained run without training, beside its own results."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import REPO, cli_command, cli_env, compose_config
from maml_runner.checkpoint import load_checkpoint
from maml_runner.errors import UserError
from maml_runner.eval_only import evaluate_only
from maml_runner.io import read_csv
from maml_runner.train import run

TRAIN = ["train.iterations=40", "train.val_interval=10", "train.val_tasks=8", "train.meta_batch_size=4",
         "eval.num_tasks=16", "hardware=cpu", "hardware.threads=1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("trained")
    run(compose_config(TRAIN), run_dir)
    return run_dir


def snapshot(run_dir: Path) -> dict:
    """Bytes and mtime of every file of the run (the lock file excepted: taking it is not writing the run)."""
    return {p.relative_to(run_dir): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and p.name != ".maml-run.lock"}


def retest(run_dir: Path, out: Path, *overrides: str) -> dict:
    command = ["eval.only=true", f"train.resume={run_dir}", "hardware=cpu", "hardware.threads=1", *overrides]
    return evaluate_only(compose_config(command), out, command)


def test_same_eval_settings_reproduce_the_runs_own_test_exactly(trained, tmp_path):
    row = retest(trained, tmp_path)  # sinusoid: 10 eval steps; the run tested 16 tasks
    name = "eval_best_10steps_16tasks_seed1234.csv"
    assert Path(row["results_file"]) == trained / f"results_{name}"
    assert (trained / f"test_tasks_{name}").read_bytes() == (trained / "test_tasks.csv").read_bytes()
    original, again = (read_csv(trained / "results.csv", typed=True)[0],
                       read_csv(trained / f"results_{name}", typed=True)[0])
    for key in ("mean", "ci95", "n_tasks", "checkpoint", "best_val_loss", "iterations_done", "train_seconds",
                "eval.inner_steps", "algorithm.inner_lr"):
        assert again[key] == original[key], key


def test_other_eval_settings_write_new_files_and_leave_the_run_untouched(trained, tmp_path):
    before = snapshot(trained)
    done = subprocess.run(cli_command("eval.only=true", f"train.resume={trained}", "eval.inner_steps=3",
                                      "eval.num_tasks=24", "hardware=cpu", "hardware.threads=1",
                                      f"hydra.run.dir={tmp_path / 'log'}"),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    after = snapshot(trained)
    assert {k: v for k, v in after.items() if k in before} == before  # results.csv, checkpoints, metrics: as they were
    new = sorted(str(k) for k in set(after) - set(before))
    assert new == ["results_eval_best_3steps_24tasks_seed1234.csv", "test_tasks_eval_best_3steps_24tasks_seed1234.csv"]
    row, = read_csv(trained / new[0], typed=True)
    assert row["n_tasks"] == 24 and row["eval.inner_steps"] == 3 and row["checkpoint"] == "best"
    assert row["iterations_done"] == 40 and row["train.iterations"] == 40  # the trained run's, not retrained
    assert row["mean"] != read_csv(trained / "results.csv", typed=True)[0]["mean"]
    assert len(read_csv(trained / new[1])) == 24
    assert not (tmp_path / "log" / "checkpoints").exists() and not (tmp_path / "log" / "results.csv").exists()


def test_eval_checkpoint_last_and_a_checkpoint_file(trained, tmp_path):
    row = retest(trained, tmp_path, "eval.checkpoint=last", "eval.num_tasks=4")
    assert row["checkpoint"] == "last" and Path(row["results_file"]).name == \
        "results_eval_last_10steps_4tasks_seed1234.csv"
    row = retest(trained / "checkpoints" / "best.pt", tmp_path, "eval.num_tasks=5")
    assert Path(row["results_file"]) == trained / "results_eval_best_10steps_5tasks_seed1234.csv"


def test_the_runs_own_keys_may_be_repeated_but_not_changed(trained, tmp_path):
    retest(trained, tmp_path, *TRAIN[:4], "eval.num_tasks=6")  # its training command line + eval.only: fine
    before = snapshot(trained)
    with pytest.raises(UserError, match=r"^algorithm.inner_lr=0.5: eval.only=true tests the trained run with its own "
                                        r"config, which has algorithm.inner_lr=0.01; only eval.\*"):
        retest(trained, tmp_path, "algorithm.inner_lr=0.5")
    assert snapshot(trained) == before


@pytest.mark.parametrize("resume, message", [
    (None, r"eval.only=true needs train.resume=<run dir or checkpoint .pt>, the trained run to test "
           r"\(got train.resume=false\)"),
    ("true", r"\(got train.resume=true\)"),
    ("{tmp}/nowhere", r"train.resume=\S+/nowhere: no such run directory or checkpoint file"),
    ("{tmp}", r"train.resume=\S+: no checkpoint at '\S+/checkpoints/best.pt'"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, resume, message):
    extra = [] if resume is None else [f"train.resume={resume.format(tmp=tmp_path)}"]
    done = subprocess.run(cli_command("eval.only=true", *extra, "hardware=cpu", f"hydra.run.dir={tmp_path / 'log'}"),
                          cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("maml-run: error: "), done.stderr
    import re
    assert re.search(message, lines[0]), lines[0]


def test_eval_only_is_not_part_of_a_runs_config(trained):
    """A mode switch, not a property of the run: checkpoints written before the key existed still resume and
    match (train.resume=true compares saved configs)."""
    assert "only" not in load_checkpoint(trained / "checkpoints" / "last.pt")["config"]["eval"]
    assert compose_config(TRAIN).eval.only is False


def test_a_training_run_refuses_eval_only_true(tmp_path):
    """train.run (e.g. reproduce's cells) must not silently train when asked to test only."""
    with pytest.raises(UserError, match=r"eval.only=true reached a training run"):
        run(compose_config([*TRAIN, "eval.only=true"]), tmp_path)
    assert not any(tmp_path.iterdir())
