"""Inner-step ablation bookkeeping on tiny sinusoid runs: the grid's rows, one fixed task set for every cell,
reuse of finished cells and of existing runs, the PROTOCOLS.md table format, bad grid values."""
from __future__ import annotations

import math

import pytest
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from maml_runner.ablation import markdown, run_ablation
from maml_runner.errors import UserError
from maml_runner.io import read_csv
from maml_runner.train import run

TINY = ["train.iterations=4", "train.val_interval=2", "train.val_tasks=4", "train.meta_batch_size=2",
        "eval.num_tasks=5", "eval.inner_steps=3", "hardware=cpu", "hardware.threads=1", "report.enabled=false"]


def _grid(train="[1,2]", evals="[1,3]", *extra):
    return compose_config([*TINY, "ablation.enabled=true", f"ablation.train_steps={train}",
                           f"ablation.eval_steps={evals}", *extra])


def test_grid_has_one_row_per_cell_and_every_cell_uses_the_runs_own_test_tasks(tmp_path):
    rows = run_ablation(_grid(), tmp_path)
    table = read_csv(tmp_path / "ablation.csv", typed=True)
    assert [(r["train_steps"], r["eval_steps"]) for r in table] == [(1, 1), (1, 3), (2, 1), (2, 3)]
    assert all(r["n_tasks"] == 5 and r["eval_seed"] == 1234 and r["metric"] == "mse" for r in table)
    assert [r["test_loss"] for r in table] == pytest.approx([r["test_loss"] for r in rows])
    for t in (1, 2):
        sub = tmp_path / f"train_steps_{t}"
        result = read_csv(sub / "results.csv", typed=True)[0]
        assert result["algorithm.inner_steps"] == t
        # Same checkpoint, same tasks (eval.seed), same 3 steps: the cell equals the run's own test.
        cell = next(r for r in table if r["train_steps"] == t and r["eval_steps"] == 3)
        assert cell["test_loss"] == pytest.approx(result["test_loss"], rel=1e-6)
        assert cell["checkpoint"] == str(sub / "checkpoints" / "best.pt")
    per_task = read_csv(tmp_path / "ablation_tasks.csv", typed=True)
    assert len(per_task) == 4 * 5
    for cell in table:
        losses = [r["loss"] for r in per_task if (r["train_steps"], r["eval_steps"]) ==
                  (cell["train_steps"], cell["eval_steps"])]
        assert sum(losses) / len(losses) == pytest.approx(cell["test_loss"], rel=1e-9)
    for name in ("ablation.png", "ablation_curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert "| 1 | 1 / 3 |" in (tmp_path / "ablation.md").read_text()


def test_a_second_run_in_the_same_directory_reuses_finished_cells(tmp_path):
    first = run_ablation(_grid("[1]", "[1,3]"), tmp_path)
    checkpoint = tmp_path / "train_steps_1" / "checkpoints" / "best.pt"
    mtime = checkpoint.stat().st_mtime_ns
    second = run_ablation(_grid("[1]", "[1,3]"), tmp_path)
    assert checkpoint.stat().st_mtime_ns == mtime  # not retrained
    assert [r["test_loss"] for r in second] == [r["test_loss"] for r in first]


def test_from_runs_reuses_an_existing_run_for_its_train_steps_and_trains_the_others(tmp_path):
    existing = tmp_path / "existing"
    run(compose_config([*TINY, "algorithm.inner_steps=2"]), existing)
    out = tmp_path / "ablation"
    rows = run_ablation(_grid("[1]", "[3]", f"ablation.from_runs=[{existing}]"), out)
    assert [(r["train_steps"], r["eval_steps"]) for r in rows] == [(1, 3), (2, 3)]
    assert not (out / "train_steps_2").exists()
    assert rows[1]["checkpoint"] == str(existing / "checkpoints" / "best.pt")
    assert rows[1]["test_loss"] == pytest.approx(read_csv(existing / "results.csv", typed=True)[0]["test_loss"])


@pytest.mark.parametrize("override, message", [
    ("ablation.eval_steps=[0,3]", "ablation.eval_steps="),
    ("ablation.train_steps=[1,1]", "ablation.train_steps="),
    ("ablation.train_steps=[]", "ablation.train_steps="),
    ("ablation.eval_steps=abc", "ablation.eval_steps=abc is invalid: expected a list of distinct positive integers"),
])
def test_bad_grid_values_are_one_line_errors(tmp_path, override, message):
    with pytest.raises(UserError, match="expected a list of distinct positive integers") as info:
        run_ablation(compose_config([*TINY, override]), tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "train_steps_1").exists()  # checked before any training


def test_from_runs_must_point_at_checkpoints(tmp_path):
    with pytest.raises(UserError, match=r"ablation.from_runs: no checkpoint at"):
        run_ablation(_grid("[1]", "[1]", f"ablation.from_runs=[{tmp_path / 'nothing'}]"), tmp_path / "out")


def test_markdown_reproduces_the_protocols_table_format():
    # The course-project numbers of PROTOCOLS.md's table, fed through the writer.
    loss = {1: [0.304, 0.275, 0.265, 0.262], 3: [0.937, 0.239, 0.231, 0.231], 5: [0.380, 0.262, 0.246, 0.230]}
    acc = {1: [90.64, 91.64, 91.94, 92.05], 3: [81.17, 92.76, 93.02, 93.01], 5: [88.15, 92.49, 92.90, 93.33]}
    rows = [{"train_steps": t, "eval_steps": e, "metric": "accuracy", "test_loss": loss[t][j], "test_loss_ci95": 0.01,
             "test_accuracy": acc[t][j] / 100, "test_accuracy_ci95": 0.005, "n_tasks": 600, "eval_seed": 1234}
            for t in (1, 3, 5) for j, e in enumerate((1, 3, 5, 10))]
    text = markdown(rows)
    assert "| 1 | 1 / 3 / 5 / 10 | 0.304 / 0.275 / 0.265 / 0.262 | 90.64 / 91.64 / 91.94 / 92.05 |" in text
    assert "| 3 | 1 / 3 / 5 / 10 | 0.937 / 0.239 / 0.231 / 0.231 | 81.17 / 92.76 / 93.02 / 93.01 |" in text
    assert "| 5 | 10 | 0.23 ± 0.01 | 93.33 ± 0.50 |" in text


def test_cli_ablation_writes_the_grid_and_a_report_per_trained_cell(tmp_path):
    result = run_cli(*[o for o in TINY if o != "report.enabled=false"], "ablation.enabled=true",
                     "ablation.train_steps=[1]", "ablation.eval_steps=[1,2]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "ablation.csv", typed=True)
    assert [(r["train_steps"], r["eval_steps"]) for r in rows] == [(1, 1), (1, 2)]
    assert all(math.isfinite(r["test_loss"]) for r in rows)
    assert (tmp_path / "train_steps_1" / "report.md").is_file() and (tmp_path / "report.md").is_file()
    saved = OmegaConf.load(tmp_path / ".hydra" / "config.yaml")
    assert saved.ablation.enabled is True
