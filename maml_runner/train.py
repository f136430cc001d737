"""The one training loop: meta-train, validate on fixed tasks, checkpoint best/last, then test.

What records the run (metrics/results/test-task CSVs, TensorBoard, progress) is in recorders.py; what carries it
across stops and failures (resume state, signals, time budget, NaN policy) in lifecycle.py; the peak-memory probe
in hardware.py. This module is the loop and the test that follows it.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from . import config as config_checks
from . import ensemble, runlock, runlog
from .algorithms import build_algorithm
from .algorithms.base import MetaAlgorithm
from .checkpoint import (BEST, LAST, checkpoint_run_dir, config_differences, find_resume_checkpoint,
                         load_algorithm, rng_state, save_checkpoint)
from .data import build_sources
from .data.base import EpisodeSource
from .data.fast_episodes import cached_episodes
from .errors import UserError
from .evaluate import evaluate, evaluate_ensemble
from . import norm_derivatives
from .hardware import compile_fast_path, configure, peak_memory_mb, reset_peak_memory
from .io import remove_stale_temporaries
from .lifecycle import (NanPolicy, StopRequested, StopSignals, TimeBudget, TrainingState, best_validation,
                        finished_results, last_good_checkpoint, restore)
from .models import build_model
from .recorders import (METRICS_COLUMNS, RESULT_METRIC_COLUMNS, RESULTS_FILE, TEST_TASKS_FILE, MetricsCsv,
                        Progress, ResultsCsv, TensorBoard, TestTasksCsv)

log = logging.getLogger(__name__)

__all__ = ["METRICS_COLUMNS", "RESULT_METRIC_COLUMNS", "StopRequested", "Trainer", "best_validation", "build",
           "checkpoint_to_test", "result_columns", "run"]


def result_columns(cfg: DictConfig) -> list[str]:
    """results.csv's columns: the config keys of this run's algorithm and data (config.result_fields), then the
    test's (recorders.RESULT_METRIC_COLUMNS)."""
    return [*config_checks.result_fields(cfg), *RESULT_METRIC_COLUMNS]


class Trainer:
    """Meta-trains `algorithm` on `sources["train"]` (`fit`), validating on fixed tasks and keeping best.pt/last.pt
    in `<run_dir>/checkpoints` (and, with eval.checkpoint=ensemble, the best validations' checkpoints in
    checkpoints/top/); `test` tests the checkpoint(s) eval.checkpoint names on the fixed test tasks."""

    def __init__(self, cfg: DictConfig, run_dir: Path, algorithm: MetaAlgorithm,
                 sources: dict[str, EpisodeSource], device: torch.device):
        self.cfg, self.run_dir, self.algorithm, self.sources, self.device = cfg, Path(run_dir), algorithm, sources, device
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.state = TrainingState()
        self.last_saved_iteration: int | None = None  # named when training has to stop on NaN
        self.signals = StopSignals()
        self.metrics_csv = MetricsCsv(self.run_dir)
        # No validation source (Omniglot's dataset.split=[n, 0, m]): each val_interval still writes its metrics row
        # (validation columns nan) and last.pt; there is never a best.pt.
        self.validates = "validation" in self.sources
        # eval.checkpoint=ensemble: checkpoints/top/ holds the eval.ensemble_size best validations' states.
        self.top = (ensemble.TopCheckpoints(self.checkpoint_dir, int(cfg.eval.ensemble_size), algorithm.task_type)
                    if str(cfg.eval.checkpoint) == ensemble.ENSEMBLE else None)

    # ---- checkpoints -----------------------------------------------------------------------------------
    def save(self, name: str | Path) -> Path:
        """Write the current state to checkpoints/<name> (an absolute path is used as it is)."""
        if name == LAST:
            self.last_saved_iteration = self.state.iteration
        # Task samplers with their own RNG (beyond the global streams in `rng`) expose state_dict/load_state_dict.
        samplers = {split: source.state_dict() for split, source in self.sources.items()
                    if hasattr(source, "state_dict")}
        return save_checkpoint(self.checkpoint_dir / name, {
            "algorithm": self.algorithm.checkpoint_state(), **self.state.payload(), "rng": rng_state(),
            "samplers": samplers, "config": OmegaConf.to_container(self.cfg, resolve=True)})

    def resume(self, path: Path) -> None:
        """Continue from checkpoint `path` (a last.pt): weights, optimizer, schedules, RNG streams, samplers and
        the training state, so that the run goes on as if it had never stopped."""
        payload = load_algorithm(self.algorithm, path, map_location=self.device)
        differences = config_differences(payload.get("config", {}), self.cfg)
        if differences:
            log.warning("resuming %s with a different config: %s", path, "; ".join(differences))
        self.state = restore(payload, path, self.sources, self.checkpoint_dir)
        self.last_saved_iteration = self.state.iteration
        self.metrics_csv.write(self.state.metrics_rows)
        log.info("resumed from %s at iteration %d (best val loss %.4f)", path, self.state.iteration,
                 self.state.best_val_loss)

    # ---- loop --------------------------------------------------------------------------------------
    def fit(self) -> None:
        cfg, state = self.cfg.train, self.state
        total, interval, batch = int(cfg.iterations), int(cfg.val_interval), int(cfg.meta_batch_size)
        val_tasks = [t.to(self.device) for t in
                     self.sources["validation"].fixed_tasks(int(cfg.val_tasks), int(self.cfg.eval.seed) + 1)] \
            if self.validates else []
        # Drop TensorBoard events a killed run wrote after the checkpoint we continue from (steps > iteration).
        tensorboard = TensorBoard(self.run_dir / "tb", purge_step=state.iteration + 1)
        if state.iteration == 0:  # a fresh start: no stale rows from an earlier attempt in this directory
            self.metrics_csv.write(state.metrics_rows)
        if self.top is not None:  # kept states of validations this run's rows do not have (after the resumed one)
            for stale in self.top.prune(state.metrics_rows):
                log.info("removed %s (not among the top %d validations of the state continued)", stale,
                         self.top.size)
        nan_policy = NanPolicy(cfg.nan_policy)
        with self.signals:
            progress = Progress(total, state.iteration, self.algorithm.name, interval)
            budget = TimeBudget(cfg.get("max_minutes"), spent_before=state.wall_seconds)
            try:
                while state.iteration < total:
                    state.wall_seconds = budget.spent()
                    if state.wall_seconds >= budget.seconds:  # validate the state reached (unless just done)
                        if not state.metrics_rows or state.metrics_rows[-1]["iteration"] != state.iteration:
                            self._validate(val_tasks, tensorboard)
                        budget.log_stop(state.wall_seconds, state.iteration, total)
                        break
                    started = time.perf_counter()
                    tasks = self.algorithm.next_batch(self.sources["train"], batch).to(self.device)
                    stats = self.algorithm.train_step(tasks, state.iteration)
                    state.train_seconds += time.perf_counter() - started
                    state.iteration += 1
                    if stats["finite"]:
                        state.add_step(stats)
                    else:  # raises unless train.nan_policy=skip
                        nan_policy.non_finite(stats, state, last_good_checkpoint(
                            state.metrics_rows, self.last_saved_iteration, self.checkpoint_dir, self.validates))
                    if state.iteration % int(cfg.log_interval) == 0:
                        tensorboard.train_step(state.iteration, stats, state.train_seconds / state.iteration)
                    progress.step(state.iteration, stats["loss"], state.best_val_loss, state.train_seconds,
                                  state.wall_seconds, len(state.metrics_rows))
                    if state.iteration % interval == 0 or state.iteration == total:
                        self._validate(val_tasks, tensorboard)
                    if self.signals.received is not None:
                        saved = self.save(LAST)
                        raise self.signals.stop_requested(state.iteration, total, saved, self.run_dir)
            finally:
                progress.close()
                tensorboard.close()

    def _validate(self, val_tasks, tensorboard: TensorBoard) -> None:
        result = evaluate(self.algorithm, val_tasks, int(self.cfg.eval.inner_steps), self.device) \
            if self.validates else None  # None: the row's validation columns are nan
        row = self.state.end_interval(result)
        self.metrics_csv.write(self.state.metrics_rows)
        tensorboard.validation(row)
        if self.top is not None:
            self.top.keep_current(self.state.metrics_rows, self.save)
        improved = row["val_loss"] < self.state.best_val_loss  # never with no validation (nan < x is false)
        if improved:
            self.state.best_val_loss = row["val_loss"]
            self.save(BEST)
        self.save(LAST)
        if self.top is not None:  # after last.pt: a kill before this leaves an extra file, which resume prunes
            self.top.prune(self.state.metrics_rows)
        Progress.validation(row, improved, self.state.train_seconds, self.validates)

    # ---- test --------------------------------------------------------------------------------------
    def test(self, which: str | None = None) -> dict:
        """Test the checkpoint `which` (default eval.checkpoint; `ensemble`: the kept top checkpoints) on the fixed
        test tasks; writes results.csv and test_tasks.csv. Returns the results row (with `run_dir`)."""
        which = which or str(self.cfg.eval.checkpoint)
        chosen = self.ensemble_members() if which == ensemble.ENSEMBLE else []
        if chosen:
            row, result = self.evaluate_members(chosen)
        else:
            if which == ensemble.ENSEMBLE:
                log.warning("eval.checkpoint=ensemble: no checkpoint in %s (no finite validation was reached, or "
                            "the run trained with another eval.checkpoint): testing %s instead",
                            ensemble.top_dir(self.checkpoint_dir), LAST)
                which = "last"
            which, path = checkpoint_to_test(self.checkpoint_dir, which)
            row, result = self.evaluate_checkpoint(path, which)
        ResultsCsv(self.run_dir / RESULTS_FILE, result_columns(self.cfg)).write(row)
        TestTasksCsv(self.run_dir / TEST_TASKS_FILE).write(result)
        row["run_dir"] = str(self.run_dir)  # not a CSV column: tells the CLI where a resumed run wrote its files
        return row

    def evaluate_checkpoint(self, path: Path, which: str):
        """Load `path` and test it on the eval.num_tasks fixed test tasks; returns (results row, EvalResult).
        The row's training columns (iterations_done, train_seconds, best_val_*) are `self.state`'s.
        Writes nothing (`test` writes results.csv, eval_only.evaluate_only its own files)."""
        load_algorithm(self.algorithm, path, map_location=self.device)
        result = evaluate(self.algorithm, self.test_tasks(), int(self.cfg.eval.inner_steps), self.device)
        return self.results_row(result, which), result

    def ensemble_members(self, checkpoint_dir: Path | None = None) -> list[tuple[int, Path, dict]]:
        """eval.checkpoint=ensemble's members: (iteration, file, validation row) of the eval.ensemble_size best
        validations (`self.state`'s rows) kept in <checkpoint_dir, default this run's>/top/, best first."""
        return ensemble.members(checkpoint_dir or self.checkpoint_dir, self.state.metrics_rows,
                                int(self.cfg.eval.ensemble_size), self.algorithm.task_type)

    def evaluate_members(self, chosen: list[tuple[int, Path, dict]]):
        """Test the ensemble of `chosen` (`ensemble_members`) on the eval.num_tasks fixed test tasks, one pass per
        member; returns (results row with checkpoint=ensemble, EvalResult). Writes nothing."""
        log.info("eval.checkpoint=ensemble: averaging the test outputs of the checkpoints of iterations %s",
                 ensemble.describe(chosen, int(self.cfg.eval.ensemble_size), self.algorithm.task_type))
        result = evaluate_ensemble(self.algorithm, [path for _, path, _ in chosen], self.test_tasks,
                                   int(self.cfg.eval.inner_steps), self.device)
        return self.results_row(result, ensemble.ENSEMBLE), result

    def test_tasks(self):
        """A fresh pass over the eval.num_tasks fixed test tasks (eval.seed), one at a time, with a progress bar."""
        n_tasks = int(self.cfg.eval.num_tasks)
        return runlog.test_progress(self.sources["test"].iter_fixed_tasks(n_tasks, int(self.cfg.eval.seed)), n_tasks)

    def results_row(self, result, which: str) -> dict:
        """The results.csv row of test `result` of checkpoint `which`; the training columns are `self.state`'s."""
        regression = self.algorithm.task_type == "regression"
        metric = "mse" if regression else "accuracy"
        mean, ci = result.loss if regression else result.accuracy
        state = self.state
        best_loss, best_accuracy = best_validation(state.metrics_rows)
        row = {**config_checks.flat_config(self.cfg, config_checks.result_fields(self.cfg)), "metric": metric,
               "mean": mean, "ci95": ci, **result.summary("test"), "n_tasks": result.n_tasks, "checkpoint": which,
               "best_val_loss": best_loss, "best_val_accuracy": best_accuracy,
               "iterations_done": state.iteration, "train_seconds": round(state.train_seconds, 3),
               "seconds_per_iteration": state.train_seconds / max(state.iteration, 1),
               "peak_memory_mb": round(peak_memory_mb(self.device), 1), "device": str(self.device)}
        return row


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


def build(cfg: DictConfig, run_dir: Path) -> Trainer:
    """A Trainer for `cfg` writing into `run_dir`: device, seeds, data sources, model and algorithm, untrained."""
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
    algorithm.grad_clip_value = cfg.train.get("grad_clip_value")  # element-wise, after train.grad_clip's norm clip
    norm_derivatives.compile_kernels(False)  # a run before this one, in this process, may have compiled them
    if cfg.hardware.get("compile", False):
        compile_fast_path(algorithm)
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
                         run_dir / RESULTS_FILE)
                return finished
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temporaries(run_dir):  # a kill -9 mid-write; the lock says no one else writes
            log.info("removed %s (left by a run killed while writing)", stale)
        trainer = build(cfg, run_dir)
        log.info(runlog.start_line(cfg, run_dir, trainer.device, torch.get_num_threads()))
        if checkpoint is not None:
            trainer.resume(checkpoint)
        trainer.fit()
        row = trainer.test()
    unit = "MSE" if row["metric"] == "mse" else "accuracy"
    scale = 1 if row["metric"] == "mse" else 100
    log.info("test %s after %d eval steps on %d tasks: %.4g ± %.2g (95%% CI) | %.3f s/iter | results: %s",
             unit, int(cfg.eval.inner_steps), row["n_tasks"], scale * row["mean"], scale * row["ci95"],
             row["seconds_per_iteration"], trainer.run_dir / RESULTS_FILE)
    return row
