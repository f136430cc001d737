"""Slurm requeue, resume half, on submitit's local executor: SIGUSR2 (what Slurm sends before a time limit or at a
preemption) to a running `hydra/launcher=local_submitit` job makes maml-run save last.pt and submitit requeue the
job; the restarted job resumes last.pt (the preset sets MAML_RUN_RESUME) and ends with the numbers of the same run
done in one go."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_same_csv_rows, cli_command, cli_env, compose_config
from maml_runner.checkpoint import load_checkpoint
from maml_runner.io import read_csv
from maml_runner.train import run

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the [sweeps] extra is not installed")

COMMON = ["train.iterations=300", "train.val_interval=20", "train.val_tasks=10", "train.meta_batch_size=5",
          "eval.num_tasks=20", "hardware=cpu", "hardware.threads=1", "hardware.deterministic=true",
          "report.enabled=false"]


def job_processes(sweep: Path) -> list[int]:
    """Pids of the submitit task processes (`python -m submitit.core._submit <sweep>/.submitit/...`) of this sweep."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in argv and any(str(sweep).encode() in arg for arg in argv):
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the job process through /proc (Linux)")
def test_sigusr2_requeues_a_submitit_job_which_resumes_last_pt_exactly(tmp_path):
    reference = tmp_path / "reference"
    run(compose_config(COMMON), reference)

    sweep = tmp_path / "sweep"
    sweeper = subprocess.Popen(cli_command("-m", "hydra/launcher=local_submitit", *COMMON, f"hydra.sweep.dir={sweep}"),
                               cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not any(len(read_csv(p)) >= 1 for p in sweep.glob("0_*/metrics.csv")):  # the job validated once
            assert sweeper.poll() is None, f"the sweep ended (code {sweeper.returncode}) before the job validated"
            assert time.monotonic() < deadline, "the job never validated"
            time.sleep(0.01)
        pids = job_processes(sweep)
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGUSR2)
        _, stderr = sweeper.communicate(timeout=300)
    finally:
        if sweeper.poll() is None:
            sweeper.kill()
    assert sweeper.returncode == 0, stderr[-3000:]

    job = next(sweep.glob("0_*"))
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.out")) + \
        "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "handing over to submitit to requeue this job" in logs, logs[-3000:]
    assert "Requeued job" in logs and "resumed from" in logs, logs[-3000:]
    stopped_at = int(logs.split("stopped by SIGUSR2 at iteration ")[1].split("/")[0])
    assert f"resumed from {job / 'checkpoints' / 'last.pt'} at iteration {stopped_at} " in logs
    assert 20 <= stopped_at < 300  # saved at the signal, mid-training

    assert_same_csv_rows(job, reference)
    assert load_checkpoint(job / "checkpoints" / "last.pt")["iteration"] == 300


@pytest.mark.parametrize("preset", ["slurm", "local_submitit"])
def test_submitit_presets_requeue_and_resume_without_extra_overrides(preset, monkeypatch):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from conftest import CONF_DIR

    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    assert cfg.hydra.job.env_set.MAML_RUN_RESUME == "true"  # Hydra sets it in each job: train.resume=true there
    if preset == "slurm":
        assert cfg.hydra.launcher.max_num_timeout > 0 and cfg.hydra.launcher.signal_delay_s > 0
    monkeypatch.setenv("MAML_RUN_RESUME", "true")
    assert OmegaConf.select(cfg, "train.resume") is True
    monkeypatch.delenv("MAML_RUN_RESUME")
    assert OmegaConf.select(cfg, "train.resume") is False  # plain runs: unchanged default


def test_only_a_sigusr2_stop_inside_a_submitit_job_is_handed_over(monkeypatch):
    from types import SimpleNamespace

    from maml_runner.cli import requeue_through_submitit

    calls = []

    def submitit_handler(signum, frame):  # stands in for submitit's SignalHandler.checkpoint_and_try_requeue
        calls.append(signum)
    submitit_handler.__module__ = "submitit.core.job_environment"
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        requeue_through_submitit(SimpleNamespace(signum=signal.SIGTERM))  # SIGTERM: the run just stops
        assert calls == []
        requeue_through_submitit(SimpleNamespace(signum=signal.SIGUSR2))
        assert calls == [signal.SIGUSR2]
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)  # a plain maml-run: nothing to hand over to
        requeue_through_submitit(SimpleNamespace(signum=signal.SIGUSR2))
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
