"""Gather the results.csv of many runs (a sweep, several sweeps) into one table with the swept keys as columns,
plus paired comparisons against a baseline run over the same test tasks (from each run's test_tasks.csv).

Used by scripts/aggregate.py and, at the end of every `maml-run -m` sweep, by `AggregateCallback`.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import OmegaConf

from .config import is_result_config_column
from .errors import UserError
from .io import atomic_write_text, read_csv, write_csv
from .stats import paired_comparison

log = logging.getLogger(__name__)

RESULTS, TEST_TASKS = "results.csv", "test_tasks.csv"
# Overrides that say where things are, not what was run.
IGNORED_OVERRIDES = ("hydra.", "hydra/", "dataset.root", "train.resume", "dataset.cache_dir")
# best_val_loss is what each job returned to the sweeper (cli.sweep_objective): pick settings by it, not by mean.
METRIC_COLUMNS = ["metric", "mean", "ci95", "test_loss", "test_loss_ci95", "test_accuracy", "test_accuracy_ci95",
                  "best_val_loss", "best_val_accuracy", "n_tasks", "iterations_done", "train_seconds", "seconds_per_iteration", "peak_memory_mb"]


def _natural_key(path: Path):
    """Hydra job dirs `0_...`, `1_...`, `10_...` in job order, not string order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(roots: Iterable[str | Path]) -> list[Path]:
    runs = set()
    for root in roots:
        root = Path(root).resolve()  # relative sweep dirs (the usual multirun/...) and absolute ones alike
        if not root.exists():
            raise UserError(f"'{root}' does not exist; pass a sweep or run directory (e.g. multirun/<date>_<time>)")
        if (root / RESULTS).is_file():
            runs.add(root)
        runs.update(p.parent for p in root.rglob(RESULTS) if not any(part.startswith(".") for part in p.parts))
    return sorted(runs, key=_natural_key)


def run_overrides(run_dir: Path) -> dict[str, str]:
    """The command-line overrides of a Hydra run (its .hydra/overrides.yaml), minus location-only keys."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    overrides = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith(IGNORED_OVERRIDES):
            overrides[key] = value
    return overrides


def _eval_seed(run_dir: Path):
    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.select(OmegaConf.load(path), "eval.seed") if path.is_file() else None


def collect(roots: Iterable[str | Path]) -> tuple[list[dict], list[str]]:
    """One row per run: run dir, swept keys, metrics. Swept keys: overrides whose value differs between runs
    (else result-config columns that differ, for runs not started through Hydra). Built as a pandas DataFrame;
    returned as records (each with `_dir` and its results row `_row`) for the comparisons and the markdown."""
    import pandas as pd

    runs = find_runs(roots)
    if not runs:
        raise UserError(f"no {RESULTS} under {', '.join(map(str, roots))}; run maml-run first (runs that did not "
                        f"finish have no {RESULTS})")
    rows, overrides = [], []
    for run_dir in runs:
        found = read_csv(run_dir / RESULTS, typed=True)
        if len(found) != 1:
            raise UserError(f"'{run_dir / RESULTS}' has {len(found)} rows; expected 1 (a results.csv written by "
                            f"maml-run)")
        rows.append(found[0])
        overrides.append(run_overrides(run_dir))
    # One column per overridden key (first-seen order); None where a run left the key alone (a distinct value).
    given = pd.DataFrame.from_records(overrides, columns=list(dict.fromkeys(k for o in overrides for k in o)))
    given = given.astype(object).where(given.notna(), None)
    swept = [key for key in given.columns if given[key].nunique(dropna=False) > 1]
    if not swept:
        # The config columns of every row (runs of different algorithms record different algorithm keys).
        config_columns = list(dict.fromkeys(k for row in rows for k in row if is_result_config_column(k)))
        # str() per value: a key a run lacks is "None", one more distinct value (astype(str) would keep NaN).
        configs = pd.DataFrame([{key: str(row.get(key)) for key in config_columns} for row in rows],
                               columns=config_columns)
        swept = [key for key in config_columns if configs[key].nunique() > 1]
    common = _common_parent(runs)
    table = pd.DataFrame({"run": [str(r.relative_to(common)) if common else str(r) for r in runs]}, dtype=object)
    for key in swept:
        # A group not overridden in this run (e.g. set by an experiment preset): the name it ran with.
        table[key] = pd.Series([o[key] if key in o else row.get(key, row.get(f"{key}.name"))
                                for o, row in zip(overrides, rows)], dtype=object)
    for key in METRIC_COLUMNS:  # object columns: None stays "no value", nan stays a number
        table[key] = pd.Series([row.get(key) for row in rows], dtype=object)
    records = table.to_dict("records")
    for record, run_dir, row in zip(records, runs, rows):
        record["_dir"], record["_row"] = run_dir, row
    return records, swept


def _common_parent(paths: Sequence[Path]) -> Path | None:
    import os
    try:
        parent = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    except ValueError:
        return None
    if len(paths) == 1:
        parent = parent.parent
    return parent


def _task_values(run_dir: Path, column: str):
    path = run_dir / TEST_TASKS
    if not path.is_file():
        return None
    return [float(row[column]) for row in read_csv(path)]


def _comparable(a: dict, b: dict) -> str | None:
    """None when a and b were tested on the same tasks, else why not."""
    if a["metric"] != b["metric"]:
        return "different metrics"
    if a["n_tasks"] != b["n_tasks"]:
        return f"{a['n_tasks']} vs {b['n_tasks']} test tasks"
    seeds = (_eval_seed(a["_dir"]), _eval_seed(b["_dir"]))
    if None not in seeds and seeds[0] != seeds[1]:
        return f"eval.seed {seeds[0]} vs {seeds[1]}"
    for key in ("dataset.name", "dataset.ways", "dataset.shots", "dataset.query_shots"):
        if a["_row"].get(key) != b["_row"].get(key):
            return f"{key} {a['_row'].get(key)} vs {b['_row'].get(key)}"
    return None


def select_baseline(table: list[dict], baseline: str | None) -> dict:
    """The first run, or the run whose columns match every `key=value` in `baseline` (comma-separated)."""
    if not baseline:
        return table[0]
    wanted = dict(part.split("=", 1) for part in baseline.split(",") if "=" in part)
    matches = [row for row in table if all(str(row.get(k)) == v or Path(str(row["run"])).name == v
                                           for k, v in wanted.items())]
    if len(matches) != 1:
        raise UserError(f"--baseline {baseline!r} matches {len(matches)} runs; expected exactly 1 (columns: "
                        f"{', '.join(k for k in table[0] if not k.startswith('_'))})")
    return matches[0]


def compare(table: list[dict], baseline: dict, swept: Sequence[str]) -> list[dict]:
    """Each run against the baseline, paired over the test tasks: (run - baseline) of accuracy or MSE."""
    rows = []
    column = "loss" if baseline["metric"] == "mse" else "accuracy"
    base_values = _task_values(baseline["_dir"], column)
    for row in table:
        if row is baseline:
            continue
        entry = {"run": row["run"], "baseline": baseline["run"],
                 **{key: row.get(key) for key in swept}, "metric": row["metric"]}
        why = _comparable(row, baseline)
        values = _task_values(row["_dir"], column)
        if why is None and (values is None or base_values is None):
            why = f"no {TEST_TASKS} (run finished before per-task values were written)"
        if why is None and len(values) != len(base_values):
            why = f"{TEST_TASKS} has {len(values)} vs {len(base_values)} rows"
        if why is not None:
            entry["note"] = f"not paired: {why}"
        else:
            entry.update(paired_comparison(values, base_values).as_row())
            entry["note"] = ""
        rows.append(entry)
    return rows


def _label(run: str) -> str:
    """Hydra job dirs are named '<num>_<all overrides>': the swept columns already say the rest."""
    match = re.match(r"^(.*?)(\d+)_[^/]*=", run)
    return f"{match.group(1)}{match.group(2)}" if match else run


def _fmt(value, metric: str, scale_accuracy: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if metric == "accuracy" and scale_accuracy else f"{value:.4g}"
    return str(value)


def markdown(table: list[dict], swept: Sequence[str], comparisons: list[dict], baseline: dict | None) -> str:
    lines = ["# Aggregated results", "",
             f"{len(table)} runs; swept keys: {', '.join(swept) or 'none'}. Accuracy in %, MSE as is; ± is the 95 % CI "
             f"over test tasks (1.96·std/√n). Best val loss: the lowest validation loss, the value each job returned "
             f"to the sweeper; choose settings by it, not by the test mean.", ""]
    header = ["run", *swept, "metric", "mean ± ci95", "test loss", "best val loss", "n_tasks", "iterations", "s/iter",
              "peak MB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table:
        m = row["metric"]
        lines.append("| " + " | ".join([_label(str(row["run"])), *[str(row.get(k)) for k in swept], str(m),
                                        f"{_fmt(row['mean'], m)} ± {_fmt(row['ci95'], m)}",
                                        f"{_fmt(row['test_loss'], 'mse')}", _fmt(row.get("best_val_loss"), "mse"),
                                        str(row["n_tasks"]),
                                        str(row.get("iterations_done")), _fmt(row.get("seconds_per_iteration"), ""),
                                        _fmt(row.get("peak_memory_mb"), "")]) + " |")
    if baseline is not None and comparisons:
        lines += ["", f"## Paired comparison against run {_label(str(baseline['run']))}", "",
                  "Difference = run − baseline per test task (same tasks: same dataset, eval.seed, eval.num_tasks); "
                  "95 % CI by bootstrap over tasks (10,000 resamples), p from a paired t-test.", ""]
        header = ["run", *swept, "metric", "difference", "95 % CI", "p", "significant"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in comparisons:
            m = row["metric"]
            if row["note"]:
                cells = [row["note"], "", "", ""]
            else:
                cells = [_fmt(row["diff"], m), f"[{_fmt(row['diff_ci95_low'], m)}, {_fmt(row['diff_ci95_high'], m)}]",
                         f"{row['p_value']:.3g}", "yes" if row["significant"] else "no"]
            lines.append("| " + " | ".join([_label(str(row["run"])), *[str(row.get(k)) for k in swept], m, *cells])
                         + " |")
    return "\n".join(lines) + "\n"


def aggregate(roots: Iterable[str | Path], out_dir: str | Path | None = None,
              baseline: str | None = None) -> dict:
    """Write aggregate.csv, comparisons.csv and aggregate.md into out_dir (default: the first root)."""
    roots = [Path(r) for r in roots]
    table, swept = collect(roots)
    base = select_baseline(table, baseline)
    comparisons = compare(table, base, swept)
    out = Path(out_dir) if out_dir is not None else roots[0]
    columns = ["run", *swept, *METRIC_COLUMNS]
    write_csv(out / "aggregate.csv", table, columns)
    if comparisons:
        comp_columns = list(dict.fromkeys(k for row in comparisons for k in row))
        write_csv(out / "comparisons.csv", comparisons, comp_columns)
    atomic_write_text(out / "aggregate.md", markdown(table, swept, comparisons, base))
    return {"table": table, "swept": swept, "comparisons": comparisons, "baseline": base, "out": out}


try:  # the multirun callback; Hydra is a dependency, but keep this module importable on its own
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class AggregateCallback(Callback):
    """At the end of a sweep, aggregate its jobs into <sweep dir>/aggregate.{csv,md} (never fails the sweep)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            result = aggregate([sweep_dir])
        except Exception as exc:  # e.g. every job failed: the jobs' own errors are what matters
            log.warning("sweep aggregation skipped: %s", exc)
            return
        log.info("aggregated %d runs: %s", len(result["table"]), result["out"] / "aggregate.md")


USAGE = """Gather every run's results.csv under the given directories into one table, swept keys as columns, with
paired comparisons against a baseline run over the same test tasks (from each run's test_tasks.csv).

  maml-aggregate multirun/2026-11-22_10-00-00
  maml-aggregate multirun/a multirun/b --out reports/ab --baseline algorithm=maml

Writes aggregate.csv, aggregate.md and comparisons.csv into --out (default: the first directory). `maml-run -m`
does the same at the end of every sweep (hydra.callbacks.aggregate in conf/config.yaml).
"""


def main(argv=None) -> int:
    """`maml-aggregate` (also scripts/aggregate.py): bad input is one line on stderr and exit code 2."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="sweep or run directories (searched recursively for results.csv)")
    parser.add_argument("--out", default=None, help="where to write (default: the first directory)")
    parser.add_argument("--baseline", default=None,
                        help="the run the others are compared with: key=value[,key=value] over the table's columns "
                             "(default: the first run)")
    args = parser.parse_args(argv)
    try:
        result = aggregate(args.dirs, args.out, args.baseline)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    print((result["out"] / "aggregate.md").read_text())
    return 0
