"""Interrupted runs resume exactly: SIGKILL at a random moment, SIGTERM, a death between two checkpoint writes,
and a resumed sweep that does not re-run finished jobs. Every resumed run must end with the same parameters,
metrics.csv and results.csv (timing columns aside) as the same run done in one go."""
from __future__ import annotations

import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import (REPO, assert_same_csv_rows, cli_command, cli_env, compose_config, run_cli,
                      run_killed_at_last_pt)
from maml_runner.checkpoint import load_checkpoint, save_checkpoint
from maml_runner.io import read_csv
from maml_runner.train import run

# 60 iterations, validation (and checkpoint) every 10: a few seconds on one CPU thread.
COMMON = ["train.iterations=60", "train.val_interval=10", "train.val_tasks=10", "train.meta_batch_size=5",
          "train.log_interval=5", "eval.num_tasks=20", "hardware=cpu", "hardware.threads=1",
          "hardware.deterministic=true"]
VALIDATIONS = list(range(10, 61, 10))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run done in one go (in-process: the code path the CLI takes, without the start-up cost)."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(compose_config(COMMON), run_dir)
    return run_dir


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    assert_same_csv_rows(run_dir, reference_dir)
    assert [row["iteration"] for row in read_csv(run_dir / "metrics.csv", typed=True)] == VALIDATIONS
    for name in ("last.pt", "best.pt"):
        got, want = (load_checkpoint(d / "checkpoints" / name) for d in (run_dir, reference_dir))
        assert got["iteration"] == want["iteration"], name
        assert got["best_val_loss"] == pytest.approx(want["best_val_loss"], rel=1e-6), name
        got_params, want_params = got["algorithm"]["parameters"], want["algorithm"]["parameters"]
        assert got_params.keys() == want_params.keys()
        for key in want_params:
            torch.testing.assert_close(got_params[key], want_params[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")


def tensorboard_steps(run_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"))  # applies purge_step like TensorBoard does
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


def metrics_rows(path: Path) -> int:
    return len(read_csv(path)) if path.is_file() else 0


def wait_for_rows(process: subprocess.Popen, path: Path, rows: int, timeout: float = 120) -> float:
    """Block until metrics.csv has `rows` rows (it is written atomically); returns the time it happened."""
    deadline = time.monotonic() + timeout
    while metrics_rows(path) < rows:
        assert process.poll() is None, f"the run exited (code {process.returncode}) before {rows} validations"
        assert time.monotonic() < deadline, f"no {rows} validations within {timeout} s"
        time.sleep(0.01)
    return time.monotonic()


def wait_for_job_rows(process: subprocess.Popen, sweep: Path) -> None:
    """Block until the first job of a sweep has validated once."""
    deadline = time.monotonic() + 120
    while sum(metrics_rows(p) for p in sweep.glob("0_*/metrics.csv")) < 1:
        assert process.poll() is None, f"the sweep exited (code {process.returncode}) before job 0 validated"
        assert time.monotonic() < deadline, "job 0 never validated"
        time.sleep(0.01)


def test_sigkill_at_a_random_moment_then_resume_matches_the_run_done_in_one_go(reference, tmp_path):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(cli_command(*COMMON, f"hydra.run.dir={run_dir}"), cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        first = wait_for_rows(process, run_dir / "metrics.csv", 1)
        second = wait_for_rows(process, run_dir / "metrics.csv", 2)
        delay = random.uniform(0, 2 * (second - first))  # somewhere in the next ~20 of the 40 remaining iterations
        time.sleep(delay)
        assert process.poll() is None, f"the run finished before the kill ({delay:.3f} s after iteration 20)"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (run_dir / "results.csv").exists()
    killed_at = metrics_rows(run_dir / "metrics.csv") * 10

    resumed = run_cli(*COMMON, f"hydra.run.dir={run_dir}", "train.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    found = re.search(r"resumed from \S+last\.pt at iteration (\d+)", resumed.stdout + resumed.stderr)
    assert found, resumed.stdout + resumed.stderr
    assert int(found.group(1)) in (killed_at - 10, killed_at), f"kill after {delay:.3f} s, metrics at {killed_at}"
    assert_same_run(run_dir, reference)
    assert tensorboard_steps(run_dir, "val/loss") == VALIDATIONS  # purge_step dropped the repeated steps
    assert not list(run_dir.rglob("*.tmp"))


def sigterm_once(command, ready):
    """Start `command`, wait until `ready(process)` returns, send SIGTERM; the finished process and its stderr."""
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    try:
        ready(process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return process, stderr


def test_sigterm_saves_last_and_prints_the_command_that_resumes_exactly(reference, tmp_path):
    run_dir = tmp_path / "terminated"
    process, stderr = sigterm_once(cli_command(*COMMON, f"hydra.run.dir={run_dir}"),
                                   lambda process: wait_for_rows(process, run_dir / "metrics.csv", 1))
    assert process.returncode == 128 + signal.SIGTERM, stderr
    last_line = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"maml-run: stopped by SIGTERM at iteration (\d+)/60; saved (\S+); resume with: (.+)",
                         last_line)
    assert match, last_line
    assert Path(match.group(2)) == run_dir / "checkpoints" / "last.pt"
    stopped_at = int(match.group(1))
    assert 10 <= stopped_at < 60 and load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == stopped_at
    command = shlex.split(match.group(3))
    assert command[0] == "maml-run" and f"train.resume={run_dir}" in command

    # The printed overrides, run in-process (the CLI path is covered above); a fresh Hydra dir, as the CLI would have.
    run(compose_config(command[1:]), tmp_path / "fresh-hydra-dir")
    assert_same_run(run_dir, reference)  # including train_loss of the validation interval the stop cut in two


def test_death_between_writing_best_and_last_resumes_exactly(reference, tmp_path, monkeypatch):
    """The worst moment: metrics.csv and best.pt already hold iteration k, last.pt still iteration k - 10."""
    losses = [row["val_loss"] for row in read_csv(reference / "metrics.csv", typed=True)]
    improved = [VALIDATIONS[i] for i in range(1, len(losses) - 1) if losses[i] < min(losses[:i])]
    assert improved, "the reference never improved after its first validation"
    k = improved[-1]
    run_dir = tmp_path / "run"
    run_killed_at_last_pt(compose_config(COMMON), run_dir, k, monkeypatch)
    assert load_checkpoint(run_dir / "checkpoints/best.pt")["iteration"] == k
    assert load_checkpoint(run_dir / "checkpoints/last.pt")["iteration"] == k - 10
    assert read_csv(run_dir / "metrics.csv", typed=True)[-1]["iteration"] == k

    run(compose_config([*COMMON, "train.resume=true"]), run_dir)
    assert_same_run(run_dir, reference)


def test_resume_true_finds_the_newest_sibling_run_with_the_same_config(reference, tmp_path):
    """Without hydra.run.dir, train.resume=true continues the newest run under outputs/<name>/ with this config."""
    older, newer, other = (tmp_path / f"2024-01-0{day}_00-00-00" for day in (1, 2, 3))
    for age, directory in enumerate((older, newer, other)):
        shutil.copytree(reference, directory)
        (directory / "results.csv").unlink()
        os.utime(directory / "checkpoints/last.pt", (1e9 + age, 1e9 + age))
    state = load_checkpoint(other / "checkpoints/last.pt")  # the newest run, but trained with another seed
    state["config"]["seed"] = 7
    save_checkpoint(other / "checkpoints/last.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    os.utime(other / "checkpoints/last.pt", (2e9, 2e9))

    fresh = tmp_path / "2024-01-04_00-00-00"  # the directory Hydra made for this invocation
    row = run(compose_config([*COMMON, "train.resume=true"]), fresh)
    assert (newer / "results.csv").is_file()
    assert not (older / "results.csv").exists() and not (other / "results.csv").exists()
    assert not (fresh / "results.csv").exists()
    assert row["mean"] == pytest.approx(read_csv(reference / "results.csv", typed=True)[0]["mean"], rel=1e-6)


def test_finished_run_is_not_rerun_but_a_changed_eval_config_is_retested(reference, tmp_path):
    run_dir = tmp_path / "finished"
    shutil.copytree(reference, run_dir)
    mtimes = lambda: {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}  # noqa: E731
    before = mtimes()
    row = run(compose_config([*COMMON, "train.resume=true"]), run_dir)
    assert mtimes() == before  # nothing retrained, retested or rewritten
    expected = read_csv(reference / "results.csv", typed=True)[0]
    assert {k: repr(v) for k, v in row.items()} == {k: repr(v) for k, v in expected.items()}

    row = run(compose_config([*COMMON, "train.resume=true", "eval.num_tasks=10"]), run_dir)
    assert row["n_tasks"] == 10 and read_csv(run_dir / "results.csv", typed=True)[0]["n_tasks"] == 10
    assert row["iterations_done"] == 60
    for name in ("checkpoints/last.pt", "checkpoints/best.pt"):  # not retrained
        assert (run_dir / name).stat().st_mtime_ns == before[run_dir / name], name
    assert (run_dir / "metrics.csv").read_text() == (reference / "metrics.csv").read_text()


def test_resumed_sweep_skips_finished_jobs_and_finishes_the_rest(tmp_path):
    """`maml-run -m ... train.resume=true hydra.sweep.dir=<same>`: job 0 finished, job 1 died after its last
    checkpoint (before its test), job 2 never started. Jobs 0 and 1 are prepared in-process under the names the
    sweep gives them (`<num>_<overrides>`), so one CLI sweep shows all three cases."""
    sweep = tmp_path / "sweep"
    common = ["train.iterations=4", "train.val_interval=2", "train.val_tasks=4", "train.meta_batch_size=2",
              "eval.num_tasks=4", "hardware.threads=1", "hardware=cpu"]
    job_dir = lambda num, seed: sweep / f"{num}_{','.join(sorted([*common, f'seed={seed}']))}"  # noqa: E731
    for num, seed in ((0, 0), (1, 1)):
        run(compose_config([*common, f"seed={seed}"]), job_dir(num, seed))
    finished, interrupted = job_dir(0, 0) / "results.csv", job_dir(1, 1) / "results.csv"
    finished_mtime, interrupted_mean = finished.stat().st_mtime_ns, read_csv(interrupted)[0]["mean"]
    interrupted.unlink()

    result = run_cli("-m", "seed=0,1,2", *common, "train.resume=true", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr
    log = result.stdout + result.stderr
    assert re.search(rf"{re.escape(job_dir(0, 0).name)} already finished with this config: not re-run", log), log
    assert re.search(rf"resumed from \S*{re.escape(job_dir(1, 1).name)}/checkpoints/last.pt", log), log
    assert finished.stat().st_mtime_ns == finished_mtime
    assert read_csv(interrupted)[0]["mean"] == interrupted_mean
    assert (job_dir(2, 2) / "results.csv").is_file()  # the job that never started ran from scratch
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == \
        sorted(job_dir(n, n).name for n in range(3))


def test_sigterm_stops_the_whole_sweep_and_prints_the_sweep_resume_command(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *COMMON, "train.iterations=100000", f"hydra.sweep.dir={sweep}"]
    process, stderr = sigterm_once(cli_command(*args), lambda process: wait_for_job_rows(process, sweep))
    assert process.returncode == 128 + signal.SIGTERM, stderr
    line = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"maml-run: stopped by SIGTERM at iteration \d+/100000; saved \S+/0_\S+/checkpoints/last\.pt; "
                        rf"resume with: maml-run -m seed=0,1 .*train\.resume=true hydra\.sweep\.dir={re.escape(str(sweep))}",
                        line), line
    assert not list(sweep.glob("1_*")), "the sweep went on to the next job after SIGTERM"
