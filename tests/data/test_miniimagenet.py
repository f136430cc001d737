"""miniImageNet readers (learn2learn pickles, Ravi's CSVs + JPEGs), episodes, errors, Finn's protocol and one
end-to-end maml-run, on tiny generated fixtures (20 classes x 30 images, split 10/5/5)."""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from image_fixtures import (SPLIT_PICKLES, class_image, class_name, make_miniimagenet_csv,
                            make_miniimagenet_pickles, split_labels)
from maml_runner.algorithms import build_algorithm
from maml_runner.config import validate
from maml_runner.data import build_sources, image_classes, miniimagenet
from maml_runner.data.base import TaskBatch
from maml_runner.data.fast_episodes import cached_episodes
from maml_runner.data.miniimagenet import build_miniimagenet, load_miniimagenet
from maml_runner.errors import DataError, UserError
from maml_runner.io import read_csv
from maml_runner.models import build_model

PER_CLASS = 30


def dataset_cfg(root, cache_dir, **overrides):
    values = dict(kind="miniimagenet", root=str(root), ways=5, shots=1, query_shots=15, eval_query_shots=None,
                  image_size=84, channels=3, rotations=[0], eval_rotations=None, cache_dir=str(cache_dir))
    return OmegaConf.create({**values, **overrides})


@pytest.fixture(scope="module")
def pickles(tmp_path_factory):
    return make_miniimagenet_pickles(tmp_path_factory.mktemp("mini_pkl"), per_class=PER_CLASS)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_miniimagenet_csv(tmp_path_factory.mktemp("mini_csv"), per_class=PER_CLASS)


# ---- readers -----------------------------------------------------------------------------------------------------
def _check_counts_and_split(data):
    assert data.images.shape == (20 * PER_CLASS, 3, 84, 84) and data.images.dtype == torch.uint8
    assert data.num_classes == 20 and set(data.class_sizes().tolist()) == {PER_CLASS}
    expected = {split: [class_name(label) for label in labels] for split, labels in split_labels().items()}
    assert {split: [data.names[i] for i in ids] for split, ids in data.splits.items()} == expected
    ids = [set(v) for v in data.splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # disjoint by class


def test_pickles_are_read_exactly(pickles):
    data = load_miniimagenet(pickles)
    _check_counts_and_split(data)
    # a class's images are its source images (HWC -> CHW, no resampling) in class_dict's order (the fixture stores
    # them in reverse, so the storage order would not do)
    label = split_labels()["validation"][2]
    rows = torch.nonzero(data.labels == data.names.index(class_name(label))).flatten()
    source = np.stack([class_image(label, i) for i in range(PER_CLASS)])
    assert np.array_equal(data.images[rows].numpy(), source.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("moved", [False, True])  # images/ (Ravi) or train|val|test/<label>/ (proc_images.py)
def test_csv_jpegs_decode_to_the_source_images(tmp_path, moved):
    root = make_miniimagenet_csv(tmp_path / "data", per_class=PER_CLASS, moved=moved)
    data = load_miniimagenet(root, cache_dir=tmp_path / "cache")
    _check_counts_and_split(data)
    label = split_labels()["test"][0]
    first = data.images[data.labels == data.names.index(class_name(label))][0].numpy().astype(float)
    error = lambda i: np.abs(first - class_image(label, i).transpose(2, 0, 1)).mean()  # noqa: E731
    assert error(0) < 4 < 15 < error(1)  # JPEG quality 95: close to its source, not to the next image


def test_jpeg_cache_is_written_once_and_reused(jpegs, tmp_path, monkeypatch):
    first = load_miniimagenet(jpegs, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("miniimagenet_84px_*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(miniimagenet, "decode_files", no_decoding)
    second = load_miniimagenet(jpegs, cache_dir=tmp_path)
    assert torch.equal(first.images, second.images) and first.names == second.names
    assert second.splits == first.splits


def test_a_smaller_image_size_is_resized(pickles):
    data = load_miniimagenet(pickles, image_size=42)
    assert data.images.shape == (600, 3, 42, 42)


# ---- episodes ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(pickles, tmp_path_factory):
    return build_miniimagenet(dataset_cfg(pickles, tmp_path_factory.mktemp("cache"), eval_query_shots=1))


def test_episode_shapes_labels_and_value_range(sources):
    assert {k: v.num_classes for k, v in sources.items()} == {"train": 10, "validation": 5, "test": 5}
    random.seed(0)
    batch = sources["train"].sample_batch(4)
    assert batch.support_x.shape == (4, 5, 3, 84, 84) and batch.query_x.shape == (4, 75, 3, 84, 84)
    assert batch.support_x.dtype == torch.float32 and 0 <= batch.support_x.min() and batch.query_x.max() <= 1
    assert batch.support_y.tolist() == [[0, 1, 2, 3, 4]] * 4
    assert batch.query_y.tolist() == [[c for c in range(5) for _ in range(15)]] * 4
    test = sources["test"].sample()  # K query images per class at test (eval_query_shots=1)
    assert test.support_x.shape == (5, 3, 84, 84) and test.query_x.shape == (5, 3, 84, 84)


def test_a_task_holds_distinct_images_of_its_classes_only(sources):
    """Support and query images of a class are different images of that class, from this split only."""
    source = sources["validation"]
    colours = {name: np.random.RandomState(int(name[1:])).randint(40, 216, size=3) for name in source.class_names}
    random.seed(1)
    for _ in range(10):
        task = source.sample()
        x = torch.cat([task.support_x, task.query_x]).numpy() * 255
        y = torch.cat([task.support_y, task.query_y]).numpy()
        # the class colour is the median pixel (bar and noise aside); each label is one class of this split
        medians = np.median(x.reshape(len(x), 3, -1), axis=2)
        for label in range(5):
            distances = {n: np.abs(medians[y == label] - c).max() for n, c in colours.items()}
            assert sorted(distances.values())[0] < 12 < sorted(distances.values())[1]
        flat = x.reshape(len(x), -1)
        assert len({row.tobytes() for row in flat}) == len(flat)  # no image twice in a task


def test_sample_batch_equals_sampling_task_by_task_and_fixed_tasks_repeat(sources):
    random.seed(4)
    batch = sources["train"].sample_batch(3)
    random.seed(4)
    one_by_one = TaskBatch.stack([sources["train"].sample() for _ in range(3)])
    assert all(torch.equal(a, b) for a, b in zip((batch.support_x, batch.query_x, batch.query_y),
                                                  (one_by_one.support_x, one_by_one.query_x, one_by_one.query_y)))
    a, b = sources["test"].fixed_tasks(3, seed=5), sources["test"].fixed_tasks(3, seed=5)
    c = sources["test"].fixed_tasks(3, seed=6)
    assert all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    assert not all(torch.equal(x, y) for ta, tc in zip(a, c) for x, y in zip(ta, tc))
    assert cached_episodes(sources["train"]) is sources["train"]  # samples a meta-batch itself, no learn2learn wrap


def test_split_file_names_every_class_once(sources, tmp_path):
    import json
    sources["train"].write_split(tmp_path / "split.json")
    payload = json.loads((tmp_path / "split.json").read_text())
    assert payload["test"] == [class_name(label) for label in split_labels()["test"]]
    assert len(payload["train"] + payload["validation"] + payload["test"]) == 20


def test_pooled_batch_has_global_class_labels(sources):
    torch.manual_seed(0)
    x, y = sources["train"].pooled_batch(2)
    assert x.shape == (2 * 5 * 16, 3, 84, 84) and sources["train"].num_pooled_classes == 10
    assert 0 <= int(y.min()) and int(y.max()) < 10


# ---- errors ------------------------------------------------------------------------------------------------------
def test_missing_root_names_the_expected_files(tmp_path):
    with pytest.raises(DataError, match=r"miniImageNet not found under '.*nowhere': put mini-imagenet-cache-"
                                        r"\{train,validation,test\}.pkl \(learn2learn\) or train.csv, val.csv, "
                                        r"test.csv"):
        load_miniimagenet(tmp_path / "nowhere")


def test_a_missing_pickle_is_named(tmp_path):
    root = make_miniimagenet_pickles(tmp_path / "data", per_class=3)
    (root / SPLIT_PICKLES["test"]).unlink()
    with pytest.raises(DataError, match=r"lacks mini-imagenet-cache-test.pkl: put"):
        load_miniimagenet(root)


def test_a_truncated_pickle_is_one_line(tmp_path):
    root = make_miniimagenet_pickles(tmp_path / "data", per_class=3)
    path = root / SPLIT_PICKLES["validation"]
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match=r"mini-imagenet-cache-validation.pkl' is not a readable miniImageNet pickle "
                                        r"\(.*\): replace it with learn2learn's original"):
        load_miniimagenet(root)


class _RunsCode:
    """Unpickled by plain pickle.load, this writes `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    root = make_miniimagenet_pickles(tmp_path / "data", per_class=3)
    with open(root / SPLIT_PICKLES["train"], "wb") as handle:
        pickle.dump({"image_data": _RunsCode(str(tmp_path / "marker")), "class_dict": {}}, handle)
    with pytest.raises(DataError, match=r"not a readable miniImageNet pickle \(UnpicklingError: refusing to load "
                                        r"builtins.exec\)"):
        load_miniimagenet(root)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_pickles_of_every_protocol_are_read(tmp_path, protocol):
    """learn2learn's files are protocol 2-4 pickles from numpy 1.x; newer writers use protocol 5 (_frombuffer)."""
    images = np.arange(2 * 84 * 84 * 3, dtype=np.int64).astype(np.uint8).reshape(2, 84, 84, 3)
    for name in SPLIT_PICKLES.values():
        with open(tmp_path / name, "wb") as handle:
            pickle.dump({"image_data": images, "class_dict": {name[:-4]: [np.int64(1), 0]}}, handle, protocol=protocol)
    data = load_miniimagenet(tmp_path)
    assert data.images.shape == (6, 3, 84, 84)
    assert np.array_equal(data.images[0].numpy(), images[1].transpose(2, 0, 1))


def test_a_pickle_with_the_wrong_content_is_named(tmp_path):
    root = make_miniimagenet_pickles(tmp_path / "data", per_class=3)
    with open(root / SPLIT_PICKLES["train"], "wb") as handle:
        pickle.dump({"image_data": np.zeros((3, 84, 84), np.uint8), "class_dict": {"a": [0, 1, 2]}}, handle)
    with pytest.raises(DataError, match=r"image_data has shape \(3, 84, 84\) uint8, expected N x S x S x 3 uint8"):
        load_miniimagenet(root)


def test_a_missing_jpeg_is_named(tmp_path):
    root = make_miniimagenet_csv(tmp_path / "data", per_class=3)
    victim = sorted((root / "images").glob("*.jpg"))[4]
    victim.unlink()
    with pytest.raises(DataError, match=rf"image '{victim.name}' of (train|val|test).csv is in neither"):
        load_miniimagenet(root, cache_dir=tmp_path / "cache")


def test_a_corrupt_jpeg_is_named_and_nothing_is_cached(tmp_path):
    root = make_miniimagenet_csv(tmp_path / "data", per_class=3)
    victim = sorted((root / "images").glob("*.jpg"))[7]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match=rf"cannot decode '.*{victim.name}' \(UnidentifiedImageError\)"):
        load_miniimagenet(root, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.pt"))


def test_a_class_in_two_splits_is_refused(tmp_path):
    root = make_miniimagenet_csv(tmp_path / "data", per_class=3)
    (root / "test.csv").write_text((root / "test.csv").read_text() + f"{class_name(0)}00000000.jpg,{class_name(0)}\n")
    with pytest.raises(DataError, match=rf"class '{class_name(0)}' is in more than one of train.csv, val.csv, "
                                        rf"test.csv"):
        load_miniimagenet(root, cache_dir=tmp_path / "cache")


def test_too_many_ways_and_too_few_images(pickles, tmp_path):
    with pytest.raises(DataError, match=r"dataset.ways=6 exceeds the 5 classes of the validation split of "
                                        r"miniImageNet under .*; allowed: 1..5"):
        build_miniimagenet(dataset_cfg(pickles, tmp_path, ways=6))
    with pytest.raises(DataError, match=r"class 'n\d+' \(train split of miniImageNet under .*\) has 30 images, "
                                        r"fewer than dataset.shots \+ dataset.query_shots = 16 \+ 15 = 31"):
        build_miniimagenet(dataset_cfg(pickles, tmp_path, shots=16))
    with pytest.raises(UserError, match=r"dataset.channels=1 is invalid for miniImageNet"):
        build_miniimagenet(dataset_cfg(pickles, tmp_path, channels=1))


# ---- Finn et al. 2017's miniImageNet protocol ----------------------------------------------------------------------
@pytest.mark.parametrize("algorithm, shots", [("maml", 1), ("maml", 5), ("fomaml", 1), ("fomaml", 5)])
def test_finn2017_miniimagenet_presets_are_the_released_code(algorithm, shots):
    cfg = compose_config([f"experiment=finn2017_{algorithm}_miniimagenet_5w{shots}s"])
    validate(cfg)
    assert (cfg.algorithm.name, cfg.dataset.kind, cfg.dataset.ways, cfg.dataset.shots) == \
        (algorithm, "miniimagenet", 5, shots)
    assert (cfg.dataset.query_shots, cfg.dataset.eval_query_shots) == (15, shots)  # 15 in training, K at test
    assert (cfg.train.meta_batch_size, cfg.algorithm.inner_lr, cfg.algorithm.inner_steps, cfg.eval.inner_steps) == \
        (4, 0.01, 5, 10)
    assert (cfg.algorithm.outer_lr, cfg.train.iterations, cfg.train.grad_clip_value, cfg.train.grad_clip) == \
        (0.001, 60000, 10, None)
    assert (cfg.model.hidden, cfg.model.pooling, cfg.model.init, cfg.model.head_init) == (32, "max", "xavier", "same")
    assert (cfg.model.bn_scale, cfg.model.bn_eps, cfg.model.bn_adapted) == (False, 1e-3, False)
    assert cfg.algorithm.loss_reduction == "sum_over_shots" and cfg.eval.checkpoint == "last"
    assert (cfg.eval.num_tasks, cfg.dataset.image_size, cfg.dataset.channels) == (600, 84, 3)  # tested one at a time
    model = build_model(cfg.model, cfg.dataset)
    assert model.head.in_features == 32 * 5 * 5  # 84 -> 42 -> 21 -> 10 -> 5
    assert model(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_generic_miniimagenet_presets_keep_the_runner_defaults():
    cfg = compose_config(["dataset=miniimagenet_5w5s"])
    assert (cfg.model.hidden, cfg.model.pooling, cfg.train.meta_batch_size, cfg.eval.inner_steps) == (32, "max", 4, 10)
    assert cfg.algorithm.loss_reduction == "mean" and cfg.train.grad_clip_value is None
    assert (cfg.model.init, cfg.model.bn_adapted, cfg.eval.checkpoint) == ("pytorch", True, "best")


def _finn_algorithm(vectorize: str, grad_clip_value=None, algorithm="maml"):
    cfg = compose_config([f"experiment=finn2017_{algorithm}_miniimagenet_5w1s", "model.hidden=4",
                          "algorithm.inner_steps=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.dataset).double()

    class Source:
        shots = 1

    algo = build_algorithm(model, cfg.algorithm, "classification", 10, train_source=Source(), vectorize=vectorize)
    algo.grad_clip_value = grad_clip_value
    return algo


@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_fast_path_meta_gradient_equals_the_per_task_loop_on_finns_miniimagenet_network(sources, algorithm):
    random.seed(2)
    tasks = sources["train"].sample_batch(2)
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x[:, ::5].double(),
                      tasks.query_y[:, ::5])  # 3 query images per class keep it quick
    grads = {}
    for vectorize in ("off", "on"):
        algo = _finn_algorithm(vectorize, algorithm=algorithm)
        assert algo.vectorized_for(tasks) == (vectorize == "on")
        algo.optimizer.param_groups[0]["lr"] = 0.0
        algo.train_step(tasks, 0)
        grads[vectorize] = torch.cat([p.grad.flatten() for p in algo.model.parameters()])
    assert float((grads["on"] - grads["off"]).norm() / grads["off"].norm()) < 1e-10


def test_grad_clip_value_clips_each_element_and_keeps_non_finite_detection():
    algo = _finn_algorithm("off", grad_clip_value=10)
    parameters = [p for p in algo.parameters()]
    for i, p in enumerate(parameters):
        p.grad = torch.full_like(p, 25.0 if i % 2 else -0.5).double()
    before = [p.detach().clone() for p in parameters]
    algo.optimizer.param_groups[0]["lr"] = 0.0
    stats = algo.finish_step(1.0, 0.5, 0)
    assert stats["finite"] == 1.0
    assert stats["grad_norm"] == pytest.approx(math.sqrt(sum(p.numel() * (625.0 if i % 2 else 0.25)
                                                             for i, p in enumerate(parameters))))  # before clipping
    for i, p in enumerate(parameters):
        assert torch.all(p.grad == (10.0 if i % 2 else -0.5))  # clamped to [-10, 10]; small values untouched
        assert torch.equal(p.detach(), before[i])
    parameters[0].grad = torch.full_like(parameters[0], math.inf)
    assert algo.finish_step(1.0, 0.5, 1)["finite"] == 0.0  # an inf gradient is not hidden by the clamp


def test_grad_clip_value_is_validated():
    cfg = compose_config(["dataset=miniimagenet_5w1s", "train.grad_clip_value=0"])
    with pytest.raises(UserError, match=r"train.grad_clip_value=0 is invalid: expected a positive number or null"):
        validate(cfg)


def test_build_sources_dispatches_and_names_the_kinds(pickles, tmp_path):
    assert set(build_sources(dataset_cfg(pickles, tmp_path))) == {"train", "validation", "test"}
    with pytest.raises(UserError, match=r"dataset.kind='imagenet' is not known; use one of sinusoid, omniglot, "
                                        r"miniimagenet, image_folder"):
        build_sources(dataset_cfg(pickles, tmp_path, kind="imagenet"))


# ---- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["pickles", "jpegs"])
def test_maml_run_finn2017_miniimagenet_end_to_end(layout, pickles, jpegs, tmp_path):
    root = pickles if layout == "pickles" else jpegs
    result = run_cli("experiment=finn2017_maml_miniimagenet_5w1s", f"dataset.root={root}",
                     f"dataset.cache_dir={tmp_path / 'cache'}", "train.iterations=4", "train.val_interval=2",
                     "train.val_tasks=3", "eval.num_tasks=4", "model.hidden=8", "hardware=cpu", "hardware.threads=1",
                     "report.enabled=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    row = read_csv(tmp_path / "run" / "results.csv", typed=True)[0]
    assert (row["dataset.name"], row["iterations_done"], row["n_tasks"], row["checkpoint"]) == \
        ("miniimagenet_5w1s", 4, 4, "last")
    assert 0 <= row["mean"] <= 1 and row["eval.inner_steps"] == 10
    assert len(read_csv(tmp_path / "run" / "metrics.csv")) == 2


def test_missing_dataset_is_one_line_from_the_cli(tmp_path):
    result = run_cli("experiment=finn2017_maml_miniimagenet_5w1s", f"dataset.root={tmp_path / 'none'}",
                     "hardware=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"miniImageNet not found under '{tmp_path / 'none'}'" in result.stderr


def test_image_classes_cache_dir_prefers_a_writable_root(tmp_path, monkeypatch):
    assert image_classes.cache_dir(tmp_path, None, "miniimagenet") == tmp_path
    assert image_classes.cache_dir(tmp_path, tmp_path / "c", "miniimagenet") == tmp_path / "c"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    tmp_path.joinpath("ro").mkdir()
    tmp_path.joinpath("ro").chmod(0o555)
    try:
        assert image_classes.cache_dir(tmp_path / "ro", None, "miniimagenet") == \
            tmp_path / "home" / ".cache" / "maml_runner" / "miniimagenet"
    finally:
        tmp_path.joinpath("ro").chmod(0o755)


# ---- the paper table -----------------------------------------------------------------------------------------------
def test_finn2017_table_has_the_miniimagenet_cells_and_compares_within_them(tmp_path):
    from maml_runner.io import write_csv
    from maml_runner.reproduce import load_tables, reproduce

    cells = {c["experiment"]: (c["setting"], c["paper"], c["paper_ci95"]) for c in load_tables()["finn2017"]["cells"]}
    assert cells["finn2017_maml_miniimagenet_5w1s"] == ("miniImageNet 5-way 1-shot", 48.70, 1.84)
    assert cells["finn2017_fomaml_miniimagenet_5w5s"] == ("miniImageNet 5-way 5-shot", 63.15, 0.91)
    accuracy = {"maml": np.array([0.5, 0.4, 0.6, 0.5]), "fomaml": np.array([0.4, 0.4, 0.5, 0.5])}

    def runner(cfg, run_dir):
        acc = accuracy[cfg.algorithm.name]
        write_csv(run_dir / "test_tasks.csv", [{"task": i, "loss": 1 - a, "accuracy": a} for i, a in enumerate(acc)])
        return {"mean": acc.mean(), "ci95": 0.01, "n_tasks": acc.size, "iterations_done": int(cfg.train.iterations)}

    rows = reproduce("finn2017", tmp_path, budget=0.001, cells=["miniimagenet_5w1s"], runner=runner, report=False)
    assert [r["experiment"] for r in rows] == ["finn2017_maml_miniimagenet_5w1s", "finn2017_fomaml_miniimagenet_5w1s"]
    assert [r["iterations"] for r in rows] == [60, 60]
    text = (tmp_path / "table.md").read_text()
    assert "| MAML | miniImageNet 5-way 1-shot | 50.00 ± 1.00 | 48.70 ± 1.84 | +1.30 | 60 / 60,000 | 4 | 10 | done |" \
        in text
    assert "| miniImageNet 5-way 1-shot | first-order MAML − MAML | -5.00 |" in text
