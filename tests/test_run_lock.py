"""One writer per run directory: a second maml-run aimed at a directory in use stops at once with one line naming
the directory and the holder's pid, writes nothing there, and leaves the first run's results untouched; the lock
dies with its process (kill -9 leaves nothing stale); one process may take a directory it holds again."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, cli_command, cli_env, compose_config, run_cli
from maml_runner import runlock
from maml_runner.io import read_csv
from maml_runner.train import run
from test_bad_input import assert_one_line_error

# A few seconds of sinusoid on one thread.
SHORT = ["train.iterations=200", "train.val_interval=50", "train.val_tasks=10", "train.meta_batch_size=5",
         "eval.num_tasks=20", "hardware=cpu", "hardware.threads=1", "hardware.deterministic=true",
         "report.enabled=false"]
LOCK = runlock.LOCK_NAME


def in_use(directory: Path, pid: int) -> str:
    return re.escape(f"run directory '{directory}' is in use by another maml-run (pid {pid}); wait for it to finish, "
                     f"or write somewhere else (hydra.run.dir=..., hydra.sweep.dir=... with -m)")


def wait_for_lock(process: subprocess.Popen, directory: Path, timeout: float = 120) -> None:
    """Block until `process` holds `directory` (its pid is in the lock file)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (directory / LOCK).read_text().strip() == str(process.pid):
                return
        except FileNotFoundError:
            pass
        assert process.poll() is None, f"the run exited (code {process.returncode}) before it held {directory}"
        assert time.monotonic() < deadline, f"no lock on {directory} within {timeout} s"
        time.sleep(0.01)


def snapshot(directory: Path) -> dict:
    """Every file under `directory` with its bytes and mtime (what 'wrote nothing' compares)."""
    return {p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in directory.rglob("*") if p.is_file()}


def another_process_tries(directory: Path) -> str:
    """Acquiring `directory` in a fresh process: 'held' or the error line (released as that process exits)."""
    code = ("import sys; from maml_runner import runlock\n"
            "try:\n    runlock.acquire(sys.argv[1]); print('held')\n"
            "except runlock.DirectoryInUse as exc:\n    print(exc)")
    done = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def held_by_another_process(tmp_path):
    """A helper process holding a directory through runlock (cheap: no torch), released at the end of the test."""
    processes = []

    def hold(directory: Path) -> subprocess.Popen:
        code = ("import sys, time; from maml_runner import runlock; runlock.acquire(sys.argv[1]); "
                "print('held', flush=True); time.sleep(600)")
        process = subprocess.Popen([sys.executable, "-c", code, str(directory)], cwd=REPO, stdout=subprocess.PIPE,
                                   text=True)
        processes.append(process)
        assert process.stdout.readline().strip() == "held"
        return process

    yield hold
    for process in processes:
        process.kill()
        process.wait(timeout=30)


# ---- the lock itself -----------------------------------------------------------------------------------
def test_the_same_process_taking_a_directory_again_is_a_no_op_until_the_last_release(tmp_path, held_by_another_process):
    directory = tmp_path / "run"
    lock = runlock.acquire(directory)
    try:
        assert lock == directory / LOCK and lock.read_text().strip() == str(os.getpid())
        assert runlock.acquire(directory) == lock  # flock on a second open() here would refuse: no error is the point
        runlock.release(directory)
        assert os.path.realpath(directory) in runlock.held()  # one hold left: still ours
        assert re.fullmatch(in_use(directory, os.getpid()), another_process_tries(directory))
    finally:
        runlock.release(directory)
    assert os.path.realpath(directory) not in runlock.held() and not lock.exists()
    helper = held_by_another_process(directory)  # released: another process takes it at once
    with pytest.raises(runlock.DirectoryInUse) as raised:
        runlock.acquire(directory)
    assert raised.value.pid == helper.pid and str(directory) in str(raised.value)


def test_run_releases_its_directory_when_it_returns(tmp_path):
    run(compose_config([*SHORT, "train.iterations=4", "train.val_interval=2", "eval.num_tasks=4"]), tmp_path)
    assert runlock.held() == [] and not (tmp_path / LOCK).exists()


# ---- through the CLI -------------------------------------------------------------------------------------
def test_second_run_on_a_directory_in_use_stops_writes_nothing_and_the_first_finishes_as_if_alone(tmp_path):
    run_dir, alone = tmp_path / "shared", tmp_path / "alone"
    first = subprocess.Popen(cli_command(*SHORT, f"hydra.run.dir={run_dir}"), cwd=REPO, env=cli_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_lock(first, run_dir)
        first.send_signal(signal.SIGSTOP)  # frozen while holding the lock: nothing changes under the second run
        try:
            before = snapshot(run_dir)
            second = run_cli(*SHORT, "seed=7", f"hydra.run.dir={run_dir}")
            assert_one_line_error(second, in_use(run_dir, first.pid))
            assert snapshot(run_dir) == before  # no .hydra/overrides.yaml with seed=7, no cli.log line, nothing
        finally:
            first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr
    assert "seed=7" not in (run_dir / ".hydra/overrides.yaml").read_text()
    assert not (run_dir / LOCK).exists()  # released when the run ended
    reference = run_cli(*SHORT, f"hydra.run.dir={alone}")
    assert reference.returncode == 0, reference.stderr
    got, want = (read_csv(d / "results.csv", typed=True)[0] for d in (run_dir, alone))
    assert (got["mean"], got["ci95"], got["test_loss"]) == (want["mean"], want["ci95"], want["test_loss"])


def test_sigkill_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.Popen(cli_command(*SHORT, "train.iterations=100000", f"hydra.run.dir={run_dir}"), cwd=REPO,
                             env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock(first, run_dir)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert (run_dir / LOCK).read_text().strip() == str(first.pid)  # the file stays, the lock went with the process
    started = time.monotonic()
    second = run_cli(*SHORT, f"hydra.run.dir={run_dir}")
    assert second.returncode == 0, second.stderr
    assert "in use" not in second.stderr
    assert (run_dir / "results.csv").is_file() and not (run_dir / LOCK).exists()
    assert time.monotonic() - started < 240  # started at once: no waiting for a lock to time out


def test_a_sweep_directory_in_use_is_refused_before_anything_is_written(tmp_path, held_by_another_process):
    sweep = tmp_path / "sweep"
    holder = held_by_another_process(sweep)
    result = run_cli("-m", "seed=0,1", *SHORT, f"hydra.sweep.dir={sweep}")
    assert_one_line_error(result, in_use(sweep, holder.pid))
    assert sorted(p.name for p in sweep.iterdir()) == [LOCK]  # no job directory, no multirun.yaml


def test_resuming_into_a_directory_in_use_is_refused(tmp_path, held_by_another_process):
    """train.resume=<dir> writes into <dir> (not hydra.run.dir): train.run locks it before writing."""
    source = tmp_path / "source"
    run(compose_config([*SHORT, "train.iterations=4", "train.val_interval=2", "eval.num_tasks=4"]), source)
    before = snapshot(source)
    holder = held_by_another_process(source)
    result = run_cli(*SHORT, "train.iterations=8", "train.val_interval=2", "eval.num_tasks=4",
                     f"train.resume={source}", f"hydra.run.dir={tmp_path / 'fresh'}")
    assert_one_line_error(result, in_use(source, holder.pid))
    after = snapshot(source)
    assert after.pop(Path(LOCK))[0] == f"{holder.pid}\n".encode() and after == before
