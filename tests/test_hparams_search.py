"""Optuna search (conf/hparams_search/): the presets compose, and a search picks its best trial by the validation
loss each job returned (results.csv best_val_loss), not by the test result."""
from __future__ import annotations

import math

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF_DIR, run_cli
from maml_runner.io import read_csv

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the [optuna] extra is not installed")


@pytest.mark.parametrize("preset, dataset", [("sinusoid_inner", "sinusoid"), ("omniglot_5w1s_inner", "omniglot_5w1s")])
def test_presets_compose_an_optuna_search_over_the_inner_loop(preset, dataset):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"hparams_search={preset}"], return_hydra_config=True)
    assert cfg.dataset.name == dataset
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert set(sweeper.params) == {"algorithm.inner_lr", "algorithm.inner_steps"}
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


@pytest.mark.slow
def test_a_three_trial_search_reports_the_trial_with_the_lowest_validation_loss(tmp_path):
    result = run_cli("hparams_search=sinusoid_inner", "hydra.sweeper.n_trials=3", "train.iterations=10",
                     "train.val_interval=5", "train.val_tasks=4", "train.meta_batch_size=4", "eval.num_tasks=8",
                     "hardware=cpu", "hardware.threads=1", "report.enabled=false", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = sorted(tmp_path.glob("[0-9]*_*"), key=lambda p: int(p.name.split("_")[0]))
    assert len(trials) == 3
    rows = [read_csv(trial / "results.csv", typed=True)[0] for trial in trials]
    for trial, row in zip(trials, rows):  # each job's value: its lowest validation loss in metrics.csv (nan: none)
        finite = [r["val_loss"] for r in read_csv(trial / "metrics.csv", typed=True) if math.isfinite(r["val_loss"])]
        assert row["best_val_loss"] == pytest.approx(min(finite, default=math.nan), rel=1e-12, nan_ok=True)
    best = OmegaConf.load(tmp_path / "optimization_results.yaml")
    chosen = min((row for row in rows if math.isfinite(row["best_val_loss"])), key=lambda row: row["best_val_loss"])
    assert best.best_value == pytest.approx(chosen["best_val_loss"], rel=1e-12)
    assert best.best_value != pytest.approx(chosen["mean"], rel=1e-6)  # not the test MSE
    assert best.best_params["algorithm.inner_steps"] == chosen["algorithm.inner_steps"]
    assert math.isclose(best.best_params["algorithm.inner_lr"], chosen["algorithm.inner_lr"], rel_tol=1e-9)
    assert len(read_csv(tmp_path / "aggregate.csv")) == 3  # the sweep's table covers every trial
