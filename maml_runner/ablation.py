"""Inner-step ablation: one model per training inner-step value, each tested with every evaluation inner-step value
on the same fixed test tasks (eval.num_tasks tasks drawn with eval.seed, as in the run's own test).

`maml-run ablation.enabled=true ablation.train_steps=[1,3,5] ablation.eval_steps=[1,3,5,10]` writes into the run dir:
  train_steps_<t>/        a normal run per training value (reused when it already finished: run the same command
                          with hydra.run.dir=<that dir>, or name finished runs in ablation.from_runs)
  ablation.csv            train_steps, eval_steps, metric, test loss/accuracy with 95 % CIs, n_tasks, checkpoint
  ablation_tasks.csv      the per-task values behind every cell (paired comparisons between cells)
  ablation.md / report.md the grid in the format of PROTOCOLS.md's table
  ablation.png            heatmap (accuracy for classification, MSE for regression)
  ablation_curves.png     validation learning curves per training value + test metric against evaluation steps
  tb/                     the cells as TensorBoard scalars (ablation/train_steps_<t>/..., step = eval steps) + figures
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from .checkpoint import LAST, load_algorithm, load_checkpoint
from .errors import UserError
from .ensemble import ENSEMBLE, describe, kept_iterations, top_dir
from .ensemble import members as ensemble_members
from .evaluate import evaluate, evaluate_ensemble
from .io import atomic_write_text, read_csv, write_csv

log = logging.getLogger(__name__)

CSV, TASKS_CSV, HEATMAP, CURVES, MARKDOWN = ("ablation.csv", "ablation_tasks.csv", "ablation.png",
                                             "ablation_curves.png", "ablation.md")
COLUMNS = ["train_steps", "eval_steps", "metric", "test_loss", "test_loss_ci95", "test_accuracy",
           "test_accuracy_ci95", "n_tasks", "eval_seed", "checkpoint"]


def _steps(cfg: DictConfig, key: str, allow_empty: bool = False) -> list[int]:
    value = OmegaConf.select(cfg, key)
    shown = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
    shown = "[" + ",".join(map(str, shown)) + "]" if isinstance(shown, list) else shown
    bad = UserError(f"{key}={shown} is invalid: expected a list of distinct positive integers, e.g. {key}=[1,3,5]")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (ListConfig, list)) or (not value and not allow_empty):
        raise bad
    values = list(value)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values) or len(set(values)) != len(values):
        raise bad
    return values


def _from_runs(cfg: DictConfig) -> dict[int, tuple[Path, dict]]:
    """ablation.from_runs: finished run dirs (or .pt files) -> {train inner steps: (checkpoint, saved config)}."""
    value = OmegaConf.select(cfg, "ablation.from_runs") or []
    if isinstance(value, str):
        value = [value]
    found: dict[int, tuple[Path, dict]] = {}
    which = str(cfg.eval.checkpoint)
    for item in value:
        path = Path(str(item)).expanduser()
        name = f"{which}.pt"
        if which == ENSEMBLE:  # the run's kept checkpoints; last.pt holds the config and the validation rows
            if not path.is_dir() or not kept_iterations(path / "checkpoints"):
                raise UserError(f"ablation.from_runs: no checkpoints in '{top_dir(path / 'checkpoints')}' "
                                f"(eval.checkpoint=ensemble needs run directories trained with it); use "
                                f"eval.checkpoint=best or last")
            name = LAST
        checkpoint = path if path.is_file() else path / "checkpoints" / name
        if not checkpoint.is_file() and path.is_dir():
            checkpoint = path / "checkpoints" / LAST
        if not checkpoint.is_file():
            raise UserError(f"ablation.from_runs: no checkpoint at '{checkpoint}'; name run directories that have "
                            f"checkpoints/{which}.pt (or .pt files)")
        saved = load_checkpoint(checkpoint).get("config") or {}
        steps = OmegaConf.select(OmegaConf.create(saved), "algorithm.inner_steps")
        if steps is None:
            raise UserError(f"ablation.from_runs: checkpoint '{checkpoint}' has no saved config "
                            f"(algorithm.inner_steps); use a checkpoint written by maml-run")
        if int(steps) in found:
            raise UserError(f"ablation.from_runs: two runs trained with algorithm.inner_steps={steps} "
                            f"({found[int(steps)][0]} and {checkpoint}); keep one")
        dataset = OmegaConf.select(OmegaConf.create(saved), "dataset.name")
        if dataset != cfg.dataset.name:
            raise UserError(f"ablation.from_runs: '{checkpoint}' was trained on dataset {dataset}, this ablation "
                            f"tests on {cfg.dataset.name}; pass dataset={dataset} or drop that run")
        found[int(steps)] = (checkpoint, saved)
    return found


def cell_config(cfg: DictConfig, train_steps: int) -> DictConfig:
    """The config of the training run for one training inner-step value."""
    sub = copy.deepcopy(cfg)
    sub.algorithm.inner_steps = int(train_steps)
    sub.ablation.enabled = False
    return sub


def _train_or_reuse(cfg: DictConfig, sub_dir: Path) -> Path:
    """Train the cell's model, or reuse / continue the run already in sub_dir. Returns the checkpoint to test."""
    from .train import run

    # An existing run continues (or, finished with the same config, is reused as is: run() skips it).
    cfg.train.resume = str(sub_dir) if (sub_dir / "checkpoints" / LAST).is_file() else False
    row = run(cfg, sub_dir)
    which = row.get("checkpoint") or cfg.eval.checkpoint
    return sub_dir / "checkpoints" / (LAST if which == ENSEMBLE else f"{which}.pt")  # ensemble: _members reads it


def _members(cfg: DictConfig, checkpoint: Path, task_type: str) -> list[Path]:
    """eval.checkpoint=ensemble: the kept checkpoints of the run `checkpoint` (its last.pt) belongs to, ranked by
    its validations (ensemble.members); empty otherwise, or when the run kept none (its test used last.pt)."""
    if str(cfg.eval.checkpoint) != ENSEMBLE or checkpoint.name != LAST:
        return []
    rows = list(load_checkpoint(checkpoint).get("metrics_rows") or [])
    chosen = ensemble_members(checkpoint.parent, rows, int(cfg.eval.ensemble_size), task_type)
    if chosen:
        log.info("ablation: %s: ensemble of iterations %s", checkpoint.parent.parent,
                 describe(chosen, int(cfg.eval.ensemble_size), task_type))
    return [path for _, path, _ in chosen]


def _report(cfg: DictConfig, run_dir: Path) -> None:
    from .report import write_report
    try:
        write_report(cfg, run_dir)
    except Exception as exc:  # noqa: BLE001 - a plot problem must not stop the ablation
        log.warning("report.md not written for %s: %s", run_dir, exc)


def run_ablation(cfg: DictConfig, run_dir: str | Path) -> list[dict]:
    """Train (or reuse) one model per ablation.train_steps value and test every ablation.eval_steps value."""
    from . import config as config_checks
    from .algorithms import build_algorithm
    from .data import build_sources
    from .hardware import configure
    from .models import build_model

    config_checks.validate(cfg)
    eval_steps = _steps(cfg, "ablation.eval_steps")
    reused = _from_runs(cfg)
    train_steps = sorted(set(_steps(cfg, "ablation.train_steps", allow_empty=bool(reused))) | set(reused))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    checkpoints: dict[int, tuple[Path, DictConfig, Path | None]] = {}
    for t in train_steps:
        if t in reused:
            checkpoint, saved = reused[t]
            sub_cfg = OmegaConf.create(saved)
            sub_cfg.eval = copy.deepcopy(cfg.eval)  # same test tasks for every cell
            checkpoints[t] = (checkpoint, sub_cfg, checkpoint.parent.parent)
            log.info("ablation: train_steps=%d reuses %s", t, checkpoint)
        else:
            sub_cfg, sub_dir = cell_config(cfg, t), run_dir / f"train_steps_{t}"
            log.info("ablation: train_steps=%d -> %s", t, sub_dir)
            checkpoints[t] = (_train_or_reuse(sub_cfg, sub_dir), sub_cfg, sub_dir)
            if OmegaConf.select(cfg, "report.enabled", default=False):
                _report(sub_cfg, sub_dir)

    device = configure(cfg.hardware, int(cfg.seed))
    sources = build_sources(cfg.dataset)
    n_tasks, seed = int(cfg.eval.num_tasks), int(cfg.eval.seed)
    tasks = [task.to(device) for task in sources["test"].fixed_tasks(n_tasks, seed)]  # one set for every cell
    rows, task_rows = [], []
    for t in train_steps:
        checkpoint, sub_cfg, _ = checkpoints[t]
        model = build_model(sub_cfg.model, sub_cfg.dataset).to(device)
        algorithm = build_algorithm(model, sub_cfg.algorithm, sources["train"].task_type,
                                    int(sub_cfg.train.iterations), train_source=sources["train"]).to(device)
        load_algorithm(algorithm, checkpoint, map_location=device)
        members = _members(cfg, checkpoint, algorithm.task_type)
        for e in eval_steps:
            if members:  # every member's outputs on the same tasks, averaged (ensemble.py)
                result = evaluate_ensemble(algorithm, members, lambda: iter(tasks), e, device)
            else:
                result = evaluate(algorithm, tasks, e, device)
            metric = "mse" if algorithm.task_type == "regression" else "accuracy"
            rows.append({"train_steps": t, "eval_steps": e, "metric": metric, **result.summary("test"),
                         "n_tasks": result.n_tasks, "eval_seed": seed,
                         "checkpoint": " + ".join(map(str, members)) if members else str(checkpoint)})
            task_rows += [{"train_steps": t, "eval_steps": e, **r} for r in result.task_rows()]
            log.info("ablation: train %d / eval %d steps: test loss %.4g%s", t, e, rows[-1]["test_loss"],
                     "" if metric == "mse" else f", accuracy {100 * rows[-1]['test_accuracy']:.2f}%")
    write_csv(run_dir / CSV, rows, COLUMNS)
    write_csv(run_dir / TASKS_CSV, task_rows, ["train_steps", "eval_steps", "task", "loss", "accuracy"])
    curves = {t: read_csv(d / "metrics.csv", typed=True) for t, (_, _, d) in checkpoints.items()
              if d is not None and (d / "metrics.csv").is_file()}
    write_outputs(run_dir, rows, curves, title=str(cfg.name))
    return rows


def grid(rows: list[dict], key: str) -> tuple[list[int], list[int], np.ndarray]:
    """rows -> (train steps, eval steps, matrix[train, eval] of `key`)."""
    train = sorted({int(r["train_steps"]) for r in rows})
    evals = sorted({int(r["eval_steps"]) for r in rows})
    matrix = np.full((len(train), len(evals)), np.nan)
    for r in rows:
        matrix[train.index(int(r["train_steps"])), evals.index(int(r["eval_steps"]))] = float(r[key])
    return train, evals, matrix


def markdown(rows: list[dict], title: str = "") -> str:
    """The grid in PROTOCOLS.md's format (one line per training value, eval values joined by ' / ') + full table."""
    regression = rows[0]["metric"] == "mse"
    train, evals, loss = grid(rows, "test_loss")
    _, _, acc = grid(rows, "test_accuracy")
    lines = [f"# Inner-step ablation{': ' + title if title else ''}", "",
             f"Each model tested on the same {rows[0]['n_tasks']} tasks (eval seed {rows[0].get('eval_seed')}); "
             f"± is the 95 % CI over tasks.", ""]
    header = ["train inner steps", "eval inner steps", "test meta-loss"] + ([] if regression else ["test accuracy %"])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, t in enumerate(train):
        cells = [str(t), " / ".join(map(str, evals)), " / ".join(f"{v:.3f}" for v in loss[i])]
        if not regression:
            cells.append(" / ".join(f"{100 * v:.2f}" for v in acc[i]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| train steps | eval steps | test loss | test accuracy % |", "|---|---|---|---|"]
    for r in rows:
        accuracy = "–" if regression else f"{100 * r['test_accuracy']:.2f} ± {100 * r['test_accuracy_ci95']:.2f}"
        lines.append(f"| {r['train_steps']} | {r['eval_steps']} | {r['test_loss']:.4g} ± {r['test_loss_ci95']:.2g} "
                     f"| {accuracy} |")
    return "\n".join(lines) + "\n"


def heatmap_figure(rows: list[dict], title: str = ""):
    from matplotlib.figure import Figure

    regression = rows[0]["metric"] == "mse"
    key = "test_loss" if regression else "test_accuracy"
    train, evals, matrix = grid(rows, key)
    values = matrix if regression else 100 * matrix
    fig = Figure(figsize=(1.3 * len(evals) + 2.5, 1.0 * len(train) + 1.8))
    ax = fig.subplots()
    # Lower MSE is better: reversed colour map so that "good" has the same colour in both cases.
    image = ax.imshow(values, cmap="viridis_r" if regression else "viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="test MSE" if regression else "test accuracy %")
    ax.set_xticks(range(len(evals)), [str(e) for e in evals])
    ax.set_yticks(range(len(train)), [str(t) for t in train])
    ax.set(xlabel="eval inner steps", ylabel="train inner steps", title=title or "inner-step ablation")
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(train)):
        for j in range(len(evals)):
            v = values[i, j]
            dark = (v > middle) if regression else (v < middle)
            ax.text(j, i, f"{v:.3g}" if regression else f"{v:.1f}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=9)
    return fig


def curves_figure(rows: list[dict], curves: dict[int, list[dict]], title: str = ""):
    from matplotlib.figure import Figure

    regression = rows[0]["metric"] == "mse"
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for i, (t, metrics) in enumerate(sorted(curves.items())):
        it = [r["iteration"] for r in metrics]
        left.plot(it, [r["val_loss"] for r in metrics], "-o", ms=3, color=f"C{i}", label=f"train steps {t} (val)")
        left.plot(it, [r["train_loss"] for r in metrics], "--", color=f"C{i}", alpha=0.6)
    left.set(xlabel="meta-iteration", ylabel="loss (dashed: train, solid: val)", title="learning curves")
    train, evals, matrix = grid(rows, "test_loss" if regression else "test_accuracy")
    _, _, ci = grid(rows, "test_loss_ci95" if regression else "test_accuracy_ci95")
    scale = 1 if regression else 100
    for i, t in enumerate(train):
        offset = 0.06 * (i - (len(train) - 1) / 2) * (max(evals) - min(evals) or 1) / max(len(evals), 2)
        right.errorbar(np.asarray(evals) + offset, scale * matrix[i], yerr=scale * ci[i], marker="o", capsize=3,
                       color=f"C{i}", label=f"train steps {t}")
    right.set(xlabel="eval inner steps", ylabel="test MSE" if regression else "test accuracy %",
              title="test after k adaptation steps")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def write_outputs(run_dir: Path, rows: list[dict], curves: dict[int, list[dict]], title: str = "") -> None:
    """ablation.md/report.md, the heatmap, the curves, and TensorBoard scalars + figures in run_dir/tb."""
    from torch.utils.tensorboard import SummaryWriter

    from .report import save_figure

    text = markdown(rows, title)
    text += f"\n![heatmap]({HEATMAP})\n\n![curves]({CURVES})\n"
    atomic_write_text(run_dir / MARKDOWN, text)
    atomic_write_text(run_dir / "report.md", text)
    heatmap, curves_fig = heatmap_figure(rows, title), curves_figure(rows, curves, title)
    save_figure(heatmap, run_dir / HEATMAP)
    save_figure(curves_fig, run_dir / CURVES)
    writer = SummaryWriter(str(run_dir / "tb"))
    try:
        for r in rows:
            for key in ("test_loss", "test_accuracy"):
                if np.isfinite(r[key]):
                    writer.add_scalar(f"ablation/train_steps_{r['train_steps']}/{key}", r[key], r["eval_steps"])
        writer.add_figure("ablation/heatmap", heatmap, close=False)
        writer.add_figure("ablation/curves", curves_fig, close=False)
    finally:
        writer.close()
