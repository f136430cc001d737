"""What records a training run: metrics.csv, results.csv, test_tasks.csv, TensorBoard events, the progress bar and
the progress lines of the log. The loop (train.py) says what happened; these say it in their files.

Each recorder is small and independent; none of them changes a number the run computes.

Extending TensorBoard (e.g. HParams, figures): add a method to `TensorBoard` that writes through `self.writer`
(a `torch.utils.tensorboard.SummaryWriter`) and call it from `Trainer` where the values
exist: `Trainer.fit` holds the recorder from the first to the last training step (`tensorboard` there), and
`Trainer.test` has the results row. Keep the event tags stable (`train/...`, `val/...`): curves of resumed runs
continue under them.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from tqdm import tqdm

from . import runlog
from .io import write_csv

# The training log: these lines keep the logger name they have always had (`[maml_runner.train]` in cli.log).
log = logging.getLogger("maml_runner.train")

METRICS_FILE, RESULTS_FILE, TEST_TASKS_FILE = "metrics.csv", "results.csv", "test_tasks.csv"
METRICS_COLUMNS = ["iteration", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_loss_ci95",
                   "val_accuracy_ci95", "grad_norm", "elapsed_seconds"]
# results.csv: the run's config keys (train.result_columns puts them first), then these.
# best_val_*: the lowest validation loss reached and the validation accuracy there (what best.pt holds); the value a
# sweep returns to Hydra's sweeper (cli.sweep_objective), so tuning never looks at the test tasks.
RESULT_METRIC_COLUMNS = ["metric", "mean", "ci95", "test_loss", "test_loss_ci95", "test_accuracy",
                         "test_accuracy_ci95", "n_tasks", "checkpoint", "best_val_loss", "best_val_accuracy",
                         "iterations_done", "train_seconds", "seconds_per_iteration", "peak_memory_mb", "device"]
TEST_TASKS_COLUMNS = ["task", "loss", "accuracy"]


class MetricsCsv:
    """metrics.csv: one row per validation (METRICS_COLUMNS), rewritten whole and atomically after each, so a
    killed run leaves a complete table."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / METRICS_FILE

    def write(self, rows: list[dict]) -> None:
        write_csv(self.path, rows, METRICS_COLUMNS)


class ResultsCsv:
    """One results row (`columns`: the config keys, then RESULT_METRIC_COLUMNS): results.csv of a run, or the
    results_eval_*.csv of an eval.only re-test."""

    def __init__(self, path: str | Path, columns: list[str]):
        self.path, self.columns = Path(path), columns

    def write(self, row: dict) -> None:
        write_csv(self.path, [row], self.columns)


class TestTasksCsv:
    """Per-task test values (task index in the fixed test order, loss, accuracy): paired comparisons between runs
    tested on the same tasks (eval.seed) need them."""

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, result) -> None:
        """`result`: the `evaluate.EvalResult` of the test."""
        write_csv(self.path, result.task_rows(), TEST_TASKS_COLUMNS)


class TensorBoard:
    """TensorBoard events under `<run dir>/tb`: train/<stat> every train.log_interval iterations, val/loss and
    val/accuracy at each validation. See the module docstring for adding more."""

    def __init__(self, log_dir: str | Path, purge_step: int):
        """`purge_step`: the first step this run writes; events a killed run wrote from there on are dropped (they
        came after the checkpoint being continued)."""
        from torch.utils.tensorboard import SummaryWriter  # slow import: only runs that train pay it

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def train_step(self, iteration: int, stats: dict, seconds_per_iteration: float) -> None:
        """The algorithm's step statistics (its extra ones included; non-finite values are left out)."""
        for key, value in stats.items():
            if key != "finite" and math.isfinite(value):
                self.writer.add_scalar(f"train/{key}", value, iteration)
        self.writer.add_scalar("train/seconds_per_iteration", seconds_per_iteration, iteration)

    def validation(self, row: dict) -> None:
        """One metrics.csv row; written to disk at once (a validation is where a killed run continues from)."""
        for key in ("val_loss", "val_accuracy"):
            if math.isfinite(row[key]):
                self.writer.add_scalar(f"val/{key[4:]}", row[key], row["iteration"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class Progress:
    """The tqdm bar on a terminal; without one (a log file, a cluster job) a log line every 1/20 of the run. Also
    the log line of each validation."""

    def __init__(self, total: int, initial: int, description: str, val_interval: int):
        self.total, self.val_interval = total, val_interval
        self.bar = tqdm(total=total, initial=initial, desc=description, unit="it", dynamic_ncols=True,
                        mininterval=1.0, disable=None,  # the ETA is in the postfix (runlog.eta_seconds)
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}, {rate_fmt}{postfix}]")

    def step(self, iteration: int, loss: float, best_val_loss: float, train_seconds: float, wall_seconds: float,
             validations_done: int) -> None:
        """After training step `iteration` (1-based) with loss `loss`; `train_seconds` spent in steps so far,
        `wall_seconds` in the loop (validation included), `validations_done` validations so far (ETA)."""
        eta = runlog.format_eta(runlog.eta_seconds(iteration, self.total, train_seconds, wall_seconds,
                                                   validations_done, self.val_interval))
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", best_val=f"{best_val_loss:.4f}", ETA=eta, refresh=False)
        if self.bar.disable and iteration % max(1, self.total // 20) == 0:  # no terminal: progress in the log
            log.info("iter %d/%d | loss %.4f | %.3f s/it | ETA %s (validation included)", iteration, self.total, loss,
                     train_seconds / iteration, eta)

    @staticmethod
    def validation(row: dict, improved: bool, train_seconds: float, validated: bool = True) -> None:
        """The log line of one validation (`row`: its metrics.csv row; `validated=False`: the run has no validation
        split, the line has the training averages only)."""
        if not validated:
            log.info("iter %d: train loss %.4f | no validation (dataset.split has no validation characters) | "
                     "%.1fs", row["iteration"], row["train_loss"], train_seconds)
            return
        accuracy = "" if math.isnan(row["val_accuracy"]) else f" acc {100 * row['val_accuracy']:.2f}%"
        log.info("iter %d: train loss %.4f | val loss %.4f%s%s | %.1fs", row["iteration"], row["train_loss"],
                 row["val_loss"], accuracy, " (best)" if improved else "", train_seconds)

    def close(self) -> None:
        self.bar.close()
