"""Per-run report (report.md, curves, sinusoid adaptation plot) and the paper-table writer (scripts/reproduce.py):
budget scaling, paper numbers and differences, paired comparisons, presets that follow PROTOCOLS.md."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import compose_config
from maml_runner.data.base import Task
from maml_runner.errors import UserError
from maml_runner.io import read_csv, write_csv
from maml_runner.report import adaptation_figure, sine_truth, write_report
from maml_runner.reproduce import (CONF_DIR, check_budget, compose_cell, load_tables, reproduce, table_spec)
from maml_runner.train import build, run

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["train.iterations=4", "train.val_interval=2", "train.val_tasks=4", "train.meta_batch_size=2",
        "eval.num_tasks=5", "hardware=cpu", "hardware.threads=1"]


def test_report_has_config_final_metrics_curves_and_adaptation_plot(tmp_path):
    cfg = compose_config([*TINY, "algorithm.inner_steps=2"])
    row = run(cfg, tmp_path)
    write_report(cfg, tmp_path, row)
    text = (tmp_path / "report.md").read_text()
    assert "| algorithm.inner_steps | 2 |" in text and "| eval.num_tasks | 5 |" in text
    assert f"| test MSE (mean ± 95 % CI) | {row['mean']:.4g} ± {row['ci95']:.2g} |" in text
    assert "![learning curves](curves.png)" in text and "![adaptation](adaptation.png)" in text
    for name in ("curves.png", "adaptation.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_sine_truth_recovers_amplitude_and_phase_from_the_task_points():
    x = torch.linspace(-5, 5, 15).unsqueeze(1)
    y = 3.2 * torch.sin(x - 2.1)
    amplitude, phase = sine_truth(Task(x[:5], y[:5], x[5:], y[5:]))
    assert amplitude == pytest.approx(3.2, abs=1e-4) and phase == pytest.approx(2.1, abs=1e-4)


def test_adaptation_plot_draws_truth_before_after_1_and_after_k_steps_and_support(tmp_path):
    cfg = compose_config(TINY)
    trainer = build(cfg, tmp_path)
    tasks = trainer.sources["test"].fixed_tasks(2, 1234)
    fig = adaptation_figure(trainer.algorithm, tasks, 10)
    for ax in fig.axes:
        labels = [line.get_label() for line in ax.lines]
        assert labels == ["truth", "before adaptation", "after 1 step(s)", "after 10 step(s)", "support (K=5)"]
        before, after = ax.lines[1].get_ydata(), ax.lines[3].get_ydata()
        assert not np.allclose(before, after)  # ten SGD steps moved the prediction


# ---- paper tables ---------------------------------------------------------------------------------------------
def test_every_table_cell_has_a_preset_and_finn_numbers_match_protocols():
    tables = load_tables()
    assert set(tables) == {"finn2017", "nichol2018", "antoniou2019", "sinusoid"}
    for table in tables.values():
        assert table["citation"]
        for cell in table["cells"]:
            assert (CONF_DIR / "experiment" / f"{cell['experiment']}.yaml").is_file(), cell["experiment"]
    finn = {c["experiment"]: (c["paper"], c["paper_ci95"]) for c in tables["finn2017"]["cells"]}
    assert finn["finn2017_maml_5w1s"] == (98.7, 0.4) and finn["finn2017_fomaml_20w1s"] == (89.4, 0.5)


@pytest.mark.parametrize("experiment, expected", [
    ("finn2017_maml_5w1s", dict(algo="maml", ways=5, shots=1, mb=32, lr=0.4, steps=1, eval_steps=3, iters=60000)),
    ("finn2017_fomaml_20w5s", dict(algo="fomaml", ways=20, shots=5, mb=16, lr=0.1, steps=5, eval_steps=5,
                                   iters=60000)),
    ("nichol2018_reptile_20w1s", dict(algo="reptile", ways=20, shots=1, mb=5, lr=0.0005, steps=10, eval_steps=50,
                                      iters=200000)),
    ("antoniou2019_mamlpp_5w5s", dict(algo="mamlpp", ways=5, shots=5, mb=8, lr=0.1, steps=5, eval_steps=5,
                                      iters=50000)),
    ("sinusoid_pretrain", dict(algo="pretrain", ways=1, shots=10, mb=25, lr=0.01, steps=1, eval_steps=10,
                               iters=70000)),
])
def test_presets_follow_the_protocols(experiment, expected):
    cfg = compose_config([f"experiment={experiment}"])
    got = dict(algo=cfg.algorithm.name, ways=cfg.dataset.ways, shots=cfg.dataset.shots,
               mb=cfg.train.meta_batch_size, lr=cfg.algorithm.inner_lr, steps=cfg.algorithm.inner_steps,
               eval_steps=cfg.eval.inner_steps, iters=cfg.train.iterations)
    assert got == expected
    # 600 test tasks (Finn, Antoniou); supervised-reptile evaluates --eval-samples, 10,000 by default
    assert cfg.eval.num_tasks == (10000 if experiment.startswith("nichol2018") else 600)


def test_budget_scales_iterations_and_validation_interval():
    cfg, paper = compose_cell("finn2017_maml_5w1s", 0.002)
    assert (paper, cfg.train.iterations, cfg.train.val_interval) == (60000, 120, 12)
    cfg, _ = compose_cell("finn2017_maml_5w1s", 1.0)
    assert (cfg.train.iterations, cfg.train.val_interval) == (60000, 500)
    cfg, _ = compose_cell("finn2017_maml_5w1s", 0.002, ["train.iterations=7"])
    assert cfg.train.iterations == 7  # an explicit override wins
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(UserError, match=r"budget=.* is invalid: expected a number in \(0, 1\]"):
            check_budget(bad)
    with pytest.raises(UserError, match="table 'finn' is not known; choose one of: finn2017"):
        table_spec("finn")


def _fake_runner(accuracies: dict, stopped_at: dict | None = None):
    """Stands in for training: writes what a finished run leaves (test_tasks.csv) and returns its results row;
    `stopped_at[algorithm]` makes that run end early (train.max_minutes) at that iteration."""
    def runner(cfg, run_dir: Path):
        acc = np.asarray(accuracies[(cfg.algorithm.name, cfg.dataset.name)])
        write_csv(run_dir / "test_tasks.csv", [{"task": i, "loss": 1 - a, "accuracy": a} for i, a in enumerate(acc)])
        done = (stopped_at or {}).get(cfg.algorithm.name, int(cfg.train.iterations))
        return {"mean": acc.mean(), "ci95": 1.96 * acc.std(ddof=1) / math.sqrt(acc.size), "n_tasks": acc.size,
                "iterations_done": done}
    return runner


def test_full_budget_only_when_every_cell_finished_the_papers_iterations(tmp_path):
    acc = np.array([0.9, 0.8, 1.0])
    accuracies = {("maml", "omniglot_5w1s"): acc, ("fomaml", "omniglot_5w1s"): acc}
    reproduce("finn2017", tmp_path / "stopped", budget=1.0, cells=["maml_5w1s"], report=False,
              runner=_fake_runner(accuracies, stopped_at={"fomaml": 25000}))
    table = read_csv(tmp_path / "stopped" / "table.csv", typed=True)
    assert [(r["iterations"], r["iterations_configured"]) for r in table] == [(60000, 60000), (25000, 60000)]
    text = (tmp_path / "stopped" / "table.md").read_text()
    assert "Full budget" not in text
    assert "**Not the full budget: 1 of 2 cells did not finish the paper's iterations** (finn2017_fomaml_5w1s " \
           "25,000 of 60,000)" in text and "| 25,000 / 60,000 |" in text
    reproduce("finn2017", tmp_path / "full", budget=1.0, cells=["maml_5w1s"], report=False,
              runner=_fake_runner(accuracies))
    text = (tmp_path / "full" / "table.md").read_text()
    assert "Full budget: every cell trained for the paper's number of iterations." in text
    total = len(table_spec("finn2017")["cells"])
    assert total > 2 and f"This table holds 2 of the paper table's {total} cells." in text  # --cells chose 2


def test_table_writer_lists_ours_paper_difference_budget_and_paired_comparison(tmp_path):
    maml = np.array([0.9, 0.8, 1.0, 0.9, 0.7])
    runner = _fake_runner({("maml", "omniglot_5w1s"): maml, ("fomaml", "omniglot_5w1s"): maml - 0.1})
    rows = reproduce("finn2017", tmp_path, budget=0.002, cells=["maml_5w1s"], runner=runner, report=False)
    assert [r["experiment"] for r in rows] == ["finn2017_maml_5w1s", "finn2017_fomaml_5w1s"]
    table = read_csv(tmp_path / "table.csv", typed=True)
    assert table[0]["ours"] == pytest.approx(86.0) and table[0]["paper"] == 98.7
    assert table[0]["difference"] == pytest.approx(86.0 - 98.7)
    assert (table[0]["iterations"], table[0]["paper_iterations"], table[0]["budget"]) == (120, 60000, 0.002)
    text = (tmp_path / "table.md").read_text()
    assert "**Reduced budget: 0.002 × the paper's training iterations (120 of 60,000).**" in text
    assert "not** comparable with the paper's" in text
    assert "| MAML | 5-way 1-shot | 86.00 ± " in text and "| 98.70 ± 0.40 | -12.70 | 120 / 60,000 | 5 | 3 | done |" \
        in text
    assert "| 5-way 1-shot | first-order MAML − MAML | -10.00 | [-10.00, -10.00] |" in text
    assert (tmp_path / "finn2017_maml_5w1s" / "config.yaml").is_file()


def test_a_failed_cell_is_reported_and_the_others_still_run(tmp_path):
    def runner(cfg, run_dir):
        if cfg.algorithm.name == "maml":
            raise UserError("dataset.root='nowhere' has no Omniglot")
        return _fake_runner({("fomaml", "omniglot_20w5s"): np.array([0.5, 0.7])})(cfg, run_dir)
    rows = reproduce("finn2017", tmp_path, budget=0.001, cells=["20w5s"], runner=runner, report=False)
    assert [r["status"] for r in rows] == ["failed: dataset.root='nowhere' has no Omniglot", "done"]
    assert "| MAML | 20-way 5-shot | – |" in (tmp_path / "table.md").read_text()


def test_sinusoid_table_end_to_end_at_a_tiny_budget(tmp_path):
    rows = reproduce("sinusoid", tmp_path, budget=0.0001, overrides=["eval.num_tasks=5", "hardware=cpu",
                                                                     "hardware.threads=1", "train.val_tasks=4"])
    assert [(r["method"], r["status"], r["iterations"]) for r in rows] == [("MAML", "done", 7),
                                                                           ("pretrained", "done", 7)]
    for r in rows:
        result = read_csv(Path(r["run_dir"]) / "results.csv", typed=True)[0]
        assert r["ours"] == pytest.approx(result["mean"]) and result["n_tasks"] == 5
        assert (Path(r["run_dir"]) / "report.md").is_file()
    text = (tmp_path / "table.md").read_text()
    assert "| pretrained − MAML |" in text and "(7 of 70,000)" in text
