"""A training run's lifecycle around the loop: the state a checkpoint carries so that a stopped run continues
exactly (resume), SIGINT/SIGTERM handling, the train.max_minutes time budget and train.nan_policy.

train.py's loop asks these what to do; none of them trains or evaluates anything.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from .checkpoint import (BEST, LAST, best_val_loss_on_disk, config_differences, load_checkpoint, set_rng_state)
from .errors import CheckpointError, UserError
from .io import read_csv
from .recorders import METRICS_FILE, RESULTS_FILE

# The training log: these lines keep the logger name they have always had (`[maml_runner.train]` in cli.log).
log = logging.getLogger("maml_runner.train")

# With train.nan_policy=skip, this many non-finite batches in a row stop the run: the model cannot recover.
MAX_CONSECUTIVE_SKIPS = 20


def fresh_running() -> dict:
    """Training statistics accumulated since the last validation (part of the checkpoint: a stop may come mid-way)."""
    return {"loss": 0.0, "acc": 0.0, "grad_norm": 0.0, "n": 0}


@dataclass
class TrainingState:
    """Where training stands: what a checkpoint carries besides the algorithm, the RNG streams, the samplers and the
    config, so that a resumed run computes the same numbers as one that was never stopped."""

    iteration: int = 0                # training steps done
    best_val_loss: float = math.inf   # the validation loss best.pt holds
    metrics_rows: list = field(default_factory=list)  # metrics.csv so far
    running: dict = field(default_factory=fresh_running)
    consecutive_skips: int = 0        # non-finite batches in a row (train.nan_policy=skip)
    train_seconds: float = 0.0        # time in training steps (s/iter)
    wall_seconds: float = 0.0         # the training loop's wall-clock time, validation included (train.max_minutes)

    def add_step(self, stats: dict) -> None:
        """Count one finite training step (`train_step`'s statistics) in this validation interval's sums."""
        self.consecutive_skips = 0
        for key in ("loss", "acc", "grad_norm"):
            self.running[key] += stats[key]
        self.running["n"] += 1

    def end_interval(self, validation) -> dict:
        """The metrics.csv row of a validation (`validation`: its `EvalResult`, or None when the run has no
        validation split: the validation columns are nan) with this interval's training means; appends it to
        `metrics_rows` and starts the next interval's sums. Returns the row."""
        (val_loss, val_loss_ci), (val_acc, val_acc_ci) = \
            ((math.nan, math.nan), (math.nan, math.nan)) if validation is None else (validation.loss,
                                                                                     validation.accuracy)
        n = self.running["n"] or math.nan  # nan, not 0, when every batch of the interval was skipped as non-finite
        row = {"iteration": self.iteration, "train_loss": self.running["loss"] / n,
               "train_accuracy": self.running["acc"] / n, "val_loss": val_loss, "val_accuracy": val_acc,
               "val_loss_ci95": val_loss_ci, "val_accuracy_ci95": val_acc_ci,
               "grad_norm": self.running["grad_norm"] / n, "elapsed_seconds": round(self.train_seconds, 3)}
        self.running = fresh_running()  # before the checkpoints that follow: they must not carry this interval's sums
        self.metrics_rows.append(row)
        return row

    def payload(self) -> dict:
        """The checkpoint entries (keys as in every maml-run checkpoint)."""
        return {"iteration": self.iteration, "best_val_loss": self.best_val_loss, "metrics_rows": self.metrics_rows,
                "running": dict(self.running), "consecutive_skips": self.consecutive_skips,
                "train_seconds": self.train_seconds, "wall_seconds": self.wall_seconds}


def restore(payload: dict, path: Path, sources: dict, checkpoint_dir: Path) -> TrainingState:
    """Continue from a checkpoint's payload: sets the global RNG streams and the samplers' own state, and returns the
    training state. Raises `CheckpointError` (one line) when the file lacks any of it."""
    try:
        train_seconds = float(payload["train_seconds"])
        state = TrainingState(iteration=int(payload["iteration"]), metrics_rows=list(payload["metrics_rows"]),
                              train_seconds=train_seconds,
                              wall_seconds=float(payload.get("wall_seconds", train_seconds)),
                              running=dict(payload.get("running") or fresh_running()),
                              consecutive_skips=int(payload.get("consecutive_skips", 0)))
        set_rng_state(payload["rng"])
        for split, sampler_state in payload.get("samplers", {}).items():
            sources[split].load_state_dict(sampler_state)
        # best.pt may be better than what last.pt knows (a kill between writing the two): never replace it
        # with something worse.
        state.best_val_loss = min(float(payload["best_val_loss"]), best_val_loss_on_disk(checkpoint_dir))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint '{path}' lacks resume state ({type(exc).__name__}: {exc}); "
                              f"resume from a {LAST} written by maml-run") from None
    return state


def best_validation(metrics_rows: list[dict]) -> tuple[float, float]:
    """(lowest finite validation loss, validation accuracy at that validation); nan, nan before any.

    The first of equal losses wins, as in `Trainer._validate` (best.pt is replaced only by a strictly lower loss).
    """
    finite = [row for row in metrics_rows if math.isfinite(float(row["val_loss"]))]
    if not finite:
        return math.nan, math.nan
    best = min(finite, key=lambda row: float(row["val_loss"]))
    return float(best["val_loss"]), float(best["val_accuracy"])


def finished_results(cfg: DictConfig, run_dir: Path, checkpoint: Path) -> dict | None:
    """The results row of a run that already finished with this config (a resumed sweep skips such jobs)."""
    results = run_dir / RESULTS_FILE
    if not results.is_file():
        return None
    state = load_checkpoint(checkpoint)
    if int(state.get("iteration", -1)) < int(cfg.train.iterations) or config_differences(state.get("config", {}), cfg):
        return None
    rows = read_csv(results, typed=True)
    if len(rows) != 1:
        return None
    row = rows[0]
    if row.get("best_val_loss") is None and (run_dir / METRICS_FILE).is_file():  # results.csv from before the column
        row["best_val_loss"], row["best_val_accuracy"] = best_validation(read_csv(run_dir / METRICS_FILE, typed=True))
    return row


# ---- train.nan_policy --------------------------------------------------------------------------------------
def last_good_checkpoint(metrics_rows: list[dict], last_saved_iteration: int | None, checkpoint_dir: Path,
                         validated: bool = True) -> str:
    """The newest checkpoint on disk whose validation loss was finite (the state to go back to), as a phrase.
    `validated=False` (no validation split): last.pt, the only checkpoint such a run writes (the loop stops or skips
    at the first non-finite step, so the saved parameters are finite)."""
    if not validated:
        if last_saved_iteration is None:
            return "no checkpoint saved yet (no validation split: last.pt is written every train.val_interval)"
        return f"last good checkpoint: {checkpoint_dir / LAST} (iteration {last_saved_iteration}; no validation split)"
    finite = [row for row in metrics_rows if math.isfinite(row["val_loss"])]
    if not finite:
        return "no checkpoint with a finite validation loss yet"
    newest = finite[-1]
    if newest is metrics_rows[-1] and last_saved_iteration == newest["iteration"]:
        name, row = LAST, newest
    else:  # last.pt holds a non-finite validation (or a stop between validations): best.pt is the good one
        name, row = BEST, min(finite, key=lambda r: r["val_loss"])
    return f"last good checkpoint: {checkpoint_dir / name} (iteration {row['iteration']}, " \
           f"val loss {row['val_loss']:.4g})"


class NanPolicy:
    """train.nan_policy: `stop` ends the run at the first non-finite training loss or gradient; `skip` skips such
    batches (the algorithm did not apply them) until MAX_CONSECUTIVE_SKIPS come in a row."""

    def __init__(self, policy: str):
        self.policy = str(policy)

    def non_finite(self, stats: dict, state: TrainingState, last_good: str) -> None:
        """Training step `state.iteration` was not finite: raise `UserError` (one line naming `last_good`, the
        checkpoint to go back to) or count the skip and log it."""
        advice = "lower algorithm.outer_lr/inner_lr or set train.grad_clip" + \
            (" (or train.nan_policy=skip to skip such batches)" if self.policy == "stop" else "")
        message = (f"non-finite training loss ({stats['loss']}) or gradient norm ({stats['grad_norm']}) at iteration "
                   f"{state.iteration}; {last_good}; {advice}")
        if self.policy == "stop":
            raise UserError(message)
        state.consecutive_skips += 1
        if state.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise UserError(f"{MAX_CONSECUTIVE_SKIPS} non-finite batches in a row (train.nan_policy=skip): {message}")
        log.warning("skipped batch: %s", message)


# ---- train.max_minutes -------------------------------------------------------------------------------------
class TimeBudget:
    """train.max_minutes: the training loop's wall-clock time, validation included and summed over resumes."""

    def __init__(self, max_minutes, spent_before: float):
        """`max_minutes`: the config value (None: no budget); `spent_before`: seconds of earlier attempts."""
        self.max_minutes = max_minutes
        self.seconds = math.inf if max_minutes is None else 60 * float(max_minutes)
        self.spent_before, self.started = spent_before, time.perf_counter()

    def spent(self) -> float:
        """Seconds of the budget used so far."""
        return self.spent_before + time.perf_counter() - self.started

    def log_stop(self, spent: float, iteration: int, total: int) -> None:
        log.info("train.max_minutes=%s reached after %.0f s at iteration %d/%d: stopping training", self.max_minutes,
                 spent, iteration, total)


# ---- SIGINT / SIGTERM --------------------------------------------------------------------------------------
class StopRequested(Exception):
    """SIGINT/SIGTERM/SIGUSR2 arrived; `last.pt` has been written. The CLI adds the command that resumes."""

    def __init__(self, message: str, signum: int, run_dir: Path):
        super().__init__(message)
        self.signum, self.run_dir = signum, run_dir


class StopSignals:
    """While entered: SIGINT/SIGTERM/SIGUSR2 ask the loop to stop after the current iteration (`received` holds the signal;
    the loop saves last.pt and raises `stop_requested()`); a second one stops at once. Outside the main thread
    (e.g. a threaded launcher) the default handlers stay."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            # SIGUSR2: Slurm's warning before a time limit / preemption (submitit); the CLI then lets submitit requeue.
            self._previous = {s: signal.signal(s, self._on_signal)
                              for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self.received is not None:  # a second Ctrl-C: stop now (checkpoint writes are atomic)
            raise KeyboardInterrupt
        self.received = signum
        log.warning("received %s: stopping after this iteration and saving %s (press again to stop now)",
                    signal.Signals(signum).name, LAST)

    def stop_requested(self, iteration: int, total: int, saved: Path, run_dir: Path) -> StopRequested:
        """The exception that ends the run once `saved` (last.pt) holds `iteration`."""
        return StopRequested(f"stopped by {signal.Signals(self.received).name} at iteration {iteration}/{total}; "
                             f"saved {saved}", self.received, run_dir)
