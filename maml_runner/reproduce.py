"""Rebuild a paper's table: run each cell's conf/experiment preset, then write table.md and table.csv with our
mean ± 95 % CI, the paper's number (maml_runner/paper_results.yaml), the difference and the training budget used.

`budget` scales every cell's train.iterations (0.002 -> 120 of Finn's 60,000) so the machinery can be run on a
CPU; the table then says plainly that its numbers are not comparable with the paper's.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

from omegaconf import DictConfig, OmegaConf

from .errors import UserError
from .io import atomic_write_text, read_csv, write_csv
from .paths import CONF_DIR, PAPER_RESULTS  # a checkout's conf/, or the copy inside an installed wheel

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["method", "setting", "experiment", "metric", "ours", "ours_ci95", "paper", "paper_ci95",
                 "difference", "iterations", "iterations_configured", "paper_iterations", "budget", "n_tasks",
                 "eval_steps", "seconds",
                 "run_dir", "status"]


def load_tables(path: str | Path = PAPER_RESULTS) -> dict:
    tables = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    for name, table in tables.items():
        for key in ("title", "citation", "metric", "cells"):
            if key not in table:
                raise UserError(f"{path}: table {name} lacks '{key}'")
    return tables


def table_spec(name: str, path: str | Path = PAPER_RESULTS) -> dict:
    tables = load_tables(path)
    if name not in tables:
        raise UserError(f"table {name!r} is not known; choose one of: {', '.join(tables)}")
    return tables[name]


def check_budget(budget: float) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0 < budget <= 1) \
            or not math.isfinite(budget):
        raise UserError(f"budget={budget} is invalid: expected a number in (0, 1], the fraction of the paper's "
                        f"iterations (e.g. 0.002 for a CPU check, 1 for the full protocol)")
    return float(budget)


def compose_cell(experiment: str, budget: float, overrides: Sequence[str] = ()) -> tuple[DictConfig, int]:
    """The cell's config with train.iterations scaled by `budget`; returns (config, the preset's iterations)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name="config", overrides=[f"experiment={experiment}", *overrides])
    paper_iterations = int(cfg.train.iterations)
    if not any(o.startswith("train.iterations=") for o in overrides):
        cfg.train.iterations = max(1, round(paper_iterations * budget))
    if not any(o.startswith("train.val_interval=") for o in overrides):
        # About ten validations whatever the budget (and never fewer iterations than one interval).
        cfg.train.val_interval = max(1, min(int(cfg.train.val_interval), int(cfg.train.iterations) // 10 or 1))
    return cfg, paper_iterations


def _cell_row(cell: dict, metric: str, result: dict | None, cfg: DictConfig, paper_iterations: int, budget: float,
              seconds: float, run_dir: Path, status: str) -> dict:
    scale = 100.0 if metric == "accuracy" else 1.0
    ours = scale * float(result["mean"]) if result else math.nan
    ours_ci = scale * float(result["ci95"]) if result else math.nan
    paper = cell.get("paper")
    return {"method": cell["method"], "setting": cell["setting"], "experiment": cell["experiment"], "metric": metric,
            "ours": ours, "ours_ci95": ours_ci, "paper": paper, "paper_ci95": cell.get("paper_ci95"),
            "difference": (ours - float(paper)) if paper is not None and result else None,
            # What the cell actually trained (train.max_minutes or a stop can end it early), not what was asked.
            "iterations": int(result["iterations_done"]) if result else 0,
            "iterations_configured": int(cfg.train.iterations), "paper_iterations": paper_iterations, "budget": budget,
            "n_tasks": int(result["n_tasks"]) if result else int(cfg.eval.num_tasks),
            "eval_steps": int(cfg.eval.inner_steps), "seconds": round(seconds, 1), "run_dir": str(run_dir),
            "status": status}


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def comparisons(rows: list[dict]) -> list[dict]:
    """Within each setting, every other finished cell against the first, paired over the same test tasks."""
    from .stats import paired_comparison

    out = []
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "done":
            by_setting.setdefault(row["setting"], []).append(row)
    for setting, cells in by_setting.items():
        base = cells[0]
        for other in cells[1:]:
            column = "loss" if base["metric"] == "mse" else "accuracy"
            paths = [Path(r["run_dir"]) / "test_tasks.csv" for r in (other, base)]
            if not all(p.is_file() for p in paths) or other["n_tasks"] != base["n_tasks"]:
                continue
            a, b = ([float(r[column]) for r in read_csv(p)] for p in paths)
            if len(a) != len(b) or len(a) < 2:
                continue
            result = paired_comparison(a, b)
            out.append({"setting": setting, "a": other["method"], "b": base["method"], "comparison": result})
    return out


def markdown(name: str, spec: dict, rows: list[dict], budget: float) -> str:
    metric = spec["metric"]
    unit = "accuracy %" if metric == "accuracy" else "MSE (lower is better)"
    digits = 2 if metric == "accuracy" else 4
    lines = [f"# {spec['title']}", "", f"Reproduced with `scripts/reproduce.py {name} --budget {budget:g}`. "
             f"Metric: test {unit}, mean ± 95 % CI over the test tasks (1.96·std/√n).", "",
             f"Paper: {' '.join(str(spec['citation']).split())}", "",
             "Each cell's preset runs what the paper's released code ran; docs/protocols.md lists every setting, the "
             "runner's default it replaces and its measured effect.", ""]
    short = [r for r in rows if r["status"] != "done" or r["iterations"] < r["paper_iterations"]]
    if budget < 1:
        examples = sorted({(r["iterations_configured"], r["paper_iterations"]) for r in rows})
        shown = ", ".join(f"{ours:,} of {paper:,}" for ours, paper in examples)
        lines += [f"**Reduced budget: {budget:g} × the paper's training iterations ({shown}).** These numbers show "
                  f"that the pipeline runs end to end; they are **not** comparable with the paper's, which were "
                  f"trained {1 / budget:,.0f}× longer.", ""]
    elif short:
        stopped = ", ".join(f"{r['experiment']} {r['iterations']:,} of {r['paper_iterations']:,}" for r in short)
        lines += [f"**Not the full budget: {len(short)} of {len(rows)} cells did not finish the paper's iterations** "
                  f"({stopped}); their numbers are not comparable with the paper's. The iterations column says "
                  f"what each cell trained.", ""]
    else:
        lines += ["Full budget: every cell trained for the paper's number of iterations.", ""]
    if len(rows) < len(spec["cells"]):  # --cells, or cells still to run: the table is not the paper's whole table
        lines += [f"This table holds {len(rows)} of the paper table's {len(spec['cells'])} cells.", ""]
    lines += ["| method | setting | ours | paper | difference | iterations (ours / paper) | test tasks | eval steps "
              "| status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = f"{_fmt(r['ours'], digits)} ± {_fmt(r['ours_ci95'], digits)}" if r["status"] == "done" else "–"
        paper = _fmt(r["paper"], digits) + ("" if r["paper_ci95"] is None else f" ± {_fmt(r['paper_ci95'], digits)}")
        difference = "–" if r["difference"] is None else f"{float(r['difference']):+.{digits}f}"
        lines.append(f"| {r['method']} | {r['setting']} | {ours} | {paper} | {difference} | "
                     f"{r['iterations']:,} / {r['paper_iterations']:,} | {r['n_tasks']} | {r['eval_steps']} | "
                     f"{r['status']} |")
    paired = comparisons(rows)
    if paired:
        lines += ["", "Paired comparison on the same test tasks (difference a − b of the per-task "
                  f"{'accuracy %' if metric == 'accuracy' else 'MSE'}; bootstrap 95 % CI; paired t-test):", "",
                  "| setting | a − b | difference | 95 % CI | p |", "|---|---|---|---|---|"]
        scale = 100.0 if metric == "accuracy" else 1.0
        for p in paired:
            c = p["comparison"]
            lines.append(f"| {p['setting']} | {p['a']} − {p['b']} | {scale * c.diff:+.{digits}f} | "
                         f"[{scale * c.ci95_low:+.{digits}f}, {scale * c.ci95_high:+.{digits}f}] | {c.p_value:.3g} |")
    return "\n".join(lines) + "\n"


def write_table(out_dir: str | Path, name: str, spec: dict, rows: list[dict], budget: float) -> None:
    out_dir = Path(out_dir)
    write_csv(out_dir / "table.csv", rows, TABLE_COLUMNS)
    atomic_write_text(out_dir / "table.md", markdown(name, spec, rows, budget))


def reproduce(name: str, out_dir: str | Path, budget: float = 1.0, overrides: Sequence[str] = (),
              cells: Sequence[str] | None = None, runner: Callable[[DictConfig, Path], dict] | None = None,
              paper_results: str | Path = PAPER_RESULTS, report: bool = True) -> list[dict]:
    """Run the table's cells (all, or those whose experiment/setting/method contains one of `cells`) into
    out_dir/<experiment>/ and write out_dir/table.{md,csv} after every cell. A finished cell with the same config
    is reused, an interrupted one continues (train.resume)."""
    from .train import run as train_run

    budget = check_budget(budget)
    spec = table_spec(name, paper_results)
    chosen = [c for c in spec["cells"]
              if not cells or any(k in c["experiment"] or k == c["setting"] or k == c["method"] for k in cells)]
    if not chosen:
        raise UserError(f"--cells {','.join(cells or [])} matches no cell of {name}; cells: "
                        f"{', '.join(c['experiment'] for c in spec['cells'])}")
    runner = runner or train_run
    out_dir = Path(out_dir)
    rows: list[dict] = []
    for cell in chosen:
        cfg, paper_iterations = compose_cell(cell["experiment"], budget, overrides)
        run_dir = out_dir / cell["experiment"]
        cfg.train.resume = str(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else False
        log.info("%s: %s, %d of %d iterations -> %s", name, cell["experiment"], int(cfg.train.iterations),
                 paper_iterations, run_dir)
        started = time.perf_counter()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            result, status = runner(cfg, run_dir), "done"
        except UserError as exc:  # e.g. a dataset that is missing: the other cells still run
            log.error("%s failed: %s", cell["experiment"], exc)
            result, status = None, f"failed: {exc}"
        rows.append(_cell_row(cell, spec["metric"], result, cfg, paper_iterations, budget,
                              time.perf_counter() - started, run_dir, status))
        if report and result is not None and OmegaConf.select(cfg, "report.enabled", default=False):
            from .report import write_report
            try:
                write_report(cfg, run_dir, result)
            except Exception as exc:  # noqa: BLE001 - a plot problem must not stop the table
                log.warning("report.md not written for %s: %s", run_dir, exc)
        write_table(out_dir, name, spec, rows, budget)
    return rows
