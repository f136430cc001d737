"""`maml-run`: thin Hydra entry point. Bad input ends with one line on stderr and exit code 2.

Hydra prints its own errors (unknown config key or group option, override syntax, an output directory it cannot
create) as several lines or a stack trace. `main` asks Hydra to re-raise them instead (its documented
`HYDRA_FULL_ERROR` switch) and prints one line per error. Set HYDRA_FULL_ERROR=1 yourself to see full traces.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
import shlex
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from . import config as config_checks
from .errors import UserError
from .paths import CONF_DIR
from .runlock import Refused, hold

log = logging.getLogger("maml_runner")
CONFIG_PATH = str(CONF_DIR)  # <checkout>/conf, or the copy inside an installed wheel (paths.py)
PROG = "maml-run"
EXIT_USAGE = 2

_task_started = False  # False while Hydra itself is still composing the config / creating the run directory
_single_run_failure: BaseException | None = None  # a single run's error, reported by `main` without Hydra's banner


class _StopSweep(BaseException):
    """Carries a stop request past Hydra's per-job error capture, so SIGINT/SIGTERM ends the whole sweep."""

    def __init__(self, stop: Exception):
        super().__init__(str(stop))
        self.stop = stop


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    from tqdm.contrib.logging import logging_redirect_tqdm
    with logging_redirect_tqdm():  # log lines print above the progress bar instead of breaking it
        return _task(cfg)


def _task(cfg: DictConfig) -> float | None:
    """One maml-run (or one sweep job): evaluate-only, an ablation, or a training run with its report."""
    global _single_run_failure
    from .train import StopRequested, run

    try:
        output_dir = Path(HydraConfig.get().runtime.output_dir)
        from .eval_only import evaluate_only, is_eval_only
        if is_eval_only(cfg):  # test a trained run again (train.resume), write beside its results, train nothing
            evaluate_only(cfg, output_dir, list(HydraConfig.get().overrides.task))
            return None  # nothing for a sweeper to optimise: the run's training is fixed
        # ---- issue 4 hook: inner-step ablation instead of one run; report.md after a run -------------------
        if cfg.get("ablation") is not None and cfg.ablation.get("enabled", False):
            from .ablation import run_ablation
            try:
                run_ablation(cfg, output_dir)
            except StopRequested as exc:  # finished cells are reused: rerun the ablation in the same directory
                exc.args = (f"{exc}; resume the ablation with: {rerun_command(output_dir)}",)
                exc.resume_named = True
                raise
            _write_tensorboard_summary(cfg, output_dir, None)  # the heatmap and curves as TensorBoard images
            return None
        row = run(cfg, output_dir)
        if cfg.get("report") is not None and cfg.report.get("enabled", False):
            report_dir = Path(row.get("run_dir") or output_dir)  # a resumed run's own directory: lock it again
            with hold(report_dir):
                _write_report(cfg, report_dir, row)
        if row.get("run_dir"):  # trained and tested now (a finished run that was not re-run has its summary)
            _write_tensorboard_summary(cfg, Path(row["run_dir"]), row)
        # ---- end of issue 4 hook ------------------------------------------------------------------------
    except (UserError, StopRequested, OmegaConfBaseException) as exc:
        if isinstance(exc, StopRequested):
            requeue_through_submitit(exc)  # SIGUSR2 in a Slurm/submitit job: requeued, this process exits here
            if not getattr(exc, "resume_named", False):
                exc.args = (f"{exc}; resume with: {resume_command(Path(exc.run_dir))}",)
            if _is_multirun():
                raise _StopSweep(exc) from None
        if _is_multirun():  # Hydra names the failed job, then `main` prints the one line
            raise
        _single_run_failure = exc
        return None
    return sweep_objective(row)


def sweep_objective(row: dict) -> float:
    """The value a job returns to Hydra's sweeper (e.g. Optuna, direction minimize): the lowest validation loss the
    run reached (results.csv best_val_loss; cross-entropy on classification, MSE on regression), +inf when it reached
    none (a diverged trial ranks last; Optuna rejects nan and the Hydra plugin then aborts the whole search). Never a
    test number: choosing hyperparameters by the test mean would make the reported test optimistic."""
    value = row.get("best_val_loss")
    value = math.nan if value is None else float(value)
    return math.inf if math.isnan(value) else value


def requeue_through_submitit(stop) -> None:
    """Hand a SIGUSR2 stop to submitit, when this is a submitit job (hydra/launcher=slurm or local_submitit).

    Slurm sends SIGUSR2 `signal_delay_s` before a time limit and, where the cluster is set up for it, at a preemption.
    submitit's handler for it requeues the job with the same arguments; the trainer replaced that handler while it
    ran, so that it could finish the iteration and save last.pt first, and put it back when it stopped. Calling it now
    requeues the job and exits this process (SystemExit); the requeued job resumes last.pt (the presets set
    MAML_RUN_RESUME, hence train.resume=true). Outside submitit this returns and the stop ends the run as usual."""
    signum = getattr(stop, "signum", None)
    if signum != getattr(signal, "SIGUSR2", None):
        return
    handler = signal.getsignal(signum)
    if callable(handler) and str(getattr(handler, "__module__", "")).startswith("submitit"):
        log.warning("%s; handing over to submitit to requeue this job", stop)
        handler(signum, None)


def _write_report(cfg: DictConfig, run_dir: Path, row: dict) -> None:
    """report.md for a finished run; a failed plot is a warning, never a failed run."""
    from .report import write_report
    if not (run_dir / "results.csv").is_file():
        return
    try:
        log.info("report: %s", write_report(cfg, run_dir, row))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the results are written; a report problem must not hide them
        log.warning("report.md not written: %s: %s", type(exc).__name__, exc)


def _write_tensorboard_summary(cfg: DictConfig, run_dir: Path, row: dict | None) -> None:
    """HParams, final metrics, validation CIs and the run's figures into <run dir>/tb (tensorboard_summary.py); a
    failure is a warning, never a failed run."""
    from .tensorboard_summary import write_run_summary
    try:
        with hold(run_dir):
            write_run_summary(run_dir, cfg, row)
    except Exception as exc:  # noqa: BLE001 - the results are written; a summary problem must not hide them
        log.warning("TensorBoard summary not written: %s: %s", type(exc).__name__, exc)


def _is_multirun() -> bool:
    return str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def resume_command(run_dir: Path) -> str:
    """This command line with the override that continues the stopped run (or sweep)."""
    hydra_cfg = HydraConfig.get()
    multirun = _is_multirun()
    replaced = ("train.resume=", "hydra.sweep.dir=") if multirun else ("train.resume=", "hydra.run.dir=")
    kept = [arg for arg in sys.argv[1:] if not arg.lstrip("+~").startswith(replaced)]
    extra = (["train.resume=true", f"hydra.sweep.dir={hydra_cfg.sweep.dir}"] if multirun
             else [f"train.resume={run_dir}"])
    return " ".join(shlex.quote(arg) for arg in [PROG, *kept, *extra])


def rerun_command(run_dir: Path) -> str:
    """This command line, writing into `run_dir` again (an ablation reuses the cells finished there)."""
    kept = [arg for arg in sys.argv[1:] if not arg.lstrip("+~").startswith(("train.resume=", "hydra.run.dir="))]
    return " ".join(shlex.quote(arg) for arg in [PROG, *kept, f"hydra.run.dir={run_dir}"])


def _known_keys() -> list[str]:
    """Dotted keys of the config with this command line's group choices (for 'did you mean'); [] on failure."""
    from hydra import compose, initialize_config_dir

    def flatten(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flatten(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1]
    groups = [arg for arg in sys.argv[1:] if "=" in arg and "." not in arg.split("=")[0] and arg[0].isalpha()]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=CONFIG_PATH):
            return list(flatten(OmegaConf.to_container(compose(config_name="config", overrides=groups))))
    except Exception:  # a suggestion is a nicety; never let it hide the real error
        return []


def hydra_error_line(exc: HydraException) -> str:
    """One line for Hydra's multi-line config errors: what is wrong, what is allowed."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options is not None:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        if group:
            return f"{group}={option} is not an option; choose one of: {', '.join(exc.options)}"
    lines = [line.strip() for line in str(exc).split("Config search path:")[0].splitlines() if line.strip()]
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override '{exc.override}': {lines[0]} ({lines[-1][0].lower() + lines[-1][1:]})"
    cause = exc.__cause__
    key = getattr(cause, "full_key", None)
    refused = config_checks.composition_error_line(cause) if cause is not None else None
    if refused:  # a value of the wrong type, or a required key removed: the words config.validate uses
        return refused
    if key and ("not in struct" in str(cause) or isinstance(cause, (ConfigAttributeError, ConfigKeyError))):
        close = difflib.get_close_matches(key, _known_keys(), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"{key} is not a config key; {hint}(maml-run --help lists them; +{key}=... adds a new key)"
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "; ".join(line.rstrip(".") if i == 0 else line[0].lower() + line[1:].rstrip(".")
                     for i, line in enumerate(lines))


def error_line(exc: BaseException) -> tuple[str, int]:
    """The line to print for an error that ends the program, and the exit code."""
    train = sys.modules.get(f"{__package__}.train")  # not imported yet: no StopRequested (and no torch import)
    if train is not None and isinstance(exc, train.StopRequested):
        return f"{PROG}: {exc}", 128 + int(exc.signum)
    if isinstance(exc, KeyboardInterrupt):
        return f"{PROG}: interrupted; files written so far are complete (atomic writes)", 130
    if isinstance(exc, UserError):
        return f"{PROG}: error: {exc}", EXIT_USAGE
    if isinstance(exc, HydraException):
        return f"{PROG}: error: {hydra_error_line(exc)}", EXIT_USAGE
    if isinstance(exc, OmegaConfBaseException):  # a config key the code needs is missing or of the wrong kind
        key = getattr(exc, "full_key", None)
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{PROG}: error: config{f' key {key}' if key else ''}: {detail}", EXIT_USAGE
    if not _task_started and isinstance(exc, (ValueError, TypeError)):  # Hydra composing e.g. `dataset=5`
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"{PROG}: error: invalid command line: {detail} (maml-run --help shows the groups and keys)", EXIT_USAGE
    if isinstance(exc, OSError):
        where = f"'{exc.filename}': " if exc.filename else ""
        if not _task_started:  # Hydra creating the run directory and its .hydra/ files
            return (f"{PROG}: error: cannot create the output directory {where}{exc.strerror or exc}; set "
                    f"hydra.run.dir=<writable dir> (hydra.sweep.dir with -m)", EXIT_USAGE)
        return f"{PROG}: error: {where}{exc.strerror or exc}", 1
    raise exc


def main() -> None:
    user_wants_traces = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's multi-line report
    try:
        try:
            _main()
        except _StopSweep as stop:
            raise stop.stop from None
        except Refused as refused:  # the run directory is in use (runlock.RunLockCallback)
            raise refused.error from None
        if _single_run_failure is not None:
            raise _single_run_failure
    except (Exception, KeyboardInterrupt) as exc:
        if user_wants_traces:
            raise
        message, code = error_line(exc)
        print(message, file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
