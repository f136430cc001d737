"""Runs saved before the typed config (issue 15) still work: their checkpoints' configs hold keys since removed
(eval.meta_batch_size, pretrain's inner_steps and first_order) and no algorithm._target_. They are compared as this
version saves them (config.upgrade_saved): they resume, train.resume=true recognises them, eval.only re-tests them.
results.csv of different algorithms aggregate."""
from __future__ import annotations

import logging

import pytest

from conftest import compose_config
from maml_runner.aggregate import collect
from maml_runner.checkpoint import config_differences, load_checkpoint, save_checkpoint
from maml_runner.eval_only import evaluate_only
from maml_runner.io import read_csv
from maml_runner.train import run, without_mode_keys

TINY = ["train.iterations=6", "train.val_interval=3", "train.val_tasks=4", "train.meta_batch_size=2",
        "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1"]


def as_saved_before_issue_15(run_dir) -> dict:
    """Rewrite the run's checkpoints' saved config as the code before issue 15 saved it; returns one of them."""
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        state = load_checkpoint(path)
        config = state["config"]
        config["eval"]["meta_batch_size"] = 1
        del config["algorithm"]["_target_"]
        if config["algorithm"]["name"] == "pretrain":
            config["algorithm"].update(inner_steps=1, first_order=True)
        save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]


@pytest.fixture(scope="module", params=["pretrain", "maml"])
def old_run(request, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp(f"old_{request.param}")
    row = run(compose_config([f"algorithm={request.param}", *TINY]), run_dir)
    saved = as_saved_before_issue_15(run_dir)
    assert "_target_" not in saved["algorithm"] and saved["eval"]["meta_batch_size"] == 1
    return request.param, run_dir, row


@pytest.mark.parametrize("repeat_training_command", [False, True])
def test_eval_only_retests_a_run_saved_before_the_typed_config(old_run, repeat_training_command, tmp_path):
    name, run_dir, row = old_run
    command = ["eval.only=true", f"train.resume={run_dir}", "hardware=cpu", "hardware.threads=1"]
    if repeat_training_command:  # the training command line with eval.only=true added (eval_only.py)
        command += [f"algorithm={name}", *TINY]
    again = evaluate_only(compose_config(command), tmp_path, command)
    assert again["mean"] == pytest.approx(row["mean"], rel=1e-6)  # same checkpoint, same 8 test tasks
    (written,) = read_csv(again["results_file"], typed=True)
    assert written["algorithm.name"] == name and written["mean"] == pytest.approx(row["mean"], rel=1e-6)
    # the row records the keys the algorithm has now, not the dead ones of the old saved config
    assert ("algorithm.inner_steps" in written) == (name == "maml") and "eval.meta_batch_size" not in written


def test_a_run_saved_before_the_typed_config_resumes(old_run, tmp_path, caplog):
    name, run_dir, _ = old_run
    with caplog.at_level(logging.WARNING, logger="maml_runner.train"):
        row = run(compose_config([f"algorithm={name}", *TINY, "train.iterations=9", f"train.resume={run_dir}"]),
                  tmp_path)
    assert row["iterations_done"] == 9 and read_csv(run_dir / "results.csv", typed=True)[0]["iterations_done"] == 9
    warnings = [r.getMessage() for r in caplog.records if "with a different config" in r.getMessage()]
    # the saved config is compared as this version saves it (config.upgrade_saved): only the real difference shows
    assert len(warnings) == 1 and warnings[0].endswith("with a different config: train.iterations: 6 -> 9")


def test_train_resume_true_finds_a_finished_run_saved_before_the_typed_config(tmp_path):
    """train.resume=true looks for the newest sibling run with the same config: an old-format run still is one, so
    a resumed sweep or run does not train again (nor re-test) what finished before the upgrade."""
    cfg = compose_config(["algorithm=pretrain", *TINY, "report.enabled=false"])
    first = run(cfg, tmp_path / "outputs" / "first")
    as_saved_before_issue_15(tmp_path / "outputs" / "first")
    results = tmp_path / "outputs" / "first" / "results.csv"
    written = results.stat().st_mtime_ns
    again = run(compose_config(["algorithm=pretrain", *TINY, "report.enabled=false", "train.resume=true"]),
                tmp_path / "outputs" / "second")
    assert again["mean"] == pytest.approx(first["mean"]) and again["iterations_done"] == 6
    assert results.stat().st_mtime_ns == written  # recognised as finished: not trained, not tested again
    assert not (tmp_path / "outputs" / "second").exists()


def test_results_of_different_algorithms_aggregate(tmp_path):
    """maml records first_order, reptile inner_optimizer...: the table takes the config columns of every row."""
    for name in ("maml", "reptile"):
        run(compose_config([f"algorithm={name}", *TINY, "report.enabled=false"]), tmp_path / name)
    table, swept = collect([tmp_path])
    assert [row["run"] for row in table] == ["maml", "reptile"]
    assert {"algorithm.name", "algorithm.first_order", "algorithm.inner_optimizer"} <= set(swept)
    assert "dataset.name" not in swept  # same in both
    by_run = {row["run"]: row for row in table}
    assert by_run["reptile"]["algorithm.inner_optimizer"] == "sgd"
    assert by_run["maml"]["algorithm.inner_optimizer"] is None


def test_an_omniglot_run_saved_before_the_ink_and_rotation_keys_resumes_without_differences(tmp_path, caplog):
    """dataset.ink and dataset.rotations_as_classes (issue 13) did not exist when the full-protocol Finn run was
    started: its checkpoints are compared as if they held ink=1 and rotations_as_classes=false (config.ADDED_KEYS),
    the values that reproduce what the code did then, so resuming warns only about a real difference and
    train.resume=true still finds the run."""
    from omniglot_fixture import make_fake_omniglot
    root = make_fake_omniglot(tmp_path / "omniglot")
    data = ["dataset=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={root}/cache", "dataset.ways=3",
            "dataset.split=[6,3,3]", "model.hidden=8", *TINY, "report.enabled=false"]
    run_dir = tmp_path / "outputs" / "old"
    run(compose_config(data), run_dir)
    for name in ("best.pt", "last.pt"):
        path = run_dir / "checkpoints" / name
        state = load_checkpoint(path)
        del state["config"]["dataset"]["ink"], state["config"]["dataset"]["rotations_as_classes"]
        save_checkpoint(path, {k: v for k, v in state.items() if k not in ("format", "version")})
    results = run_dir / "results.csv"
    written = results.stat().st_mtime_ns
    again = run(compose_config([*data, "train.resume=true"]), tmp_path / "outputs" / "new")
    assert again["iterations_done"] == 6 and results.stat().st_mtime_ns == written  # found, finished: not re-run
    with caplog.at_level(logging.WARNING, logger="maml_runner.train"):
        row = run(compose_config([*data, "train.iterations=9", f"train.resume={run_dir}"]), tmp_path / "x")
    assert row["iterations_done"] == 9
    warnings = [r.getMessage() for r in caplog.records if "with a different config" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("with a different config: train.iterations: 6 -> 9")
    # the filled-in value is the old behaviour, so asking for the other polarity is a real difference
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]
    del saved["dataset"]["ink"]
    asked = without_mode_keys(compose_config([*data, "train.iterations=9", "dataset.ink=0"]))  # as run() compares
    assert config_differences(saved, asked) == ["dataset.ink: 1 -> 0"]


def test_a_checkpoint_saved_before_hardware_tf32_compares_as_full_float32():
    """hardware.tf32 is new: every run saved before it ran on CPU (no TF32), so a saved config without the key is
    compared as tf32=false: train.resume=true still finds those runs, and asking for TF32 is a real difference."""
    from omegaconf import OmegaConf
    cfg = without_mode_keys(compose_config(TINY))
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["hardware"]["tf32"]
    assert config_differences(saved, cfg) == []
    asked = without_mode_keys(compose_config([*TINY, "hardware.tf32=true"]))
    assert config_differences(saved, asked) == ["hardware.tf32: False -> True"]
