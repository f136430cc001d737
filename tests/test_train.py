"""The training loop end to end on tiny sinusoid runs: files, schemas, best/last checkpoint semantics."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config
from maml_runner.checkpoint import load_checkpoint
from maml_runner.io import read_csv
from maml_runner.evaluate import evaluate, mean_ci95
from maml_runner.train import METRICS_COLUMNS, best_validation, build, result_columns, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_config(["train.iterations=40", "train.val_interval=10", "train.val_tasks=8",
                          "train.meta_batch_size=4", "eval.num_tasks=16", "hardware=cpu", "hardware.threads=1"])
    row = run(cfg, run_dir)
    return cfg, run_dir, row


def test_run_directory_contents(tiny_run):
    _, run_dir, _ = tiny_run
    for name in ["metrics.csv", "results.csv", "checkpoints/best.pt", "checkpoints/last.pt"]:
        assert (run_dir / name).is_file(), name
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"


def test_metrics_csv_has_one_row_per_validation(tiny_run):
    _, run_dir, _ = tiny_run
    rows = read_csv(run_dir / "metrics.csv")
    assert list(rows[0].keys()) == METRICS_COLUMNS
    assert [int(r["iteration"]) for r in rows] == [10, 20, 30, 40]
    assert all(math.isfinite(float(r["val_loss"])) for r in rows)
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_results_csv_schema_and_values(tiny_run):
    cfg, run_dir, row = tiny_run
    rows = read_csv(run_dir / "results.csv")
    assert len(rows) == 1 and list(rows[0].keys()) == result_columns(cfg)
    result = rows[0]
    assert result["algorithm.name"] == "maml" and result["dataset.name"] == "sinusoid"
    assert result["metric"] == "mse" and int(result["n_tasks"]) == 16
    assert float(result["mean"]) == pytest.approx(row["mean"]) and float(result["ci95"]) > 0
    assert float(result["mean"]) == pytest.approx(float(result["test_loss"]))
    assert int(result["iterations_done"]) == 40 and float(result["seconds_per_iteration"]) > 0
    assert float(result["peak_memory_mb"]) > 0
    # the sweep objective: the lowest validation loss of metrics.csv (regression: no accuracy)
    assert float(result["best_val_loss"]) == min(float(r["val_loss"]) for r in read_csv(run_dir / "metrics.csv"))
    assert row["best_val_loss"] == float(result["best_val_loss"]) and math.isnan(float(result["best_val_accuracy"]))


def test_best_validation_is_the_first_lowest_finite_loss_with_its_accuracy():
    rows = [{"val_loss": 0.9, "val_accuracy": 0.5}, {"val_loss": math.nan, "val_accuracy": math.nan},
            {"val_loss": 0.4, "val_accuracy": 0.7}, {"val_loss": 0.4, "val_accuracy": 0.9},
            {"val_loss": 0.6, "val_accuracy": 0.95}]
    assert best_validation(rows) == (0.4, 0.7)  # not the highest accuracy, not the later tie (best.pt keeps the first)
    nothing = best_validation([{"val_loss": math.inf, "val_accuracy": 0.1}])
    assert all(math.isnan(value) for value in nothing)


def test_best_checkpoint_is_the_lowest_validation_loss_and_last_is_final(tiny_run):
    _, run_dir, _ = tiny_run
    rows = read_csv(run_dir / "metrics.csv")
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    best = load_checkpoint(run_dir / "checkpoints/best.pt")
    last = load_checkpoint(run_dir / "checkpoints/last.pt")
    assert best["iteration"] == int(best_row["iteration"])
    assert best["best_val_loss"] == pytest.approx(float(best_row["val_loss"]))
    assert last["iteration"] == 40
    assert last["best_val_loss"] == pytest.approx(float(best_row["val_loss"]))


def test_test_tasks_are_fixed_by_eval_seed(tiny_run, tmp_path):
    cfg, run_dir, row = tiny_run
    trainer = build(cfg, tmp_path)
    trainer.state.iteration = 40
    (tmp_path / "checkpoints").mkdir()
    import shutil
    shutil.copy(run_dir / "checkpoints/best.pt", tmp_path / "checkpoints/best.pt")
    again = trainer.test()
    assert again["mean"] == pytest.approx(row["mean"], rel=1e-6)


def paired_test_losses(cfg, run_dir):
    """Per-task test MSE of a finished run's best checkpoint on the fixed test tasks."""
    trainer = build(cfg, run_dir)
    trainer.algorithm.load_checkpoint_state(load_checkpoint(run_dir / "checkpoints/best.pt")["algorithm"])
    tasks = trainer.sources["test"].fixed_tasks(int(cfg.eval.num_tasks), int(cfg.eval.seed))
    return evaluate(trainer.algorithm, tasks, int(cfg.eval.inner_steps), trainer.device).losses


def test_maml_beats_an_untrained_model_with_the_same_budget(tmp_path):
    """Meta-training must help: MAML vs. the same network and fine-tuning whose outer updates are ~0, on the same tasks."""
    common = ["train.iterations=300", "train.val_interval=100", "train.val_tasks=20", "eval.num_tasks=100",
              "hardware=cpu", "hardware.threads=1"]
    meta_cfg, flat_cfg = compose_config(common), compose_config([*common, "algorithm.outer_lr=1e-12"])
    run(meta_cfg, tmp_path / "maml")
    run(flat_cfg, tmp_path / "none")
    difference = paired_test_losses(meta_cfg, tmp_path / "maml") - paired_test_losses(flat_cfg, tmp_path / "none")
    mean, ci95 = mean_ci95(difference)
    assert mean + ci95 < 0, f"MAML minus untrained test MSE: {mean:.3f} ± {ci95:.3f}"


def test_peak_memory_is_per_run_not_per_process(tmp_path):
    """Sweep jobs run in one process: a big earlier job must not show up as the next job's peak."""
    import os
    from maml_runner.hardware import peak_memory_mb, reset_peak_memory
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("no /proc/self/clear_refs: peak memory falls back to the process-wide ru_maxrss")
    block = bytearray(600 * 2**20)  # touched: counts in the resident set
    block[:: 4096] = b"x" * len(block[:: 4096])
    before = peak_memory_mb(torch.device("cpu"))
    del block
    reset_peak_memory(torch.device("cpu"))
    cfg = compose_config(["train.iterations=4", "train.val_interval=2", "train.val_tasks=2", "train.meta_batch_size=2",
                          "eval.num_tasks=4", "hardware=cpu", "hardware.threads=1"])
    row = run(cfg, tmp_path / "run")
    assert row["peak_memory_mb"] < before - 400, (row["peak_memory_mb"], before)


def test_max_minutes_stops_training_then_tests_the_state_reached(tmp_path):
    cfg = compose_config(["train.iterations=1000000", "train.max_minutes=0.02", "train.val_interval=1000",
                          "train.val_tasks=4", "train.meta_batch_size=2", "eval.num_tasks=8", "hardware=cpu",
                          "hardware.threads=1"])
    row = run(cfg, tmp_path)
    done = int(row["iterations_done"])
    assert 0 < done < 1000000
    # the state reached was validated (so best.pt/last.pt hold it) even though it is not on the 1000-grid
    assert int(read_csv(tmp_path / "metrics.csv")[-1]["iteration"]) == done
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == done
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["wall_seconds"] >= 0.02 * 60
    assert math.isfinite(row["mean"]) and int(read_csv(tmp_path / "results.csv")[0]["n_tasks"]) == 8


def test_a_run_stopped_by_its_time_budget_continues_with_train_resume_true_under_another_budget(tmp_path):
    """train.max_minutes is how long to run now, not what the run is: `train.resume=true` with a new budget finds the
    stopped sibling run and finishes it there (before, the budget counted as a config difference: a fresh start)."""
    common = ["train.iterations=3000", "train.val_interval=1000", "train.val_tasks=4", "train.meta_batch_size=2",
              "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1", "report.enabled=false"]
    stopped = run(compose_config([*common, "train.max_minutes=0.005"]), tmp_path / "outputs" / "first")
    assert 0 < stopped["iterations_done"] < 3000
    finished = run(compose_config([*common, "train.max_minutes=null", "train.resume=true"]),
                   tmp_path / "outputs" / "second")
    assert finished["iterations_done"] == 3000 and not (tmp_path / "outputs" / "second").exists()
    assert int(read_csv(tmp_path / "outputs" / "first" / "results.csv")[0]["iterations_done"]) == 3000


def test_max_minutes_must_be_positive():
    from maml_runner.config import validate
    from maml_runner.errors import UserError
    with pytest.raises(UserError, match=r"train.max_minutes=0 is invalid: expected a positive number or null"):
        validate(compose_config(["train.max_minutes=0"]))


def test_temp_files_of_a_writer_killed_mid_write_are_removed_on_the_next_run(tmp_path):
    """atomic_write's temp files (`.<name>.<random>.tmp`) outlive a kill -9 during the write; the next run in that
    directory (it holds the run lock, so no one else writes there) removes them and nothing else."""
    stale = [tmp_path / ".metrics.csv.k2j3.tmp", tmp_path / "checkpoints" / ".best.pt.n4uu1mtd.tmp"]
    kept = [tmp_path / "notes.tmp", tmp_path / "checkpoints" / "mine.pt"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    cfg = compose_config(["train.iterations=10", "train.val_interval=10", "train.val_tasks=4",
                          "train.meta_batch_size=2", "eval.num_tasks=4", "hardware=cpu", "hardware.threads=1"])
    run(cfg, tmp_path)
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"partial" for path in kept)
    assert [path.name for path in tmp_path.rglob("*.tmp")] == ["notes.tmp"]  # the user's own file stays
