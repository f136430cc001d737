"""Per-run report: report.md with the config summary, final metrics and plots (learning curves; on sinusoid the
adaptation of a few test tasks: support points, truth, prediction before and after k steps).

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot state, no display needed) and written atomically.
"""
from __future__ import annotations

import io
import logging
import math
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .config import result_fields
from .io import atomic_write, atomic_write_text, read_csv

log = logging.getLogger(__name__)

REPORT, CURVES, ADAPTATION = "report.md", "curves.png", "adaptation.png"
SUMMARY_KEYS = ["train.val_interval", "eval.num_tasks", "eval.seed", "eval.checkpoint", "hardware.device"]  # after
# the keys results.csv records (config.result_fields)


def save_figure(fig, path: str | Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _finite(values):
    return [math.nan if v is None else float(v) for v in values]


def learning_curves_figure(series: dict[str, list[dict]], title: str = ""):
    """Train/val loss (and accuracy when present) against iteration; one line per series (a run's metrics rows)."""
    from matplotlib.figure import Figure

    has_acc = any(math.isfinite(v) for rows in series.values()  # train accuracy too: a run without validation
                  for key in ("val_accuracy", "train_accuracy") for v in _finite(r.get(key) for r in rows))
    fig = Figure(figsize=(11 if has_acc else 6, 4))
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    for i, (label, rows) in enumerate(series.items()):
        color = f"C{i}"
        it = [int(r["iteration"]) for r in rows]
        axes[0].plot(it, _finite(r["train_loss"] for r in rows), "--", color=color, alpha=0.7,
                     label=f"{label} train" if label else "train")
        axes[0].plot(it, _finite(r["val_loss"] for r in rows), "-o", color=color, ms=3,
                     label=f"{label} val" if label else "val")
        if has_acc:
            axes[1].plot(it, [100 * v for v in _finite(r["train_accuracy"] for r in rows)], "--", color=color,
                         alpha=0.7, label=f"{label} train" if label else "train")
            axes[1].plot(it, [100 * v for v in _finite(r["val_accuracy"] for r in rows)], "-o", color=color, ms=3,
                         label=f"{label} val" if label else "val")
    axes[0].set(xlabel="meta-iteration", ylabel="loss (query, after adaptation)")
    if has_acc:
        axes[1].set(xlabel="meta-iteration", ylabel="accuracy %")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def sine_truth(task) -> tuple[float, float]:
    """Amplitude and phase of the task's sinusoid y = A sin(x - phase), recovered exactly from its points
    (y = a sin x + b cos x is linear in a, b), so the data source need not expose them."""
    x = np.concatenate([task.support_x.cpu().numpy().ravel(), task.query_x.cpu().numpy().ravel()])
    y = np.concatenate([task.support_y.cpu().numpy().ravel(), task.query_y.cpu().numpy().ravel()])
    (a, b), *_ = np.linalg.lstsq(np.stack([np.sin(x), np.cos(x)], axis=1), y, rcond=None)
    return float(math.hypot(a, b)), float(math.atan2(-b, a))


def adaptation_figure(algorithm, tasks, steps: int, x_range=(-5.0, 5.0), device="cpu"):
    """One panel per task: support points, true sinusoid, prediction before adaptation, after 1 and `steps` steps."""
    import torch
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(tasks), 3.6))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    grid = torch.linspace(float(x_range[0]), float(x_range[1]), 200, device=device).unsqueeze(1)
    xs = grid.cpu().numpy().ravel()
    was_training = algorithm.training
    algorithm.eval()
    try:
        for ax, task in zip(axes, tasks):
            task = task.to(device)
            amplitude, phase = sine_truth(task)
            ax.plot(xs, amplitude * np.sin(xs - phase), "k-", lw=2, label="truth")
            for k, style in sorted({0: ":", 1: "--", int(steps): "-"}.items()):
                learner = algorithm.adapt(task, k, None)
                with torch.no_grad():
                    prediction = learner(grid).cpu().numpy().ravel()
                ax.plot(xs, prediction, style, label="before adaptation" if k == 0 else f"after {k} step(s)")
            ax.plot(task.support_x.cpu().numpy().ravel(), task.support_y.cpu().numpy().ravel(), "r^", ms=8,
                    label=f"support (K={task.support_x.shape[0]})")
            ax.set(xlabel="x", ylabel="y", title=f"A={amplitude:.2f}, phase={phase:.2f}")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    finally:
        algorithm.train(was_training)
    return fig


def _no_validation_split(cfg: DictConfig) -> bool:
    """Whether the run's dataset.split has a validation size of 0 (Omniglot's [n, 0, m])."""
    split = OmegaConf.select(cfg, "dataset.split")
    return split is not None and len(split) == 3 and split[1] == 0


def _value(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key)
    return "null" if value is None else value


def _metric_lines(row: dict) -> list[str]:
    regression = row["metric"] == "mse"
    scale, unit = (1, "MSE") if regression else (100, "accuracy %")
    lines = ["| quantity | value |", "|---|---|",
             f"| test {unit} (mean ± 95 % CI) | {scale * float(row['mean']):.4g} ± {scale * float(row['ci95']):.2g} |",
             f"| test loss | {float(row['test_loss']):.4g} ± {float(row['test_loss_ci95']):.2g} |"]
    if not regression:
        lines.append(f"| test accuracy | {100 * float(row['test_accuracy']):.2f} ± "
                     f"{100 * float(row['test_accuracy_ci95']):.2f} % |")
    for key in ("n_tasks", "checkpoint", "iterations_done", "train_seconds", "seconds_per_iteration",
                "peak_memory_mb", "device"):
        if key in row:
            value = row[key]
            lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return lines


def write_report(cfg: DictConfig, run_dir: str | Path, row: dict | None = None, algorithm=None) -> Path:
    """Write report.md (+ curves.png, + adaptation.png on sinusoid) into run_dir. `algorithm` with the tested
    weights may be passed in; otherwise the tested checkpoint is loaded for the adaptation plot."""
    run_dir = Path(run_dir)
    if row is None:
        row = read_csv(run_dir / "results.csv", typed=True)[0]
    lines = [f"# Run report: {_value(cfg, 'name')}", "", f"Run directory: `{run_dir}`", "", "## Configuration", "",
             "| key | value |", "|---|---|"]
    lines += [f"| {key} | {_value(cfg, key)} |" for key in [*result_fields(cfg), *SUMMARY_KEYS]
              if OmegaConf.select(cfg, key) is not None
              or key == "train.iterations"]
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        items = OmegaConf.to_container(OmegaConf.load(overrides)) or []
        lines += ["", "Command-line overrides: " + (" ".join(f"`{o}`" for o in items) or "none")]
    lines += ["", "## Final test", "", *_metric_lines(row), ""]

    metrics = run_dir / "metrics.csv"
    if metrics.is_file() and read_csv(metrics):
        rows = read_csv(metrics, typed=True)
        save_figure(learning_curves_figure({"": rows}, str(_value(cfg, "name"))), run_dir / CURVES)
        how = (f"Validation on {_value(cfg, 'train.val_tasks')} fixed tasks every "
               f"{_value(cfg, 'train.val_interval')} iterations, after {_value(cfg, 'eval.inner_steps')} "
               f"inner steps (metrics.csv)." if not _no_validation_split(cfg) else
               f"No validation (dataset.split has no validation characters): training averages every "
               f"{_value(cfg, 'train.val_interval')} iterations (metrics.csv); the model tested is the last.")
        lines += ["## Learning curves", "", f"![learning curves]({CURVES})", "", how, ""]

    n_plot = int(OmegaConf.select(cfg, "report.adaptation_tasks", default=3) or 0)
    if OmegaConf.select(cfg, "dataset.kind") == "sinusoid" and n_plot > 0:
        try:
            _adaptation_plot(cfg, run_dir, row, algorithm, n_plot)
            lines += ["## Adaptation on test tasks", "", f"![adaptation]({ADAPTATION})", "",
                      f"The first {n_plot} test tasks (eval.seed={_value(cfg, 'eval.seed')}): support points, the "
                      f"true sinusoid and the prediction before adaptation, after 1 and after "
                      f"{_value(cfg, 'eval.inner_steps')} inner steps.", ""]
        except Exception as exc:  # a plot must never hide the run's results
            log.warning("adaptation plot skipped: %s", exc)
    ablation = run_dir / "ablation.csv"
    if ablation.is_file():
        lines += ["## Inner-step ablation", "", f"![ablation heatmap](ablation.png) ![curves](ablation_curves.png)",
                  "", "See ablation.md / ablation.csv.", ""]
    return atomic_write_text(run_dir / REPORT, "\n".join(lines))


def _adaptation_plot(cfg, run_dir: Path, row: dict, algorithm, n_plot: int) -> None:
    from .checkpoint import load_algorithm
    from .data import build_sources
    from .train import build

    if algorithm is None:
        trainer = build(cfg, run_dir)
        which = row.get("checkpoint") or "best"
        which = "best" if which == "ensemble" else which  # one model per figure; an ensemble's are in checkpoints/top/
        load_algorithm(trainer.algorithm, trainer.checkpoint_dir / f"{which}.pt", map_location=trainer.device)
        algorithm, source, device = trainer.algorithm, trainer.sources["test"], trainer.device
    else:
        source, device = build_sources(cfg.dataset)["test"], next(algorithm.parameters()).device
    tasks = source.fixed_tasks(n_plot, int(cfg.eval.seed))
    fig = adaptation_figure(algorithm, tasks, int(cfg.eval.inner_steps), tuple(cfg.dataset.x_range), device)
    save_figure(fig, run_dir / ADAPTATION)
