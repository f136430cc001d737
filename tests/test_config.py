"""Config composition: every group option composes, precedence dataset > algorithm, command line > both."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose_config

REQUIRED_KEYS = ["seed", "train.iterations", "train.meta_batch_size", "train.val_interval", "algorithm.inner_steps",
                 "algorithm.inner_lr", "algorithm.outer_lr", "algorithm.first_order", "eval.inner_steps",
                 "eval.num_tasks", "dataset.root", "dataset.ways", "dataset.shots", "dataset.query_shots",
                 "hardware.device"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["algorithm", "dataset", "model", "hardware"])
def test_every_group_option_composes_with_required_keys(group):
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        for key in REQUIRED_KEYS:
            assert OmegaConf.select(cfg, key, default="MISSING") != "MISSING", f"{group}={option} lacks {key}"
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_every_experiment_preset_composes_resolves_and_validates():
    from maml_runner.config import validate
    for preset in options("experiment"):
        cfg = compose_config([f"experiment={preset}"])
        validate(cfg)  # raises UserError naming the bad key
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if preset.startswith("antoniou2019"):  # the paper's Adam steps the LSLR rates at the meta lr
            assert resolved["algorithm"]["rate_outer_lr"] == resolved["algorithm"]["outer_lr"]


@pytest.mark.parametrize("dataset,ways,shots,batch,lr,train_steps,eval_steps", [
    ("omniglot_5w1s", 5, 1, 32, 0.4, 1, 3),
    ("omniglot_5w5s", 5, 5, 32, 0.4, 1, 3),
    ("omniglot_20w1s", 20, 1, 16, 0.1, 5, 5),
    ("omniglot_20w5s", 20, 5, 16, 0.1, 5, 5),
])
def test_omniglot_presets_carry_finn2017_protocol(dataset, ways, shots, batch, lr, train_steps, eval_steps):
    cfg = compose_config([f"dataset={dataset}"])
    assert (cfg.dataset.ways, cfg.dataset.shots, cfg.dataset.query_shots) == (ways, shots, shots)
    assert cfg.train.meta_batch_size == batch
    assert cfg.algorithm.inner_lr == pytest.approx(lr)
    assert (cfg.algorithm.inner_steps, cfg.eval.inner_steps) == (train_steps, eval_steps)
    assert cfg.algorithm.outer_lr == pytest.approx(1e-3)
    assert cfg.train.iterations == 60000
    assert cfg.model.name == "conv4"


def test_dataset_protocol_beats_algorithm_defaults_and_cli_beats_both():
    cfg = compose_config(["dataset=omniglot_20w5s"])
    assert cfg.algorithm.inner_lr == pytest.approx(0.1) and cfg.algorithm.inner_steps == 5
    cfg = compose_config(["dataset=omniglot_20w5s", "algorithm.inner_lr=0.25", "train.meta_batch_size=3"])
    assert cfg.algorithm.inner_lr == pytest.approx(0.25) and cfg.train.meta_batch_size == 3


def test_dataset_picks_its_model_and_cli_can_override():
    assert compose_config(["dataset=sinusoid"]).model.name == "mlp"
    assert compose_config(["dataset=omniglot_5w1s"]).model.name == "conv4"
    assert compose_config(["dataset=omniglot_5w1s", "model=mlp"]).model.name == "mlp"


def test_omniglot_root_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path))
    assert compose_config(["dataset=omniglot_5w1s"]).dataset.root == str(tmp_path)
    monkeypatch.delenv("OMNIGLOT_ROOT")
    assert compose_config(["dataset=omniglot_5w1s"]).dataset.root == "data/omniglot"


def test_default_run_is_the_embedded_sinusoid():
    cfg = compose_config()
    assert (cfg.algorithm.name, cfg.dataset.name, cfg.model.name, cfg.hardware.device) == ("maml", "sinusoid", "mlp", "auto")
