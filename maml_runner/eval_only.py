"""`maml-run eval.only=true train.resume=<run dir or .pt> eval.inner_steps=10 eval.num_tasks=1000`: test a trained
run again, without training, and write the results beside its own, never over them.

The model is rebuilt from the config saved in the checkpoint (so the command line need not repeat the run's
algorithm, dataset or model); the command line may change only what a test depends on and what machine runs it:
eval.*, hardware, dataset.root, dataset.cache_dir, dataset.download. Other keys may repeat the run's own values (its
training command line with eval.only=true added works); a different value is an error. Files, in the trained run's
directory:

  results_eval_<checkpoint>_<steps>steps_<n>tasks_seed<seed>.csv     one row, the columns of results.csv
  test_tasks_eval_<checkpoint>_<steps>steps_<n>tasks_seed<seed>.csv  per task, as test_tasks.csv

<checkpoint> is best, last, a .pt file's name, or ensemble<eval.ensemble_size> (eval.checkpoint=ensemble: the
checkpoints the run kept in checkpoints/top/, ranked by its validations; a run without them is refused). The name
holds everything that decides the numbers, so a different test never replaces another one; the same test again
rewrites its file atomically. Checkpoints are only read.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig, OmegaConf

from . import config as config_checks
from . import runlock
from .checkpoint import LAST, checkpoint_run_dir, load_checkpoint
from .ensemble import ENSEMBLE, TOP_DIR, kept_iterations, top_dir
from .errors import CheckpointError, UserError

log = logging.getLogger(__name__)

# Keys a re-test may take from the command line; everything else is the trained run's.
EVAL_KEYS = ("dataset.root", "dataset.cache_dir", "dataset.download")
IGNORED_KEYS = ("train.resume", "name", "report", "hydra", "hydra/")  # where/how to run, not what is tested


def _prefixed(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p if p.endswith("/") else p + ".") for p in prefixes)


def is_eval_only(cfg: DictConfig) -> bool:
    value = OmegaConf.select(cfg, "eval.only", default=False)
    if not isinstance(value, bool):
        raise UserError(f"eval.only={value} is invalid: expected true or false")
    return value


def checkpoint_to_retest(cfg: DictConfig) -> tuple[Path, str, Path]:
    """(checkpoint file, its name for the file names, the run directory to write into) from train.resume. For
    eval.checkpoint=ensemble the file is the run's last.pt (its validation rows rank the kept checkpoints)."""
    from .train import checkpoint_to_test

    resume = OmegaConf.select(cfg, "train.resume")
    if resume is None or isinstance(resume, bool) or str(resume).strip().lower() in ("", "true", "false", "yes", "no"):
        raise UserError(f"eval.only=true needs train.resume=<run dir or checkpoint .pt>, the trained run to test "
                        f"(got train.resume={str(resume).lower() if isinstance(resume, bool) else resume})")
    source = Path(str(resume)).expanduser()
    if str(cfg.eval.checkpoint) == ENSEMBLE:
        if not source.is_dir():
            raise UserError(f"train.resume={resume}: eval.checkpoint=ensemble tests the checkpoints a run directory "
                            f"kept in checkpoints/{TOP_DIR}/; name the run directory, not a file")
        last = source / "checkpoints" / LAST
        if not kept_iterations(source / "checkpoints") or not last.is_file():
            raise UserError(f"train.resume={resume}: no checkpoints in '{top_dir(source / 'checkpoints')}' (kept only "
                            f"by runs trained with eval.checkpoint=ensemble); use eval.checkpoint=best or last")
        return last, ENSEMBLE, source
    if source.is_dir():
        which, path = checkpoint_to_test(source / "checkpoints", str(cfg.eval.checkpoint))
        if not path.is_file():
            raise UserError(f"train.resume={resume}: no checkpoint at '{path}'; eval.only=true needs a run directory "
                            f"with checkpoints/best.pt or {LAST} (eval.checkpoint=best|last) or a .pt file")
        return path, which, source
    if source.is_file():
        return source, source.stem, checkpoint_run_dir(source, source.parent)
    raise UserError(f"train.resume={resume}: no such run directory or checkpoint file; eval.only=true needs "
                    f"train.resume=<run dir or checkpoint .pt>")


def _flat(value, prefix: str) -> dict:
    """{dotted key: value} of a (sub)config, without the data-location keys (they may differ between machines)."""
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flat(item, f"{prefix}.{key}"))
        return flat
    return {} if prefix in EVAL_KEYS else {prefix: value}


def retested_keys(overrides: Sequence[str], cfg: DictConfig, saved: dict) -> list[str]:
    """The keys of the command line a re-test takes (eval.*, data locations). Other keys may repeat the trained
    run's values (its original command line with eval.only=true added works); a different value is an error."""
    keys, trained = [], OmegaConf.create(saved)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if _prefixed(key, IGNORED_KEYS) or _prefixed(key, ("hardware",)):
            continue
        if _prefixed(key, ("eval",)) or key in EVAL_KEYS:
            keys.append(key)
            continue
        plain = lambda node: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node  # noqa: E731
        ours = _flat(plain(OmegaConf.select(cfg, key)), key)
        theirs = _flat(plain(OmegaConf.select(trained, key)), key)
        differing = sorted((k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)),
                           key=lambda k: (not k.endswith(".name"), k))  # a group's name says most
        if differing:
            first = differing[0]
            raise UserError(f"{override}: eval.only=true tests the trained run with its own config, which has "
                            f"{first}={theirs.get(first)}; only eval.*, hardware, {', '.join(EVAL_KEYS)} can differ "
                            f"(train a new run to change {first})")
    return keys


def retest_config(saved: dict, cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """The trained run's config with this command line's eval.*, hardware and data-location overrides."""
    merged = OmegaConf.create(saved)
    for key in retested_keys(overrides, cfg, saved):
        OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    # The machine is this one's: hardware comes from this command line (default auto), not from the training run.
    merged.hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    return merged


def result_names(cfg: DictConfig, which: str) -> tuple[str, str]:
    """results_eval_<...>.csv and test_tasks_eval_<...>.csv for this test's settings (an ensemble's size is part of
    its name: ensemble5)."""
    if which == ENSEMBLE:
        which = f"{ENSEMBLE}{int(cfg.eval.ensemble_size)}"
    tag = f"eval_{which}_{int(cfg.eval.inner_steps)}steps_{int(cfg.eval.num_tasks)}tasks_seed{int(cfg.eval.seed)}"
    return f"results_{tag}.csv", f"test_tasks_{tag}.csv"


def evaluate_only(cfg: DictConfig, output_dir: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Test the checkpoint train.resume names with this command's eval settings; write the results beside the run's
    own. `overrides`: the command line's (Hydra's task overrides), which say what to take from `cfg`."""
    from .lifecycle import TrainingState
    from .recorders import ResultsCsv, TestTasksCsv
    from .train import build, result_columns

    if OmegaConf.select(cfg, "ablation.enabled", default=False):
        raise UserError("eval.only=true and ablation.enabled=true cannot be combined; the ablation tests every "
                        "ablation.eval_steps itself (ablation.from_runs=[<run dir>] reuses trained runs)")
    path, which, run_dir = checkpoint_to_retest(cfg)
    state = load_checkpoint(path)
    saved = state.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint '{path}' holds no run config; eval.only=true needs a checkpoint written "
                              f"by maml-run")
    eval_cfg = retest_config(config_checks.upgrade_saved(saved), cfg, overrides)  # saved by any version
    config_checks.validate(eval_cfg)
    results_name, tasks_name = result_names(eval_cfg, which)
    # One writer per run directory: a training still writing into it (or another re-test) is refused.
    with runlock.hold(run_dir):
        trainer = build(eval_cfg, Path(output_dir))  # the run's files stay as they are; split etc. go to the log dir
        # What the tested state was trained with, for the row's iterations_done / train_seconds / best_val_*.
        trainer.state = TrainingState(iteration=int(state.get("iteration", 0)),
                                      train_seconds=float(state.get("train_seconds", 0.0)),
                                      metrics_rows=list(state.get("metrics_rows") or []))
        if which == ENSEMBLE:  # the run's kept checkpoints, ranked by last.pt's validation rows
            row, result = trainer.evaluate_members(trainer.ensemble_members(run_dir / "checkpoints"))
        else:
            row, result = trainer.evaluate_checkpoint(path, which)  # loads `path` (checkpoint.load_algorithm)
        ResultsCsv(run_dir / results_name, result_columns(eval_cfg)).write(row)
        TestTasksCsv(run_dir / tasks_name).write(result)
    unit, scale = ("MSE", 1) if row["metric"] == "mse" else ("accuracy", 100)
    log.info("eval only: %s (iteration %d) after %d eval steps on %d tasks: test %s %.4g ± %.2g (95%% CI) | "
             "results: %s", path, trainer.state.iteration, int(eval_cfg.eval.inner_steps), row["n_tasks"], unit,
             scale * row["mean"], scale * row["ci95"], run_dir / results_name)
    row["run_dir"], row["results_file"] = str(run_dir), str(run_dir / results_name)
    return row
