"""Test-time evaluation: adapt to each held-out task, report mean and 95 % confidence interval."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from .algorithms.base import MetaAlgorithm
from .data.base import Task

log = logging.getLogger(__name__)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and normal-approximation 95 % CI half-width (1.96 * std / sqrt(n)), as in Finn et al. 2017."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return float("nan"), float("nan")
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * std / math.sqrt(values.size))


@dataclass
class EvalResult:
    losses: np.ndarray
    accuracies: np.ndarray

    @property
    def n_tasks(self) -> int:
        return int(self.losses.size)

    @property
    def loss(self) -> tuple[float, float]:
        return mean_ci95(self.losses)

    @property
    def accuracy(self) -> tuple[float, float]:
        return mean_ci95(self.accuracies)

    def task_rows(self) -> list[dict]:
        """One row per task (index in the fixed test order, loss, accuracy): for paired comparisons."""
        return [{"task": i, "loss": float(loss), "accuracy": float(acc)}
                for i, (loss, acc) in enumerate(zip(self.losses, self.accuracies))]

    def summary(self, prefix: str) -> dict[str, float]:
        (loss, loss_ci), (acc, acc_ci) = self.loss, self.accuracy
        return {f"{prefix}_loss": loss, f"{prefix}_loss_ci95": loss_ci,
                f"{prefix}_accuracy": acc, f"{prefix}_accuracy_ci95": acc_ci}


def evaluate(algorithm: MetaAlgorithm, tasks: list[Task], inner_steps: int, device) -> EvalResult:
    """Per-task query loss / accuracy after `inner_steps` adaptation steps on each task's support set."""
    was_training = algorithm.training
    algorithm.eval()
    losses, accs = [], []
    try:
        for task in tasks:
            loss, acc = algorithm.evaluate_task(task.to(device), inner_steps)
            losses.append(loss)
            accs.append(acc)
    finally:
        algorithm.train(was_training)
    losses = np.asarray(losses)
    diverged = int((~np.isfinite(losses)).sum())
    if diverged:  # the mean becomes nan: say why instead of leaving a bare nan in the tables
        log.warning("%d of %d tasks gave a non-finite query loss after %d inner steps: adaptation diverged (inner "
                    "learning rates too large for this many steps?)", diverged, losses.size, inner_steps)
    return EvalResult(losses, np.asarray(accs))
