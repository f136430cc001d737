"""What a run tells the person watching it: one start line, the test's progress, and an ETA that counts validation.

Used by the training loop (train.py) and the CLI; nothing here changes what is computed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

T = TypeVar("T")

# The config values the start line names (when set): what was run and at what budget.
START_KEYS = ["algorithm.name", "dataset.name", "model.name", "dataset.ways", "dataset.shots",
              "algorithm.inner_lr", "algorithm.inner_steps", "algorithm.outer_lr", "train.meta_batch_size",
              "train.iterations", "train.val_interval", "eval.inner_steps", "eval.num_tasks", "seed", "train.resume"]


def start_line(cfg: DictConfig, run_dir: str | Path, device, threads: int) -> str:
    """One line at the start of a run: where it writes, on what, and the key config values.

    Arguments: cfg: the run's config; run_dir: its directory; device: the torch device chosen; threads: torch's
    intra-op thread count. Returns the line (no trailing newline)."""
    values = []
    for key in START_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and not (key == "train.resume" and value is False):
            values.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")  # as typed
    return f"run {run_dir} | device {device} | threads {threads} | " + " ".join(values)


def eta_seconds(iteration: int, total: int, train_seconds: float, wall_seconds: float, validations_done: int,
                val_interval: int) -> float:
    """Seconds left: the training steps left at the measured seconds per step, plus the validations left at the
    measured seconds per validation (loop wall time not spent in training steps, over the validations done).

    Before the first validation the validation cost is unknown and counts as 0. Returns nan before any step."""
    if iteration <= 0:
        return math.nan
    left = max(total - iteration, 0)
    seconds = train_seconds / iteration * left
    if validations_done > 0:
        # Validations still to come: every val_interval iterations and at the end (train.py's rule).
        future = total // val_interval - iteration // val_interval + (left > 0 and total % val_interval != 0)
        seconds += max(wall_seconds - train_seconds, 0.0) / validations_done * future
    return seconds


def format_eta(seconds: float) -> str:
    return "?" if not math.isfinite(seconds) else tqdm.format_interval(seconds)


def test_progress(tasks: Iterable[T], total: int, description: str = "test") -> Iterator[T]:
    """`tasks` with a progress bar (no bar without a terminal: TQDM_DISABLE, or disable=None on a pipe); the
    bar closes when the test ends."""
    with tqdm(tasks, total=total, desc=description, unit="task", dynamic_ncols=True, mininterval=1.0,
              disable=None, leave=False) as bar:
        yield from bar
