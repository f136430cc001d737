"""Test-time evaluation: adapt to each held-out task, report mean and 95 % confidence interval; or the same for the
averaged outputs of several checkpoints (`evaluate_ensemble`, eval.checkpoint=ensemble)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .algorithms.base import MetaAlgorithm
from .checkpoint import load_algorithm
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
    return _result(losses, accs, inner_steps)


def evaluate_ensemble(algorithm: MetaAlgorithm, members: Sequence[Path], tasks: Callable[[], Iterable[Task]],
                      inner_steps: int, device) -> EvalResult:
    """Per-task query loss / accuracy of an ensemble (eval.checkpoint=ensemble): each member checkpoint is loaded
    into `algorithm` in turn and adapted to every task with `inner_steps` steps; a task's query outputs (logits, or
    the regression outputs) are averaged over the members, and its loss and accuracy computed from that average
    (HowToTrainYourMAMLPytorch: `np.mean(per_model_per_batch_preds, axis=0)`, then the argmax).

    Arguments:
        members: checkpoint files written by maml-run for `algorithm`'s config (checkpoint.load_algorithm reads them).
        tasks: returns a fresh iterator over the same fixed test tasks on each call (one pass per member), e.g.
            `lambda: source.iter_fixed_tasks(n, seed)`: only the per-task outputs are held, not the tasks.
    The sums are float64; the mean goes back to the outputs' dtype before scoring, so one member scores exactly as
    `evaluate` on that checkpoint does.
    """
    if not members:
        raise ValueError("evaluate_ensemble needs at least one member checkpoint")
    was_training = algorithm.training
    sums: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    dtype = None
    try:
        for index, path in enumerate(members):
            load_algorithm(algorithm, path, map_location=device)
            algorithm.eval()
            seen = 0
            for seen, task in enumerate(tasks(), start=1):
                task = task.to(device)
                outputs = algorithm.query_predictions(task, inner_steps)
                dtype = outputs.dtype
                if index == 0:
                    sums.append(outputs.to(torch.float64))
                    targets.append(task.query_y)
                elif seen <= len(sums):
                    sums[seen - 1] += outputs.to(torch.float64)
            if seen != len(sums):  # the task stream must be the same for every member
                raise RuntimeError(f"ensemble member {path} saw {seen} test tasks, the first member {len(sums)}")
    finally:
        algorithm.train(was_training)
    losses, accs = [], []
    for total, target in zip(sums, targets):
        loss, acc = algorithm.score((total / len(members)).to(dtype), target)
        losses.append(loss)
        accs.append(acc)
    return _result(losses, accs, inner_steps)


def _result(losses: list[float], accs: list[float], inner_steps: int) -> EvalResult:
    losses = np.asarray(losses)
    diverged = int((~np.isfinite(losses)).sum())
    if diverged:  # the mean becomes nan: say why instead of leaving a bare nan in the tables
        log.warning("%d of %d tasks gave a non-finite query loss after %d inner steps: adaptation diverged (inner "
                    "learning rates too large for this many steps?)", diverged, losses.size, inner_steps)
    return EvalResult(losses, np.asarray(accs))
