"""eval.checkpoint=ensemble: test the average of the top validation checkpoints, as Antoniou et al. 2019's released code
does (HowToTrainYourMAMLPytorch experiment_builder.evaluated_test_set_using_the_best_models(top_n_models=5): the 5
epochs with the highest validation accuracy, `np.argsort(val_acc)[::-1][:5]`; each epoch's model runs the same test
tasks; the per-task query logits are averaged over the models, `np.mean(per_model_per_batch_preds, axis=0)`, and the
accuracy is that of the argmax).

Training keeps the checkpoints of the eval.ensemble_size best validations in `<run>/checkpoints/top/iter_<n>.pt`
(`TopCheckpoints`); the test (train.Trainer.test, eval_only) ranks the run's validations (`ranked_validations`) and
averages the adapted query outputs of the members (evaluate.evaluate_ensemble). This module decides which
checkpoints; it evaluates nothing.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable

ENSEMBLE = "ensemble"  # the eval.checkpoint value
TOP_DIR = "top"        # <run>/checkpoints/top/
_MEMBER = re.compile(r"iter_(\d+)\.pt")


def top_dir(checkpoint_dir: str | Path) -> Path:
    return Path(checkpoint_dir) / TOP_DIR


def member_path(checkpoint_dir: str | Path, iteration: int) -> Path:
    """Where the checkpoint of the validation at `iteration` is kept: checkpoints/top/iter_<iteration>.pt."""
    return top_dir(checkpoint_dir) / f"iter_{int(iteration)}.pt"


def kept_iterations(checkpoint_dir: str | Path) -> dict[int, Path]:
    """{iteration: file} of the checkpoints in checkpoints/top/ (other files there are ignored)."""
    folder = top_dir(checkpoint_dir)
    found = {}
    for path in folder.glob("iter_*.pt") if folder.is_dir() else ():
        match = _MEMBER.fullmatch(path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


def ranked_validations(metrics_rows: list[dict], task_type: str) -> list[dict]:
    """The validation rows (metrics.csv rows), best first: classification by validation accuracy, highest first (the
    released code's criterion); regression by validation loss (MSE), lowest first. Rows whose value is not finite
    are left out.

    Ties go to the later iteration: the order `np.argsort(val_acc)[::-1]` gives with a stable sort (numpy's default
    sort is stable for the <= 16 values of short runs; not guaranteed beyond), and the deterministic rule here."""
    key = "val_loss" if task_type == "regression" else "val_accuracy"
    sign = 1.0 if task_type == "regression" else -1.0
    finite = [row for row in metrics_rows if _finite(row.get(key))]
    return sorted(finite, key=lambda row: (sign * float(row[key]), -int(row["iteration"])))


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def top_iterations(metrics_rows: list[dict], size: int, task_type: str) -> list[int]:
    """The iterations of the `size` best validations, best first."""
    return [int(row["iteration"]) for row in ranked_validations(metrics_rows, task_type)[:int(size)]]


def members(checkpoint_dir: str | Path, metrics_rows: list[dict], size: int,
            task_type: str) -> list[tuple[int, Path, dict]]:
    """The ensemble to test: (iteration, checkpoint file, validation row) of the `size` best-ranked validations that
    have a checkpoint in checkpoints/top/, best first. Fewer than `size` when fewer validations happened (or were
    kept: a run trained before eval.checkpoint=ensemble, or with a smaller eval.ensemble_size)."""
    kept = kept_iterations(checkpoint_dir)
    ranked = [(int(row["iteration"]), kept[int(row["iteration"])], row)
              for row in ranked_validations(metrics_rows, task_type) if int(row["iteration"]) in kept]
    return ranked[:int(size)]


def describe(chosen: list[tuple[int, Path, dict]], size: int, task_type: str) -> str:
    """'iterations 500 (val acc 0.91), ...' for the log, with why there are fewer than `size` members."""
    key, name = ("val_loss", "val loss") if task_type == "regression" else ("val_accuracy", "val acc")
    text = ", ".join(f"{iteration} ({name} {float(row[key]):.4g})" for iteration, _, row in chosen)
    if len(chosen) < int(size):
        text += (f"; {len(chosen)} of eval.ensemble_size={size}: the run has only these validations with a kept "
                 f"checkpoint")
    return text


class TopCheckpoints:
    """Keeps checkpoints/top/ holding exactly the checkpoints of the `size` best validations so far (training with
    eval.checkpoint=ensemble)."""

    def __init__(self, checkpoint_dir: str | Path, size: int, task_type: str):
        self.checkpoint_dir, self.size, self.task_type = Path(checkpoint_dir), int(size), task_type

    def keep_current(self, metrics_rows: list[dict], save: Callable[[Path], Path]) -> Path | None:
        """After a validation (the last of `metrics_rows`): save the current state with `save(path)` (an atomic
        checkpoint write) when that validation is among the best `size`. Returns the path written, if any."""
        iteration = int(metrics_rows[-1]["iteration"])
        if iteration not in top_iterations(metrics_rows, self.size, self.task_type):
            return None
        return save(member_path(self.checkpoint_dir, iteration))

    def prune(self, metrics_rows: list[dict]) -> list[Path]:
        """Delete the kept checkpoints that are not among the `size` best of `metrics_rows`: those that dropped out,
        and, when a run resumes, those of iterations after the checkpoint it continues (they are not in its rows;
        the resumed run writes them again). Returns the deleted files."""
        keep = set(top_iterations(metrics_rows, self.size, self.task_type))
        removed = []
        for iteration, path in sorted(kept_iterations(self.checkpoint_dir).items()):
            if iteration not in keep:
                path.unlink(missing_ok=True)
                removed.append(path)
        return removed
