"""Every algorithm resumes exactly: learned inner rates, schedules (Reptile's annealed step, MAML++'s cosine lr,
MSL weights, DA switch) and optimizer state come back from last.pt, so a stopped-and-resumed run ends with the
same parameters and results as the run done in one go."""
from __future__ import annotations

import signal

import pytest
import torch

from conftest import compose_config
from maml_runner.algorithms import available_algorithms
from maml_runner.checkpoint import load_checkpoint
from maml_runner.io import read_csv
from maml_runner.train import StopRequested, build, run

COMMON = ["train.iterations=12", "train.val_interval=4", "train.val_tasks=4", "train.meta_batch_size=3",
          "eval.num_tasks=6", "eval.inner_steps=2", "hardware=cpu", "hardware.threads=1", "hardware.deterministic=true",
          "algorithm.inner_steps=2", "algorithm.inner_lr=0.01", "model.hidden=[16,16]"]
TIMING = {"train_seconds", "seconds_per_iteration", "peak_memory_mb", "elapsed_seconds"}


def stop_at(monkeypatch, iteration: int) -> None:
    """Make the next Trainer act as if SIGTERM arrived during `iteration` (it saves last.pt and stops)."""
    original = build

    def stopping_build(cfg, run_dir):
        trainer = original(cfg, run_dir)
        step = trainer.algorithm.train_step

        def train_step(batch, i):
            if i + 1 == iteration:
                trainer.signals.received = signal.SIGTERM
            return step(batch, i)

        trainer.algorithm.train_step = train_step
        return trainer

    monkeypatch.setattr("maml_runner.train.build", stopping_build)


@pytest.mark.parametrize("name", available_algorithms())
def test_stop_and_resume_matches_one_go(name, tmp_path, monkeypatch):
    cfg = compose_config([f"algorithm={name}", *COMMON])
    run(cfg, tmp_path / "one_go")
    with monkeypatch.context() as patch:
        stop_at(patch, 6)  # between two validations: the running sums and sampler state must survive too
        with pytest.raises(StopRequested):
            run(cfg, tmp_path / "stopped")
    assert load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["iteration"] == 6
    run(compose_config([f"algorithm={name}", *COMMON, f"train.resume={tmp_path / 'stopped'}"]), tmp_path / "other")
    for file in ("metrics.csv", "results.csv"):
        got, want = (read_csv(tmp_path / d / file, typed=True) for d in ("stopped", "one_go"))
        assert len(got) == len(want)
        for got_row, want_row in zip(got, want):
            for key, value in want_row.items():
                if key not in TIMING:
                    assert got_row[key] == (pytest.approx(value, rel=1e-6, nan_ok=True)
                                            if isinstance(value, float) else value), (file, key)
    got, want = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt")["algorithm"] for d in ("stopped", "one_go"))
    for key, value in want["parameters"].items():
        torch.testing.assert_close(got["parameters"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    if want["scheduler"] is not None:
        assert got["scheduler"]["last_epoch"] == want["scheduler"]["last_epoch"] == 12
