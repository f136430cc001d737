"""The end-of-run TensorBoard summary, written beside the training scalars in `<run dir>/tb/`:

- the HParams tab: the run's key config values (config.RESULT_KEYS plus every key its command line overrode) with
  its final metrics, so the runs of a sweep compare side by side (`tensorboard --logdir multirun/<sweep>`);
- `final/*` scalars: the test result (mean and 95 % CI of the metric, test loss/accuracy) and the best validation
  loss / accuracy, at the step of the last training iteration;
- `val/loss_ci95`, `val/accuracy_ci95`: the validation confidence intervals (metrics.csv) at their iterations;
- `figures/*` images: the PNGs the run already drew (report.py: curves.png, adaptation.png; ablation.py:
  ablation.png, ablation_curves.png), whichever exist.

`write_run_summary` is called once per finished run (cli.py, after report.md), never during training, so a resumed
run is summarised once. A failure here is a warning: the results are already written.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import result_fields
from .io import read_csv

log = logging.getLogger(__name__)

TB_DIR = "tb"
FIGURES = {"curves": "curves.png", "adaptation": "adaptation.png", "ablation": "ablation.png",
           "ablation_curves": "ablation_curves.png"}
# Overrides that say where things are or how a command runs, not what was trained (aggregate.py ignores the same).
LOCATION_KEYS = ("hydra.", "hydra/", "dataset.root", "dataset.cache_dir", "train.resume", "hardware", "report.",
                 "hparams_search")


def final_metrics(row: dict) -> dict[str, float]:
    """The HParams tab's metric columns from a results row (finite numbers only: TensorBoard drops NaN rows)."""
    metric = str(row.get("metric", "mean"))
    candidates = {f"final/test_{metric}": row.get("mean"), f"final/test_{metric}_ci95": row.get("ci95"),
                  "final/test_loss": row.get("test_loss"), "final/best_val_loss": row.get("best_val_loss")}
    if metric == "accuracy":
        candidates["final/best_val_accuracy"] = row.get("best_val_accuracy")
    return {key: float(value) for key, value in candidates.items()
            if value is not None and math.isfinite(float(value))}


def hyperparameters(cfg: DictConfig, run_dir: Path) -> dict:
    """The results row's config keys (config.result_fields) plus the keys this run's command line overrode (.hydra/overrides.yaml), as TensorBoard takes
    them: bool, int, float or str (None and lists as text)."""
    keys, given = list(result_fields(cfg)), {}
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        for item in OmegaConf.to_container(OmegaConf.load(overrides)) or []:
            key, _, value = str(item).partition("=")
            key = key.lstrip("+~")
            if key and not key.startswith(LOCATION_KEYS) and key not in keys:
                keys.append(key)
                given[key] = value
    values = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and key in given:  # a preset group (experiment=...): not a key of the composed config
            value = given[key]
        if isinstance(value, DictConfig):  # a group override (algorithm=fomaml): its name
            value = value.get("name", key)
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        values[key] = value if isinstance(value, (bool, int, float, str)) else str(
            OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)
    return values


def _png_array(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_run_summary(run_dir: str | Path, cfg: DictConfig, row: dict | None) -> Path:
    """Write the summary of a finished run into `<run_dir>/tb/` (a new event file next to the training ones).

    Arguments: run_dir: the run directory (results.csv, metrics.csv, the PNGs); cfg: the run's config; row: its
    results row (train.run's return value), or None (an ablation: figures only). Returns the tb directory."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    run_dir = Path(run_dir)
    step = int((row or {}).get("iterations_done") or 0)
    writer = SummaryWriter(str(run_dir / TB_DIR))
    try:
        if row is not None:
            metrics = final_metrics(row)
            # Written into the run's own directory (SummaryWriter.add_hparams would open a sub-run): one HParams
            # session per run, next to its curves.
            for summary in hparams(hyperparameters(cfg, run_dir), metrics):
                writer.file_writer.add_summary(summary, step)
            for tag, value in metrics.items():
                writer.add_scalar(tag, value, step)
        metrics_csv = run_dir / "metrics.csv"
        for validation in read_csv(metrics_csv, typed=True) if metrics_csv.is_file() else []:
            for column, tag in (("val_loss_ci95", "val/loss_ci95"), ("val_accuracy_ci95", "val/accuracy_ci95")):
                value = validation.get(column)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    writer.add_scalar(tag, value, int(validation["iteration"]))
        for name, file in FIGURES.items():
            if (run_dir / file).is_file():
                writer.add_image(f"figures/{name}", _png_array(run_dir / file), step, dataformats="HWC")
    finally:
        writer.close()
    return run_dir / TB_DIR
