"""Bad input ends with one line on stderr saying what is wrong and what is allowed, a non-zero exit code, and no
half-written files. Through the CLI for each class of error (Hydra config, values, hardware, output directory,
NaN during training); the many value checks in-process through `run`."""
from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra.errors import HydraException
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from maml_runner import cli
from maml_runner import train as train_module
from maml_runner.data.base import EpisodeSource
from maml_runner.errors import UserError
from maml_runner.hardware import select_device
from maml_runner.io import atomic_write_text, read_csv
from maml_runner.lifecycle import MAX_CONSECUTIVE_SKIPS
from maml_runner.train import run

TINY = ["train.iterations=40", "train.val_interval=10", "train.val_tasks=4", "train.meta_batch_size=2",
        "eval.num_tasks=4", "hardware=cpu", "hardware.threads=1"]


def assert_one_line_error(result, expected: str, code: int = 2) -> str:
    """`expected` is a regular expression for the whole line after 'maml-run: error: '."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert re.fullmatch(f"maml-run: error: {expected}", lines[0]), lines[0]
    assert result.returncode == code
    return lines[0]


# ---- through the CLI: what the user sees ---------------------------------------------------------------
@pytest.mark.parametrize("overrides,expected", [
    (["algorithm=foo"], re.escape("algorithm=foo is not an option; choose one of: anil, fomaml, maml, mamlpp, metasgd, "
                                           "pretrain, reptile")),
    (["dataset=omniglot"], r"dataset=omniglot is not an option; choose one of: image_folder, miniimagenet_5w1s, "
                           r"miniimagenet_5w5s, omniglot_20w1s, .*sinusoid"),
    (["train.iteratons=5"], re.escape("train.iteratons is not a config key; did you mean train.iterations? "
                                      "(maml-run --help lists them; +train.iteratons=... adds a new key)")),
    (["train.iterations=[1"], re.escape("cannot parse override 'train.iterations=[1': no viable alternative at "
                                        "input '[1' (see ") + r"https://hydra.cc/\S+ for details\)"),
    (["dataset=5"], re.escape("invalid command line: Config group override must be a string or a list. Got int "
                              "(maml-run --help shows the groups and keys)")),
    (["+train.iterations=5"], re.escape("Could not append to config. An item is already at 'train.iterations'; "
                                        "either remove + prefix: 'train.iterations=5'; or add a second + to add or "
                                        "override 'train.iterations': '++train.iterations=5'")),
], ids=["group-option", "group-option-list", "unknown-key", "override-syntax", "group-type", "append-existing"])
def test_hydra_config_errors_are_one_line(overrides, expected, tmp_path):
    result = run_cli(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "run").exists()  # rejected before Hydra created anything


def test_wrong_type_is_one_line_and_writes_no_run_files(tmp_path):
    result = run_cli("train.iterations=abc", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, re.escape("train.iterations='abc' is invalid: expected a positive integer (>= 1)"))
    assert not {p.name for p in tmp_path.iterdir()} - {".hydra", "cli.log"}  # only Hydra's own bookkeeping


def test_best_checkpoint_without_validation_characters_is_refused_before_anything_is_written(tmp_path):
    """eval.checkpoint=best needs validation; dataset.split=[1200, 0, 423] (the nichol2018 presets) has none."""
    result = run_cli("experiment=nichol2018_reptile_5w1s", "eval.checkpoint=best", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, re.escape("eval.checkpoint=best needs validation characters, but "
                                            "dataset.split=[1200, 0, 423] has none (validation size 0): use "
                                            "eval.checkpoint=last, or a validation size >= 1"))
    assert not {p.name for p in tmp_path.iterdir()} - {".hydra", "cli.log"}  # only Hydra's own bookkeeping


def test_output_directory_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run_cli(f"hydra.run.dir={blocker / 'run'}")
    assert_one_line_error(result, re.escape(f"cannot create the output directory '{blocker / 'run'}': Not a "
                                            f"directory; set hydra.run.dir=<writable dir> (hydra.sweep.dir with -m)"))


def test_cuda_requested_without_cuda(tmp_path):
    result = run_cli("hardware=cuda", f"hydra.run.dir={tmp_path}")  # conftest hides GPUs: CUDA_VISIBLE_DEVICES=""
    assert_one_line_error(result, re.escape("hardware.device=cuda was requested but no CUDA device is available; "
                                            "use hardware=cpu or hardware=auto"))


def test_ensemble_size_zero_and_eval_only_ensemble_without_kept_checkpoints(tmp_path):
    result = run_cli("eval.ensemble_size=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, re.escape("eval.ensemble_size=0 is invalid: expected a positive integer (>= 1)"))
    trained = tmp_path / "trained"  # eval.checkpoint=best: no checkpoints/top/
    run(compose_config([*TINY, "train.iterations=4", "train.val_interval=2", "report.enabled=false"]), trained)
    result = run_cli("eval.only=true", f"train.resume={trained}", "eval.checkpoint=ensemble", "hardware=cpu",
                     f"hydra.run.dir={tmp_path / 'log'}")
    assert_one_line_error(result, re.escape(f"train.resume={trained}: no checkpoints in '{trained}/checkpoints/top' "
                                            f"(kept only by runs trained with eval.checkpoint=ensemble); use "
                                            f"eval.checkpoint=best or last"))


def test_nan_loss_stops_with_the_iteration_named(tmp_path):
    result = run_cli(*TINY, "algorithm.outer_lr=1e30", f"hydra.run.dir={tmp_path}")
    assert_one_line_error(result, r"non-finite training loss \(nan\) or gradient norm \(\S+\) at iteration \d+; "
                                  r"no checkpoint with a finite validation loss yet; lower algorithm.outer_lr/inner_lr"
                                  r" or set train.grad_clip \(or train.nan_policy=skip to skip such batches\)")
    assert not (tmp_path / "results.csv").exists()


# ---- value checks, in-process: each names the key, the value and what is allowed -----------------------
BAD_VALUES = [
    ("train=5", "train=5 is invalid: expected the train section (a mapping); set it with train.<key>=<value>"),
    ("~train.iterations", "train.iterations is required; it cannot be removed (set it with "
                          "train.iterations=<value>)"),
    ("train.iterations=0", "train.iterations=0 is invalid: expected a positive integer (>= 1)"),
    ("train.iterations=-5", "train.iterations=-5 is invalid: expected a positive integer (>= 1)"),
    ("train.iterations=1.5", "train.iterations=1.5 is invalid: expected a positive integer (>= 1)"),
    ("train.iterations=true", "train.iterations=true is invalid: expected a positive integer (>= 1)"),
    ("train.iterations=null", "train.iterations=null is invalid: expected a positive integer (>= 1)"),
    ("train.meta_batch_size=0", "train.meta_batch_size=0 is invalid: expected a positive integer (>= 1)"),
    ("algorithm.inner_lr=0", "algorithm.inner_lr=0 is invalid: expected a positive number (> 0)"),
    ("algorithm.outer_lr=-0.001", "algorithm.outer_lr=-0.001 is invalid: expected a positive number (> 0)"),
    ("algorithm.inner_lr=fast", "algorithm.inner_lr='fast' is invalid: expected a positive number (> 0)"),
    ("algorithm.outer_lr=inf", "algorithm.outer_lr=inf is invalid: expected a positive number (> 0)"),
    ("algorithm.inner_steps=0", "algorithm.inner_steps=0 is invalid: expected a positive integer (>= 1)"),
    ("eval.inner_steps=-1", "eval.inner_steps=-1 is invalid: expected a positive integer (>= 1)"),
    ("eval.checkpoint=foo", "eval.checkpoint='foo' is invalid: expected one of best, last, ensemble"),
    ("eval.ensemble_size=0", "eval.ensemble_size=0 is invalid: expected a positive integer (>= 1)"),
    ("dataset.shots=0", "dataset.shots=0 is invalid: expected a positive integer (>= 1)"),
    ("dataset.query_shots=-2", "dataset.query_shots=-2 is invalid: expected a positive integer (>= 1)"),
    ("dataset.ways=0", "dataset.ways=0 is invalid: expected a positive integer (>= 1)"),
    ("dataset.ways=5", "dataset.ways=5 is invalid for sinusoid regression: expected 1"),
    ("seed=-1", "seed=-1 is invalid: expected an integer >= 0"),
    ("algorithm.first_order=maybe", "algorithm.first_order='maybe' is invalid: expected true or false"),
    ("train.nan_policy=ignore", "train.nan_policy='ignore' is invalid: expected one of stop, skip"),
    ("train.grad_clip=0", "train.grad_clip=0 is invalid: expected a positive number or null (off)"),
    ("hardware.threads=0", "hardware.threads=0 is invalid: expected a positive integer or null"),
    ("hardware.device=tpu", "hardware.device='tpu' is invalid: expected one of auto, cpu, cuda, cuda:<index>"),
    ("hardware.compile=maybe", "hardware.compile='maybe' is invalid: expected true or false"),
    ("hardware.tf32=fast", "hardware.tf32='fast' is invalid: expected true or false"),
    ("hardware.compile=true", "hardware.compile=true with a second-order algorithm (algorithm=maml) compiles "
                              "transductive batch norm's double backward, which MLP does not have "
                              "(model.bn=transductive); use hardware.compile=false"),
    ("train.resume=/nonexistent/run", "train.resume=/nonexistent/run: no checkpoint at '/nonexistent/run'; use "
                                      "train.resume=true or a run directory that has checkpoints/last.pt"),
]


def first_error(overrides, run_dir) -> str:
    """The line maml-run prints for the first bad value: Hydra refuses a wrong type or a removed key while
    composing (the schemas of maml_runner/schema.py; cli.hydra_error_line), `run` everything else."""
    try:
        cfg = compose_config(overrides)
    except HydraException as exc:
        return cli.hydra_error_line(exc)
    with pytest.raises(UserError) as raised:
        run(cfg, run_dir)
    return str(raised.value)


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[override for override, _ in BAD_VALUES])
def test_bad_values_name_key_value_and_what_is_allowed(override, message, tmp_path):
    assert first_error([*TINY, override], tmp_path / "run") == message
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("override,message", [
    ("~algorithm.inner_lr", "algorithm.inner_lr is missing from the config; it is required (restore it, e.g. "
                            "algorithm.inner_lr=<value>)"),
    ("algorithm.inner_steps=2.5", "algorithm.inner_steps=2.5 is invalid: expected a positive integer (>= 1)"),
    ("+algorithm.inner_optimizer=adam", "algorithm.inner_optimizer is not a key of algorithm=maml "
                                        "(maml_runner.algorithms.maml.MAML.Config has: name, loss_reduction, "
                                        "inner_steps, inner_lr, outer_lr, first_order)"),
    ("model.hidden=[8,x]", "model.hidden[1]='x' is invalid: expected an integer"),
])
def test_the_algorithm_section_is_checked_against_its_class_config(override, message, tmp_path):
    """The algorithm's keys are its class's Config (algorithms/maml.py): a key it needs, of its type, and no other."""
    assert first_error([*TINY, override], tmp_path / "run") == message


def test_cuda_index_beyond_the_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (without it, any cuda device is refused by test_cuda_requested_without_cuda)")
    count = torch.cuda.device_count()
    with pytest.raises(UserError, match=rf"hardware.device=cuda:{count}: there are only {count} CUDA device"):
        select_device(OmegaConf.create({"device": f"cuda:{count}"}))


def test_an_interpolation_that_does_not_resolve(tmp_path):
    with pytest.raises(UserError, match=r"^the config does not resolve: .*nonexistent"):
        run(compose_config([*TINY, "name=${nonexistent.key}"]), tmp_path)


def test_unwritable_target_inside_the_run_is_one_line(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the checkpoint folder should be")
    with pytest.raises(UserError, match=r"^cannot write to '.*checkpoints': (File exists|Not a directory); choose a "
                                        r"writable output directory"):
        atomic_write_text(tmp_path / "checkpoints" / "last.pt", "x")


def test_permission_error_creating_the_run_directory_is_one_line(monkeypatch):
    """As root (CI containers) a read-only directory cannot be simulated; the formatting is what matters."""
    monkeypatch.setattr(cli, "_task_started", False)
    message, code = cli.error_line(PermissionError(13, "Permission denied", "/readonly/outputs/run"))
    assert message == ("maml-run: error: cannot create the output directory '/readonly/outputs/run': Permission "
                       "denied; set hydra.run.dir=<writable dir> (hydra.sweep.dir with -m)") and code == 2


# ---- NaN during training: stop naming the last good checkpoint, or skip -------------------------------
class PoisonedTasks(EpisodeSource):
    """The training stream of `source`, with NaN targets in the samples numbered in `poisoned`."""

    def __init__(self, source: EpisodeSource, poisoned: range):
        self.source, self.poisoned, self.count = source, poisoned, 0
        self.task_type = source.task_type

    def sample(self):
        task = self.source.sample()
        self.count += 1
        return task._replace(query_y=task.query_y * math.nan) if self.count in self.poisoned else task


def poison_training_samples(monkeypatch, poisoned: range) -> None:
    build_sources = train_module.build_sources

    def poisoned_sources(dataset_cfg):
        sources = dict(build_sources(dataset_cfg))
        sources["train"] = PoisonedTasks(sources["train"], poisoned)
        return sources

    monkeypatch.setattr(train_module, "build_sources", poisoned_sources)


def test_nan_batch_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_training_samples(monkeypatch, range(51, 10**9))  # meta-batch 2: iteration 26 onwards
    with pytest.raises(UserError) as raised:
        run(compose_config(TINY), tmp_path)
    last = read_csv(tmp_path / "metrics.csv", typed=True)[-1]
    assert last["iteration"] == 20
    assert str(raised.value) == (
        f"non-finite training loss (nan) or gradient norm (nan) at iteration 26; last good checkpoint: "
        f"{tmp_path / 'checkpoints/last.pt'} (iteration 20, val loss {last['val_loss']:.4g}); lower "
        f"algorithm.outer_lr/inner_lr or set train.grad_clip (or train.nan_policy=skip to skip such batches)")
    assert not (tmp_path / "results.csv").exists()


def test_nan_policy_skip_skips_the_batches_and_keeps_parameters_finite(tmp_path, monkeypatch, caplog):
    poison_training_samples(monkeypatch, range(51, 55))  # iterations 26 and 27
    with caplog.at_level(logging.WARNING, logger="maml_runner.train"):
        row = run(compose_config([*TINY, "train.nan_policy=skip"]), tmp_path)
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped batch")]
    assert [re.search(r"at iteration (\d+)", m).group(1) for m in skipped] == ["26", "27"]
    assert math.isfinite(row["mean"])
    metrics = read_csv(tmp_path / "metrics.csv", typed=True)
    assert [r["iteration"] for r in metrics] == [10, 20, 30, 40]
    assert all(math.isfinite(r["train_loss"]) for r in metrics)


def test_nan_policy_skip_gives_up_after_many_non_finite_batches_in_a_row(tmp_path, monkeypatch):
    poison_training_samples(monkeypatch, range(1, 10**9))
    with pytest.raises(UserError, match=rf"^{MAX_CONSECUTIVE_SKIPS} non-finite batches in a row "
                                        r"\(train.nan_policy=skip\): .* at iteration 20; last good checkpoint: "
                                        r".*last.pt \(iteration 10, "):
        run(compose_config([*TINY, "train.nan_policy=skip"]), tmp_path)


# ---- Omniglot data problems, on the tiny generated fixture (12 characters, split 6 / 3 / 3) --------------
def omniglot_overrides(root, cache) -> list[str]:
    return ["dataset=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={cache}", "dataset.split=[6,3,3]",
            "dataset.ways=3", "model.hidden=8", *TINY[:-2], "train.iterations=2", "hardware=cpu", "hardware.threads=1"]


@pytest.fixture
def omniglot_root(tmp_path):
    from omniglot_fixture import make_fake_omniglot
    return make_fake_omniglot(tmp_path / "omniglot")


def test_more_ways_than_characters_in_a_split_through_the_cli(omniglot_root, tmp_path):
    result = run_cli(*omniglot_overrides(omniglot_root, tmp_path / "cache"), "dataset.ways=4",
                     f"hydra.run.dir={tmp_path / 'run'}")
    assert_one_line_error(result, re.escape("dataset.ways=4 exceeds the 3 characters of the validation split; "
                                            "allowed: 1..3"))
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.csv").exists()


def rewrite_zip(path: Path, change) -> None:
    """Rewrite a zip with `change(name, data)` -> new data, or None to drop the member."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        members = [(name, archive.read(name)) for name in archive.namelist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                archive.writestr(name, data)


DAMAGES = ("shots", "missing-root", "missing-zip", "corrupt-zip", "corrupt-png", "partial-zip")


def first_drawing(name: str) -> bool:
    return name.endswith("_01.png") and "character01" in name and "Alphabet_b0" in name


@pytest.mark.parametrize("damage,message", [
    ("shots", r"dataset.shots \+ dataset.query_shots = 15 \+ 10 = 25 exceeds the 20 drawings per Omniglot character"),
    ("missing-root", r"Omniglot not found under '{root}': put images_background.zip and images_evaluation.zip \(or "
                     r"their extracted folders\) in '{root}', set dataset.root=... or OMNIGLOT_ROOT, or pass "
                     r"dataset.download=true"),
    ("missing-zip", r"Omniglot under '{root}' lacks images_evaluation \(.zip or folder\): put images_background.zip "
                    r"and images_evaluation.zip .*"),
    ("corrupt-zip", r"'{root}/images_background.zip' is not a readable zip \(.*\): replace it with the original "
                    r"images_background.zip"),
    ("corrupt-png", r"cannot decode '{root}/images_background.zip:images_background/Alphabet_b0/character01/"
                    r"0001_01.png' \(\w+\): the file is corrupt; restore the original Omniglot files"),
    ("partial-zip", r"character 'images_background/Alphabet_b0/character01' in '{root}/images_background.zip' has 19 "
                    r"drawings, expected 20 \(partial extraction or damaged zip\?\): restore the original files"),
], ids=DAMAGES)
def test_omniglot_data_problems_name_the_file_and_the_fix(damage, message, omniglot_root, tmp_path):
    overrides = omniglot_overrides(omniglot_root, tmp_path / "cache")
    if damage == "shots":
        overrides += ["dataset.shots=15", "dataset.query_shots=10"]
    elif damage == "missing-root":
        shutil.rmtree(omniglot_root)
    elif damage == "missing-zip":
        (omniglot_root / "images_evaluation.zip").unlink()
    elif damage == "corrupt-zip":
        (omniglot_root / "images_background.zip").write_bytes(b"PK\x03\x04 this is not a zip")
    elif damage == "corrupt-png":
        rewrite_zip(omniglot_root / "images_background.zip", lambda n, d: b"\x89PNG garbage" if first_drawing(n) else d)
    elif damage == "partial-zip":
        rewrite_zip(omniglot_root / "images_background.zip", lambda n, d: None if first_drawing(n) else d)
    with pytest.raises(UserError) as raised:
        run(compose_config(overrides), tmp_path / "run")
    assert re.fullmatch(message.format(root=re.escape(str(omniglot_root))), str(raised.value)), str(raised.value)
    assert not list(tmp_path.glob("cache/*.pt"))  # no cache from damaged data
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_partial_extraction_of_folders(tmp_path):
    from omniglot_fixture import make_fake_omniglot
    root = make_fake_omniglot(tmp_path / "omniglot", as_zip=False)
    character = root / "images_evaluation" / "Alphabet_e0" / "character02"
    for png in sorted(character.glob("*.png"))[12:]:
        png.unlink()
    with pytest.raises(UserError, match=rf"^character 'images_evaluation/Alphabet_e0/character02' in "
                                        rf"'{re.escape(str(root / 'images_evaluation'))}' has 12 drawings, expected 20"):
        run(compose_config(omniglot_overrides(root, tmp_path / "cache")), tmp_path / "run")
