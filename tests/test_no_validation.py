"""Runs without a validation set (Omniglot `dataset.split=[1200, 0, 423]`, supervised-reptile's split; the
nichol2018 presets): metrics rows with the training averages and nan validation columns every train.val_interval,
last.pt and never best.pt, the last model tested, exact resume, the time budget, the NaN policy, the report and
TensorBoard. On the tiny generated Omniglot (12 characters: the 1200 / 0 / 423 proportions give 9 / 0 / 3)."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from conftest import assert_same_csv_rows, compose_config, run_killed_at_last_pt
from maml_runner import train as train_module
from maml_runner.checkpoint import load_checkpoint
from maml_runner.errors import UserError
from maml_runner.io import read_csv
from maml_runner.train import run
from omniglot_fixture import make_fake_omniglot

VALIDATIONS = [3, 6, 9]


@pytest.fixture(scope="module")
def omniglot_root(tmp_path_factory) -> Path:
    return make_fake_omniglot(tmp_path_factory.mktemp("omniglot"))


def overrides(root: Path, *extra: str) -> list[str]:
    """The nichol2018 5w1s preset (split [1200, 0, 423], eval.checkpoint=last, flattened head), shrunk."""
    return ["experiment=nichol2018_reptile_5w1s", f"dataset.root={root}", f"dataset.cache_dir={root.parent / 'c'}",
            "dataset.ways=3", "model.hidden=8", "algorithm.inner_steps=2", "train.iterations=9",
            "train.val_interval=3", "train.meta_batch_size=2", "train.log_interval=1", "eval.num_tasks=6",
            "eval.inner_steps=3", "hardware=cpu", "hardware.threads=1", "hardware.deterministic=true", *extra]


@pytest.fixture(scope="module")
def reference(omniglot_root, tmp_path_factory) -> tuple[Path, dict]:
    """The zero-validation run done in one go."""
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, run(compose_config(overrides(omniglot_root)), run_dir)


def test_metrics_rows_every_interval_with_nan_validation_last_pt_and_no_best_pt(reference):
    run_dir, row = reference
    metrics = read_csv(run_dir / "metrics.csv", typed=True)
    assert [r["iteration"] for r in metrics] == VALIDATIONS
    for r in metrics:
        assert all(math.isnan(r[key]) for key in ("val_loss", "val_accuracy", "val_loss_ci95", "val_accuracy_ci95"))
        assert math.isfinite(r["train_loss"]) and 0 <= r["train_accuracy"] <= 1 and r["grad_norm"] > 0
    assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "checkpoints" / "best.pt").exists()
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["iteration"] == 9 and last["best_val_loss"] == math.inf
    results = read_csv(run_dir / "results.csv", typed=True)
    assert len(results) == 1 and results[0]["checkpoint"] == "last" and results[0]["iterations_done"] == 9
    assert math.isnan(results[0]["best_val_loss"]) and math.isnan(results[0]["best_val_accuracy"])
    assert row["checkpoint"] == "last" and 0 <= row["mean"] <= 1 and row["n_tasks"] == 6
    split = json.loads((run_dir / "omniglot_split.json").read_text())
    assert (len(split["train"]), len(split["validation"]), len(split["test"])) == (9, 0, 3)


def test_the_tested_model_is_the_one_training_left(reference, omniglot_root, tmp_path):
    """results.csv's numbers are last.pt's: re-testing last.pt with the same tasks gives them again."""
    run_dir, row = reference
    trainer = train_module.build(compose_config(overrides(omniglot_root)), tmp_path)
    again, _ = trainer.evaluate_checkpoint(run_dir / "checkpoints" / "last.pt", "last")
    assert again["mean"] == pytest.approx(row["mean"], abs=1e-12)
    assert again["test_loss"] == pytest.approx(row["test_loss"], rel=1e-9)


def test_resume_after_a_stop_matches_the_run_done_in_one_go(reference, omniglot_root, tmp_path, monkeypatch,
                                                            caplog):
    reference_dir, _ = reference
    run_dir = tmp_path / "run"  # killed right after last.pt of iteration 3 was written
    run_killed_at_last_pt(compose_config(overrides(omniglot_root)), run_dir, 3, monkeypatch, after_write=True)
    assert [r["iteration"] for r in read_csv(run_dir / "metrics.csv", typed=True)] == [3]
    with caplog.at_level(logging.INFO, logger="maml_runner.train"):
        run(compose_config(overrides(omniglot_root, "train.resume=true")), run_dir)
    assert f"resumed from {run_dir / 'checkpoints' / 'last.pt'} at iteration 3" in caplog.text
    assert_same_csv_rows(run_dir, reference_dir)  # nan validation columns compare as nan
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    got, want = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run_dir, reference_dir))
    assert got["iteration"] == want["iteration"] == 9
    for key, value in want["algorithm"]["parameters"].items():
        torch.testing.assert_close(got["algorithm"]["parameters"][key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_time_budget_stop_writes_the_row_and_last_pt(omniglot_root, tmp_path):
    row = run(compose_config(overrides(omniglot_root, "train.iterations=1000000", "train.val_interval=100000",
                                       "train.max_minutes=0.01")), tmp_path)
    done = int(row["iterations_done"])
    assert 0 < done < 100000 and row["checkpoint"] == "last"
    metrics = read_csv(tmp_path / "metrics.csv", typed=True)
    assert [r["iteration"] for r in metrics] == [done] and math.isnan(metrics[0]["val_loss"])
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == done
    assert not (tmp_path / "checkpoints" / "best.pt").exists()


def test_nan_stop_names_last_pt(omniglot_root, tmp_path, monkeypatch):
    """train.nan_policy=stop: the message names last.pt and its iteration (there is no validation loss)."""
    original = train_module.build_sources

    def poisoned(dataset_cfg):
        sources = dict(original(dataset_cfg))
        train = sources["train"]
        count = {"n": 0}
        sample = train.sample

        def nan_after_four_batches():  # meta-batch 2: iteration 5 onwards is non-finite
            count["n"] += 1
            task = sample()
            return task._replace(query_x=task.query_x * math.nan) if count["n"] > 8 else task

        train.sample = nan_after_four_batches
        return sources

    monkeypatch.setattr(train_module, "build_sources", poisoned)
    monkeypatch.setattr(train_module, "cached_episodes", lambda source: source)  # sample task by task
    with pytest.raises(UserError) as raised:
        run(compose_config(overrides(omniglot_root)), tmp_path)
    assert str(raised.value).startswith("non-finite training loss (nan) or gradient norm (nan) at iteration 5; "
                                        f"last good checkpoint: {tmp_path / 'checkpoints' / 'last.pt'} (iteration 3; "
                                        f"no validation split); lower algorithm")
    assert not (tmp_path / "results.csv").exists()


def test_report_and_tensorboard_without_validation(reference, omniglot_root):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maml_runner.report import write_report
    from maml_runner.tensorboard_summary import write_run_summary

    run_dir, row = reference
    cfg = compose_config(overrides(omniglot_root))
    text = write_report(cfg, run_dir, row).read_text()
    assert "No validation (dataset.split has no validation characters)" in text and (run_dir / "curves.png").is_file()
    write_run_summary(run_dir, cfg, row)
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and not any(tag.startswith("val/") for tag in tags)
    assert "final/best_val_loss" not in tags and "final/test_accuracy" in tags


def test_eval_only_retests_last_pt_and_refuses_best(reference, tmp_path):
    """maml-run eval.only=true on such a run tests last.pt (its saved eval.checkpoint); eval.checkpoint=best on the
    command line is the config error, one line, before anything is written."""
    from maml_runner.eval_only import evaluate_only

    run_dir, row = reference
    command = ["eval.only=true", f"train.resume={run_dir}", "hardware=cpu", "hardware.threads=1"]
    again = evaluate_only(compose_config(command), tmp_path / "log", command)
    assert again["checkpoint"] == "last" and again["mean"] == pytest.approx(row["mean"], abs=1e-12)
    assert Path(again["results_file"]).name == "results_eval_last_3steps_6tasks_seed1234.csv"
    command.append("eval.checkpoint=best")
    with pytest.raises(UserError, match=r"^eval.checkpoint=best needs validation characters, but dataset.split="
                                        r"\[1200, 0, 423\] has none"):
        evaluate_only(compose_config(command), tmp_path / "log2", command)
    assert not (tmp_path / "log2").exists()
