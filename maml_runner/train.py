"""The one training loop: meta-train, validate on fixed tasks, checkpoint best/last, resume, then test."""
from __future__ import annotations

import copy
import logging
import math
import resource
import signal
import threading
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from tqdm import tqdm

from . import config as config_checks
from . import runlock
from .algorithms import build_algorithm
from .algorithms.base import MetaAlgorithm
from .checkpoint import (LAST, best_val_loss_on_disk, checkpoint_run_dir, config_differences,
                         find_resume_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state)
from .data import build_sources
from .data.base import EpisodeSource
from .data.fast_episodes import cached_episodes
from .errors import CheckpointError, UserError
from .evaluate import evaluate
from .hardware import configure
from .io import read_csv, write_csv
from .models import build_model

log = logging.getLogger(__name__)

METRICS_COLUMNS = ["iteration", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_loss_ci95",
                   "val_accuracy_ci95", "grad_norm", "elapsed_seconds"]
# best_val_*: the lowest validation loss reached and the validation accuracy there (what best.pt holds); the value a
# sweep returns to Hydra's sweeper (cli.sweep_objective), so tuning never looks at the test tasks.
RESULT_METRIC_COLUMNS = ["metric", "mean", "ci95", "test_loss", "test_loss_ci95",
                         "test_accuracy", "test_accuracy_ci95", "n_tasks", "checkpoint", "best_val_loss",
                         "best_val_accuracy", "iterations_done",
                         "train_seconds", "seconds_per_iteration", "peak_memory_mb", "device"]


def result_columns(cfg: DictConfig) -> list[str]:
    """results.csv's columns: the config keys of this run's algorithm and data (config.result_fields), then the
    metrics."""
    return [*config_checks.result_fields(cfg), *RESULT_METRIC_COLUMNS]


TEST_TASKS_FILE = "test_tasks.csv"
TEST_TASKS_COLUMNS = ["task", "loss", "accuracy"]


class StopRequested(Exception):
    """SIGINT/SIGTERM arrived; `last.pt` has been written. The CLI adds the command that resumes."""

    def __init__(self, message: str, signum: int, run_dir: Path):
        super().__init__(message)
        self.signum, self.run_dir = signum, run_dir


# With train.nan_policy=skip, this many non-finite batches in a row stop the run: the model cannot recover.
MAX_CONSECUTIVE_SKIPS = 20


def best_validation(metrics_rows: list[dict]) -> tuple[float, float]:
    """(lowest finite validation loss, validation accuracy at that validation); nan, nan before any.

    The first of equal losses wins, as in `Trainer._validate` (best.pt is replaced only by a strictly lower loss).
    """
    finite = [row for row in metrics_rows if math.isfinite(float(row["val_loss"]))]
    if not finite:
        return math.nan, math.nan
    best = min(finite, key=lambda row: float(row["val_loss"]))
    return float(best["val_loss"]), float(best["val_accuracy"])


def _fresh_running() -> dict:
    """Training statistics accumulated since the last validation (part of the checkpoint: a stop may come mid-way)."""
    return {"loss": 0.0, "acc": 0.0, "grad_norm": 0.0, "n": 0}


def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory count (sweep jobs share one process: the process-wide peak would carry over)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets the resident-set high-water mark VmHWM
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since `reset_peak_memory`: max allocated on CUDA, resident set size (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; process-wide peak


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, algorithm: MetaAlgorithm,
                 sources: dict[str, EpisodeSource], device: torch.device):
        self.cfg, self.run_dir, self.algorithm, self.sources, self.device = cfg, Path(run_dir), algorithm, sources, device
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.iteration = 0
        self.best_val_loss = math.inf
        self.metrics_rows: list[dict] = []
        self.train_seconds = 0.0  # time in training steps (s/iter)
        self.wall_seconds = 0.0   # the training loop's wall-clock time, validation included (train.max_minutes)
        self.running = _fresh_running()
        self.consecutive_skips = 0
        self.last_checkpoint_iteration: int | None = None  # named when training has to stop on NaN
        self._stop_signal: int | None = None

    # ---- checkpoints -----------------------------------------------------------------------------------
    def state(self) -> dict:
        # Task samplers with their own RNG (beyond the global streams in `rng`) expose state_dict/load_state_dict.
        samplers = {split: source.state_dict() for split, source in self.sources.items()
                    if hasattr(source, "state_dict")}
        return {"algorithm": self.algorithm.checkpoint_state(), "iteration": self.iteration,
                "best_val_loss": self.best_val_loss, "metrics_rows": self.metrics_rows,
                "running": dict(self.running), "consecutive_skips": self.consecutive_skips,
                "train_seconds": self.train_seconds,
                "wall_seconds": self.wall_seconds, "rng": rng_state(), "samplers": samplers,
                "config": OmegaConf.to_container(self.cfg, resolve=True)}

    def save(self, name: str) -> Path:
        if name == LAST:
            self.last_checkpoint_iteration = self.iteration
        return save_checkpoint(self.checkpoint_dir / name, self.state())

    def _load_algorithm(self, path: Path) -> dict:
        """Load a checkpoint's meta-parameters/optimizer; a mismatch with this config is one clear line."""
        state = load_checkpoint(path, map_location=self.device)
        try:
            self.algorithm.load_checkpoint_state(state["algorithm"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            # torch's message starts "Error(s) in loading state_dict for X:"; the first line after it says what.
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
            detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
            raise CheckpointError(f"checkpoint '{path}' does not fit this config (algorithm/model/dataset differ): "
                                  f"{detail}") from None
        return state

    def resume(self, path: Path) -> None:
        state = self._load_algorithm(path)
        differences = config_differences(state.get("config", {}), self.cfg)
        if differences:
            log.warning("resuming %s with a different config: %s", path, "; ".join(differences))
        try:
            self.iteration = self.last_checkpoint_iteration = int(state["iteration"])
            self.metrics_rows = list(state["metrics_rows"])
            self.train_seconds = float(state["train_seconds"])
            self.wall_seconds = float(state.get("wall_seconds", self.train_seconds))
            self.running = dict(state.get("running") or _fresh_running())
            self.consecutive_skips = int(state.get("consecutive_skips", 0))
            set_rng_state(state["rng"])
            for split, sampler_state in state.get("samplers", {}).items():
                self.sources[split].load_state_dict(sampler_state)
            # best.pt may be better than what last.pt knows (a kill between writing the two): never replace it
            # with something worse.
            self.best_val_loss = min(float(state["best_val_loss"]), best_val_loss_on_disk(self.checkpoint_dir))
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint '{path}' lacks resume state ({type(exc).__name__}: {exc}); "
                                  f"resume from a {LAST} written by maml-run") from None
        write_csv(self.run_dir / "metrics.csv", self.metrics_rows, METRICS_COLUMNS)
        log.info("resumed from %s at iteration %d (best val loss %.4f)", path, self.iteration, self.best_val_loss)

    # ---- loop --------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: stop now (checkpoint writes are atomic)
            raise KeyboardInterrupt
        self._stop_signal = signum
        log.warning("received %s: stopping after this iteration and saving %s (press again to stop now)",
                    signal.Signals(signum).name, LAST)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():  # e.g. a threaded launcher: keep defaults
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def fit(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg.train
        total, interval = int(cfg.iterations), int(cfg.val_interval)
        val_tasks = [t.to(self.device) for t in
                     self.sources["validation"].fixed_tasks(int(cfg.val_tasks), int(self.cfg.eval.seed) + 1)]
        # Drop TensorBoard events a killed run wrote after the checkpoint we continue from (steps > iteration).
        writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.iteration + 1)
        if self.iteration == 0:  # a fresh start: no stale rows from an earlier attempt in this directory
            write_csv(self.run_dir / "metrics.csv", self.metrics_rows, METRICS_COLUMNS)
        previous = self._install_signal_handlers()
        batch = int(cfg.meta_batch_size)
        progress = tqdm(total=total, initial=self.iteration, desc=f"{self.algorithm.name}", unit="it",
                        dynamic_ncols=True, mininterval=1.0, disable=None)
        budget = cfg.get("max_minutes")
        budget_seconds = math.inf if budget is None else 60 * float(budget)
        wall_started, wall_before = time.perf_counter(), self.wall_seconds
        try:
            while self.iteration < total:
                self.wall_seconds = wall_before + time.perf_counter() - wall_started
                if self.wall_seconds >= budget_seconds:
                    self._stop_at_time_budget(val_tasks, writer, budget, total)
                    break
                started = time.perf_counter()
                tasks = self.algorithm.next_batch(self.sources["train"], batch).to(self.device)
                stats = self.algorithm.train_step(tasks, self.iteration)
                self.train_seconds += time.perf_counter() - started
                self.iteration += 1
                if stats["finite"]:
                    self.consecutive_skips = 0
                    for key in ("loss", "acc", "grad_norm"):
                        self.running[key] += stats[key]
                    self.running["n"] += 1
                else:
                    self._non_finite(stats)  # raises unless train.nan_policy=skip
                if self.iteration % int(cfg.log_interval) == 0:
                    for key, value in stats.items():
                        if key != "finite" and math.isfinite(value):
                            writer.add_scalar(f"train/{key}", value, self.iteration)
                    writer.add_scalar("train/seconds_per_iteration", self.train_seconds / self.iteration, self.iteration)
                progress.update(1)
                progress.set_postfix(loss=f"{stats['loss']:.4f}", best_val=f"{self.best_val_loss:.4f}", refresh=False)
                if progress.disable and self.iteration % max(1, total // 20) == 0:  # no terminal: progress in the log
                    per_iteration = self.train_seconds / self.iteration
                    log.info("iter %d/%d | loss %.4f | %.3f s/it | ETA %s", self.iteration, total, stats["loss"],
                             per_iteration, tqdm.format_interval(per_iteration * (total - self.iteration)))
                if self.iteration % interval == 0 or self.iteration == total:
                    self._validate(val_tasks, self.running, writer)
                if self._stop_signal is not None:
                    self.save(LAST)
                    raise StopRequested(
                        f"stopped by {signal.Signals(self._stop_signal).name} at iteration {self.iteration}/{total}; "
                        f"saved {self.checkpoint_dir / LAST}", self._stop_signal, self.run_dir)
        finally:
            progress.close()
            writer.close()
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop_at_time_budget(self, val_tasks, writer, budget, total) -> None:
        """train.max_minutes reached: validate the state reached (unless just done) so best/last hold it."""
        if not self.metrics_rows or self.metrics_rows[-1]["iteration"] != self.iteration:
            self._validate(val_tasks, self.running, writer)
        log.info("train.max_minutes=%s reached after %.0f s at iteration %d/%d: stopping training", budget,
                 self.wall_seconds, self.iteration, total)

    def _last_good_checkpoint(self) -> str:
        """The newest checkpoint on disk whose validation loss was finite (the state to go back to)."""
        finite = [row for row in self.metrics_rows if math.isfinite(row["val_loss"])]
        if not finite:
            return "no checkpoint with a finite validation loss yet"
        newest = finite[-1]
        if newest is self.metrics_rows[-1] and self.last_checkpoint_iteration == newest["iteration"]:
            name, row = LAST, newest
        else:  # last.pt holds a non-finite validation (or a stop between validations): best.pt is the good one
            name, row = "best.pt", min(finite, key=lambda r: r["val_loss"])
        return f"last good checkpoint: {self.checkpoint_dir / name} (iteration {row['iteration']}, " \
               f"val loss {row['val_loss']:.4g})"

    def _non_finite(self, stats) -> None:
        policy = str(self.cfg.train.nan_policy)
        advice = "lower algorithm.outer_lr/inner_lr or set train.grad_clip" + \
            (" (or train.nan_policy=skip to skip such batches)" if policy == "stop" else "")
        message = (f"non-finite training loss ({stats['loss']}) or gradient norm ({stats['grad_norm']}) at iteration "
                   f"{self.iteration}; {self._last_good_checkpoint()}; {advice}")
        if policy == "stop":
            raise UserError(message)
        self.consecutive_skips += 1
        if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
            raise UserError(f"{MAX_CONSECUTIVE_SKIPS} non-finite batches in a row (train.nan_policy=skip): {message}")
        log.warning("skipped batch: %s", message)

    def _validate(self, val_tasks, running, writer) -> None:
        result = evaluate(self.algorithm, val_tasks, int(self.cfg.eval.inner_steps), self.device)
        (val_loss, val_loss_ci), (val_acc, val_acc_ci) = result.loss, result.accuracy
        n = running["n"] or math.nan  # nan, not 0, when every batch of the interval was skipped as non-finite
        row = {"iteration": self.iteration, "train_loss": running["loss"] / n, "train_accuracy": running["acc"] / n,
               "val_loss": val_loss, "val_accuracy": val_acc, "val_loss_ci95": val_loss_ci,
               "val_accuracy_ci95": val_acc_ci, "grad_norm": running["grad_norm"] / n,
               "elapsed_seconds": round(self.train_seconds, 3)}
        self.running = _fresh_running()  # before the checkpoints below: they must not carry this interval's sums
        self.metrics_rows.append(row)
        write_csv(self.run_dir / "metrics.csv", self.metrics_rows, METRICS_COLUMNS)
        for key in ("val_loss", "val_accuracy"):
            if math.isfinite(row[key]):
                writer.add_scalar(f"val/{key[4:]}", row[key], self.iteration)
        writer.flush()
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
            self.save("best.pt")
        self.save("last.pt")
        accuracy = "" if math.isnan(val_acc) else f" acc {100 * val_acc:.2f}%"
        log.info("iter %d: train loss %.4f | val loss %.4f%s%s | %.1fs", self.iteration, row["train_loss"], val_loss,
                 accuracy, " (best)" if improved else "", self.train_seconds)

    # ---- test --------------------------------------------------------------------------------------
    def test(self, which: str | None = None) -> dict:
        which, path = checkpoint_to_test(self.checkpoint_dir, which or str(self.cfg.eval.checkpoint))
        row, result = self.evaluate_checkpoint(path, which)
        write_csv(self.run_dir / "results.csv", [row], result_columns(self.cfg))
        # Per-task values: paired comparisons between runs tested on the same tasks (eval.seed) need them.
        write_csv(self.run_dir / TEST_TASKS_FILE, result.task_rows(), TEST_TASKS_COLUMNS)
        row["run_dir"] = str(self.run_dir)  # not a CSV column: tells the CLI where a resumed run wrote its files
        return row

    def evaluate_checkpoint(self, path: Path, which: str):
        """Load `path` and test it on the eval.num_tasks fixed test tasks; returns (results row, EvalResult).
        Writes nothing (`test` writes results.csv, eval_only.evaluate_only its own files)."""
        self._load_algorithm(path)
        tasks = self.sources["test"].iter_fixed_tasks(int(self.cfg.eval.num_tasks), int(self.cfg.eval.seed))
        result = evaluate(self.algorithm, tasks, int(self.cfg.eval.inner_steps), self.device)
        regression = self.algorithm.task_type == "regression"
        metric = "mse" if regression else "accuracy"
        mean, ci = result.loss if regression else result.accuracy
        done = max(self.iteration, 1)
        best_loss, best_accuracy = best_validation(self.metrics_rows)
        row = {**config_checks.flat_config(self.cfg, config_checks.result_fields(self.cfg)), "metric": metric,
               "mean": mean,
               "ci95": ci, **result.summary("test"), "n_tasks": result.n_tasks, "checkpoint": which,
               "best_val_loss": best_loss, "best_val_accuracy": best_accuracy,
               "iterations_done": self.iteration, "train_seconds": round(self.train_seconds, 3),
               "seconds_per_iteration": self.train_seconds / done, "peak_memory_mb": round(peak_memory_mb(self.device), 1),
               "device": str(self.device)}
        return row, result


def checkpoint_to_test(checkpoint_dir: Path, which: str) -> tuple[str, Path]:
    """(name, path) of the checkpoint eval.checkpoint asks for; best.pt falls back to last.pt when no finite
    validation loss was ever reached (there is no best.pt then)."""
    path = Path(checkpoint_dir) / f"{which}.pt"
    if which == "best" and not path.is_file() and (Path(checkpoint_dir) / LAST).is_file():
        log.warning("no best.pt (no finite validation loss was reached): testing %s instead", LAST)
        which, path = "last", Path(checkpoint_dir) / LAST
    return which, path


_MISSING = object()


def without_mode_keys(cfg: DictConfig) -> DictConfig:
    """The run's config without eval.only: it says what this command does, not what a run is, so it stays out of
    checkpoints and of the config comparisons of resume (runs saved before the key existed still match)."""
    if OmegaConf.select(cfg, "eval.only", default=_MISSING) is _MISSING:
        return cfg
    value = OmegaConf.select(cfg, "eval.only")
    if value is not False:
        shown = str(value).lower() if isinstance(value, bool) else value
        raise UserError(f"eval.only={shown} reached a training run; eval.only=true is run by maml-run "
                        f"(eval_only.evaluate_only), which tests train.resume=<run dir or .pt> without training")
    cfg = copy.deepcopy(cfg)
    with read_write(cfg), open_dict(cfg.eval):  # the eval section itself: a typed section refuses deletion otherwise
        del cfg.eval["only"]
    return cfg


def finished_results(cfg: DictConfig, run_dir: Path, checkpoint: Path) -> dict | None:
    """The results row of a run that already finished with this config (a resumed sweep skips such jobs)."""
    results = run_dir / "results.csv"
    if not results.is_file():
        return None
    state = load_checkpoint(checkpoint)
    if int(state.get("iteration", -1)) < int(cfg.train.iterations) or config_differences(state.get("config", {}), cfg):
        return None
    rows = read_csv(results, typed=True)
    if len(rows) != 1:
        return None
    row = rows[0]
    if row.get("best_val_loss") is None and (run_dir / "metrics.csv").is_file():  # results.csv from before the column
        row["best_val_loss"], row["best_val_accuracy"] = best_validation(read_csv(run_dir / "metrics.csv", typed=True))
    return row


def build(cfg: DictConfig, run_dir: Path) -> Trainer:
    config_checks.validate(cfg)
    device = configure(cfg.hardware, int(cfg.seed))
    reset_peak_memory(device)
    sources = build_sources(cfg.dataset)
    # Training meta-batches in one gather (same tasks as task-by-task sampling); validation/test stay as built.
    sources["train"] = cached_episodes(sources["train"])
    if hasattr(sources["train"], "write_split"):
        sources["train"].write_split(run_dir / "omniglot_split.json")
    model = build_model(cfg.model, cfg.dataset).to(device)
    algorithm = build_algorithm(model, cfg.algorithm, sources["train"].task_type, int(cfg.train.iterations),
                                grad_clip=cfg.train.get("grad_clip"), train_source=sources["train"],
                                vectorize=str(cfg.hardware.get("vectorize", "auto"))).to(device)
    return Trainer(cfg, run_dir, algorithm, sources, device)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train (or resume), then test on held-out tasks. Returns the results row."""
    config_checks.validate(cfg)  # before anything is written
    cfg = without_mode_keys(cfg)
    run_dir = Path(run_dir)
    checkpoint = find_resume_checkpoint(cfg, run_dir)
    if checkpoint is not None:
        run_dir = checkpoint_run_dir(checkpoint, run_dir)  # continue writing into the resumed run's directory
    # One writer per directory, from before the first write until the results are written. A no-op when this
    # process holds it already (the CLI's Hydra callback holds hydra.run.dir); taken here for train.resume=<other
    # dir> and for callers without the CLI.
    with runlock.hold(run_dir):
        if checkpoint is not None:
            finished = finished_results(cfg, run_dir, checkpoint)
            if finished is not None:
                log.info("%s already finished with this config: not re-run (results: %s)", run_dir,
                         run_dir / "results.csv")
                return finished
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = build(cfg, run_dir)
        if checkpoint is not None:
            trainer.resume(checkpoint)
        trainer.fit()
        row = trainer.test()
    unit = "MSE" if row["metric"] == "mse" else "accuracy"
    scale = 1 if row["metric"] == "mse" else 100
    log.info("test %s after %d eval steps on %d tasks: %.4g ± %.2g (95%% CI) | %.3f s/iter | results: %s",
             unit, int(cfg.eval.inner_steps), row["n_tasks"], scale * row["mean"], scale * row["ci95"],
             row["seconds_per_iteration"], trainer.run_dir / "results.csv")
    return row
