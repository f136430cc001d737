"""Shared test helpers: compose configs the way `maml-run` does, and keep torch to one thread."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import maml_runner  # noqa: F401 - registers the config schemas (maml_runner/schema.py) that conf/ names

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")

torch.set_num_threads(1)


def compose_config(overrides=()):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tiny_sinusoid_cfg():
    """A sinusoid run that trains in about a second."""
    return compose_config(["train.iterations=20", "train.val_interval=10", "train.val_tasks=8",
                           "train.meta_batch_size=4", "eval.num_tasks=16", "hardware=cpu", "hardware.threads=1"])


def cli_command(*overrides: str) -> list[str]:
    """`maml-run <overrides>` as the installed entry point runs it (`python -m maml_runner.cli`)."""
    import sys
    return [sys.executable, "-m", "maml_runner.cli", *overrides]


def cli_env() -> dict:
    """The environment for CLI subprocesses: Hydra's own error reporting, no CUDA, quiet progress bars."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    return env


def run_cli(*overrides: str, timeout: float = 300):
    """Run `maml-run` to completion from the repository root; returns the CompletedProcess (text mode)."""
    import subprocess
    return subprocess.run(cli_command(*overrides), cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


TIMING_COLUMNS = {"train_seconds", "seconds_per_iteration", "peak_memory_mb", "elapsed_seconds"}


def assert_same_csv_rows(run_dir, reference_dir, names=("metrics.csv", "results.csv")) -> None:
    """The named CSVs of two runs hold the same rows and columns, timing columns aside (floats to 1e-6 relative)."""
    import pytest
    from maml_runner.io import read_csv

    for name in names:
        got, want = read_csv(run_dir / name, typed=True), read_csv(reference_dir / name, typed=True)
        assert len(got) == len(want), f"{name}: {len(got)} rows, expected {len(want)}"
        for got_row, want_row in zip(got, want):
            assert got_row.keys() == want_row.keys(), name
            for key, expected in want_row.items():
                if key in TIMING_COLUMNS:
                    continue
                if isinstance(expected, float):
                    assert got_row[key] == pytest.approx(expected, rel=1e-6, abs=1e-9, nan_ok=True), (name, key)
                else:
                    assert got_row[key] == expected, (name, key)


class Killed(BaseException):
    """Stands in for SIGKILL inside the process: nothing catches it."""


def run_killed_at_last_pt(cfg, run_dir, iteration: int, monkeypatch, after_write: bool = False) -> None:
    """Run `cfg` in `run_dir` until it dies at the write of checkpoints/last.pt for `iteration`: before that
    file is written (the worst moment: metrics.csv, best.pt and top/ already hold the iteration) or, with
    `after_write`, right after it."""
    from maml_runner import train as train_module
    save = train_module.save_checkpoint

    def dies(path, payload):
        at_last = Path(path).name == "last.pt" and payload["iteration"] == iteration
        if at_last and not after_write:
            raise Killed
        written = save(path, payload)
        if at_last:
            raise Killed
        return written

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_checkpoint", dies)
        with pytest.raises(Killed):
            train_module.run(cfg, run_dir)
