"""Config composition and the typed config: every group option composes and validates, precedence dataset >
algorithm, command line > both; types are refused while Hydra composes; an algorithm is its module + its YAML."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
from hydra.errors import HydraException
from omegaconf import OmegaConf

from conftest import REPO, cli_env, compose_config
from maml_runner import cli
from maml_runner.algorithms import algorithm_class, available_algorithms
from maml_runner.config import RESULT_LEADING_KEYS, RESULT_TRAILING_KEYS, result_fields, validate


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["algorithm", "dataset", "model", "hardware"])
def test_every_group_option_composes_resolves_and_validates(group):
    assert options(group), f"conf/{group} has no options"
    for option in options(group):
        cfg = compose_config([f"{group}={option}"])
        assert not OmegaConf.missing_keys(cfg), f"{group}={option} leaves {OmegaConf.missing_keys(cfg)} unset"
        validate(cfg)  # raises UserError naming the bad or missing key (the algorithm's keys: its class's Config)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_every_experiment_preset_composes_resolves_and_validates():
    for preset in options("experiment"):
        cfg = compose_config([f"experiment={preset}"])
        validate(cfg)  # raises UserError naming the bad key
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if preset.startswith("antoniou2019"):  # the paper's Adam steps the LSLR rates at the meta lr
            assert resolved["algorithm"]["rate_outer_lr"] == resolved["algorithm"]["outer_lr"]
            # The released code tests the logits averaged over the top-5 validation epochs, validated on 600 tasks
            # every 500 iterations (docs/protocols.md).
            assert (resolved["eval"]["checkpoint"], resolved["eval"]["ensemble_size"]) == ("ensemble", 5)
            assert (resolved["train"]["val_tasks"], resolved["train"]["val_interval"]) == (600, 500)
        else:  # one checkpoint: the end of training for finn2017 and nichol2018 (no validation set), else best
            last = preset.startswith(("finn2017", "nichol2018"))
            assert resolved["eval"]["checkpoint"] == ("last" if last else "best"), preset
        assert "meta_batch_size" not in resolved["eval"]  # a dead key: nothing read it


def test_each_algorithm_yaml_names_its_class_and_holds_exactly_its_config_keys():
    """No registry: conf/algorithm/<name>.yaml's `_target_` is the class, the class's Config its keys (none unused:
    pretrain has no inner_steps, reptile no outer_lr, fomaml no first_order)."""
    assert available_algorithms() == ["anil", "fomaml", "maml", "mamlpp", "metasgd", "pretrain", "reptile"]
    for name in available_algorithms():
        section = OmegaConf.load(REPO / "conf" / "algorithm" / f"{name}.yaml")
        cls = algorithm_class(section)
        assert f"{cls.__module__}.{cls.__qualname__}" == section._target_ and cls.name == section.name == name
        assert set(section.keys()) == {f.name for f in dataclasses.fields(cls.Config)}, name
    gone = {"pretrain": ["inner_steps", "first_order"], "reptile": ["outer_lr", "first_order"],
            "fomaml": ["first_order"]}
    for name, keys in gone.items():
        fields = {f.name for f in dataclasses.fields(algorithm_class(OmegaConf.create({"name": name})).Config)}
        assert not fields & set(keys), name


@pytest.mark.parametrize("override,message", [
    ("train.iterations=abc", "train.iterations='abc' is invalid: expected a positive integer (>= 1)"),
    ("eval.checkpoint=null", "eval.checkpoint=null is invalid: expected one of best, last, ensemble"),
    ("hardware.deterministic=maybe", "hardware.deterministic='maybe' is invalid: expected true or false"),
    ("dataset.shots=[1]", "dataset.shots=[1] is invalid: expected a positive integer (>= 1)"),
    ("model.hidden=[40,forty]", "model.hidden[1]='forty' is invalid: expected an integer"),
    ("~eval.num_tasks", "eval.num_tasks is required; it cannot be removed (set it with eval.num_tasks=<value>)"),
    ("dataset=omniglot_5w1s model.bn_eps=small", "model.bn_eps='small' is invalid: expected a positive number (> 0)"),
    ("dataset=omniglot_5w1s dataset.split=[1,x,3]", "dataset.split[1]='x' is invalid: expected an integer"),
])
def test_types_are_refused_while_hydra_composes(override, message):
    """Before any code of the run: Hydra itself refuses the value (schema.py), in config.validate's words."""
    with pytest.raises(HydraException) as raised:
        compose_config(override.split())
    assert cli.hydra_error_line(raised.value) == message


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


def test_result_fields_are_the_keys_each_algorithm_has():
    """results.csv records an algorithm's own keys; the columns results.csv always had keep their order."""
    def algorithm_keys(name, *overrides):
        fields = result_fields(compose_config([f"algorithm={name}", *overrides]))
        assert fields[:len(RESULT_LEADING_KEYS)] == RESULT_LEADING_KEYS
        assert fields[-len(RESULT_TRAILING_KEYS):] == RESULT_TRAILING_KEYS
        return fields[len(RESULT_LEADING_KEYS):-len(RESULT_TRAILING_KEYS)]
    assert algorithm_keys("maml") == ["algorithm.inner_steps", "algorithm.inner_lr", "algorithm.outer_lr",
                                      "algorithm.first_order", "algorithm.loss_reduction"]
    # the sinusoid preset sets inner_steps for every algorithm; pretrain has none, so its results do not record it
    assert algorithm_keys("pretrain") == ["algorithm.inner_lr", "algorithm.outer_lr", "algorithm.loss_reduction"]
    assert algorithm_keys("reptile", "dataset=omniglot_5w1s") == [
        "algorithm.inner_steps", "algorithm.inner_lr", "algorithm.loss_reduction", "algorithm.inner_optimizer",
        "algorithm.inner_betas", "algorithm.meta_step_size", "algorithm.eval_inner_lr", "algorithm.inner_batch_size",
        "algorithm.eval_inner_batch_size", "algorithm.inner_optimizer_state", "algorithm.eval_optimizer"]
    assert "algorithm.msl_fraction" in algorithm_keys("mamlpp")


# ---- one module + one YAML ---------------------------------------------------------------------------------------
NEW_ALGORITHM = '''
"""A new algorithm outside the package: MAML's adaptation with the inner step scaled by `step_scale`."""
from dataclasses import dataclass

from maml_runner.algorithms.maml import MAML
from maml_runner.schema import BOOL, POSITIVE_FLOAT, POSITIVE_INT, AlgorithmConfig, required


class ScaledMAML(MAML):
    @dataclass
    class Config(AlgorithmConfig):
        inner_steps: int = required(POSITIVE_INT)
        inner_lr: float = required(POSITIVE_FLOAT)
        outer_lr: float = required(POSITIVE_FLOAT)
        first_order: bool = required(BOOL)
        step_scale: float = required(POSITIVE_FLOAT)

    name = "scaled_maml"

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.maml.lr = float(cfg.inner_lr) * float(cfg.step_scale)
'''

NEW_ALGORITHM_YAML = """
_target_: scaled_maml_module.ScaledMAML
name: scaled_maml
inner_steps: 1
inner_lr: 0.01
outer_lr: 0.001
loss_reduction: mean
first_order: false
step_scale: 0.5
"""


def test_a_new_algorithm_is_one_module_and_one_yaml(tmp_path):
    """Adding an algorithm touches two files, neither inside the package: its module and its YAML (on the config
    search path). It is listed, validated against its own Config and runs end to end; its key is in results.csv."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "scaled_maml_module.py").write_text(textwrap.dedent(NEW_ALGORITHM))
    (tmp_path / "conf" / "algorithm").mkdir(parents=True)
    (tmp_path / "conf" / "algorithm" / "scaled_maml.yaml").write_text(NEW_ALGORITHM_YAML)
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "code"), str(REPO), env.get("PYTHONPATH", "")])
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"

    def maml_run(*overrides):
        return subprocess.run([sys.executable, "-m", "maml_runner.cli", search, *overrides], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)

    tiny = ["train.iterations=6", "train.val_interval=3", "train.val_tasks=4", "train.meta_batch_size=2",
            "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1", "report.enabled=false"]
    done = maml_run("algorithm=scaled_maml", *tiny, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-2000:]
    from maml_runner.io import read_csv
    (row,) = read_csv(tmp_path / "run" / "results.csv", typed=True)
    assert row["algorithm.name"] == "scaled_maml" and row["algorithm.step_scale"] == 0.5
    assert row["iterations_done"] == 6 and row["n_tasks"] == 8 and 0 < row["mean"] < 100
    # its own key is typed and range-checked like any other
    bad = maml_run("algorithm=scaled_maml", "algorithm.step_scale=-1", *tiny, f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "maml-run: error: algorithm.step_scale=-1 is invalid: expected a positive number (> 0)"]
    # the options of algorithm= are the YAML files on the search path
    unknown = maml_run("algorithm=foo", f"hydra.run.dir={tmp_path / 'foo'}")
    assert unknown.stderr.strip().splitlines() == [
        "maml-run: error: algorithm=foo is not an option; choose one of: anil, fomaml, maml, mamlpp, metasgd, "
        "pretrain, reptile, scaled_maml"]


def test_a_key_a_yaml_leaves_unset_is_named():
    """Every schema key is required: a preset that leaves one '???' (or forgets it) is reported before any work."""
    from maml_runner.errors import UserError
    with pytest.raises(UserError) as raised:
        validate(compose_config(["dataset=omniglot_5w1s", "dataset.image_size=???"]))
    assert str(raised.value) == ("dataset.image_size is missing from the config; it is required (restore it, e.g. "
                                 "dataset.image_size=<value>)")
