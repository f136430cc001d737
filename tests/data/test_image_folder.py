"""dataset=image_folder: class folders (seeded split) or train/val/test folders, decoding and cache, episodes,
errors, one end-to-end maml-run; on generated trees of 20 classes x 30 images (PNG and JPEG, 40x32 pixels)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_config, run_cli
from image_fixtures import class_image, make_image_folder
from maml_runner.config import validate
from maml_runner.data import image_folder
from maml_runner.data.image_folder import build_image_folder, load_image_folder
from maml_runner.errors import DataError, UserError
from maml_runner.io import read_csv

PER_CLASS = 30


def dataset_cfg(root, cache_dir, **overrides):
    values = dict(kind="image_folder", root=str(root), ways=3, shots=1, query_shots=5, eval_query_shots=None,
                  image_size=28, channels=3, split=[0.64, 0.16, 0.2], split_seed=1, rotations=[0],
                  eval_rotations=None, cache_dir=str(cache_dir))
    return OmegaConf.create({**values, **overrides})


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("flat"), classes=20, per_class=PER_CLASS)


@pytest.fixture(scope="module")
def split_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("split"), per_class=PER_CLASS, split_folders=(10, 5, 5))


def _class_ids(source, names):
    return {names.index(n) for n in source.class_names}


# ---- reading ------------------------------------------------------------------------------------------------------
def test_class_folders_are_read_resized_and_skip_non_images(flat_root, tmp_path):
    data = load_image_folder(flat_root, 28, 3, cache_dir=tmp_path)
    assert data.images.shape == (20 * PER_CLASS, 3, 28, 28) and data.images.dtype == torch.uint8
    assert data.names == [f"class_{i:02d}" for i in range(20)] and data.splits is None
    assert set(data.class_sizes().tolist()) == {PER_CLASS}  # notes.txt in every folder was skipped
    # a PNG (lossless) image, resized from 40x32 with Lanczos: close to the source's own resize
    from PIL import Image
    source = np.asarray(Image.fromarray(class_image(3, 1, (40, 32))).resize((28, 28), Image.LANCZOS))
    assert np.array_equal(data.images[3 * PER_CLASS + 1].numpy(), source.transpose(2, 0, 1))


def test_grayscale_channel_option(flat_root, tmp_path):
    data = load_image_folder(flat_root, 16, 1, cache_dir=tmp_path)
    assert data.images.shape == (20 * PER_CLASS, 1, 16, 16)


def test_seeded_split_is_disjoint_complete_and_follows_the_proportions(flat_root, tmp_path):
    sources = build_image_folder(dataset_cfg(flat_root, tmp_path))
    names = [f"class_{i:02d}" for i in range(20)]
    ids = {split: _class_ids(source, names) for split, source in sources.items()}
    assert {k: len(v) for k, v in ids.items()} == {"train": 13, "validation": 3, "test": 4}  # 0.64/0.16/0.2 of 20
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    assert set().union(*ids.values()) == set(range(20))
    again = build_image_folder(dataset_cfg(flat_root, tmp_path))
    other = build_image_folder(dataset_cfg(flat_root, tmp_path, split_seed=2))
    assert _class_ids(again["test"], names) == ids["test"] != _class_ids(other["test"], names)


def test_split_folders_are_the_split(split_root, tmp_path):
    sources = build_image_folder(dataset_cfg(split_root, tmp_path))
    assert {k: v.class_names for k, v in sources.items()} == {
        "train": [f"class_{i:02d}" for i in range(10)], "validation": [f"class_{i:02d}" for i in range(10, 15)],
        "test": [f"class_{i:02d}" for i in range(15, 20)]}
    sources["test"].write_split(tmp_path / "split.json")
    assert '"split_seed": "folders"' in (tmp_path / "split.json").read_text()


def test_cache_is_written_once_and_reused(flat_root, tmp_path, monkeypatch):
    first = load_image_folder(flat_root, 28, 3, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("image_folder_28px_3ch_*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(image_folder, "decode_files", no_decoding)
    assert torch.equal(load_image_folder(flat_root, 28, 3, cache_dir=tmp_path).images, first.images)


def test_a_changed_file_invalidates_the_cache(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=3, per_class=4)
    load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")
    victim = root / "class_01" / "img_001.png"
    from PIL import Image
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(victim)
    data = load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")
    assert int(data.images[4 + 1].max()) == 0  # the new (black) image, not the cached one
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


# ---- episodes -----------------------------------------------------------------------------------------------------
def test_episodes_shapes_labels_range_and_rotations(flat_root, tmp_path):
    sources = build_image_folder(dataset_cfg(flat_root, tmp_path, eval_query_shots=2, rotations=[0, 90, 180, 270],
                                             eval_rotations=[0]))
    random.seed(0)
    batch = sources["train"].sample_batch(6)
    assert batch.support_x.shape == (6, 3, 3, 28, 28) and batch.query_x.shape == (6, 15, 3, 28, 28)
    assert batch.support_y.tolist() == [[0, 1, 2]] * 6
    assert batch.query_y.tolist() == [[c for c in range(3) for _ in range(5)]] * 6
    assert 0 <= float(batch.query_x.min()) and float(batch.query_x.max()) <= 1
    test = sources["test"].sample()
    assert test.query_x.shape == (6, 3, 28, 28)
    # test classes unrotated: the bar of the fixture stays horizontal (rows of equal colour), train ones turn
    def horizontal(x):  # row-wise spread is small against column-wise spread for a horizontal bar
        return float(x.mean(0).std(1).mean()) < float(x.mean(0).std(0).mean())
    assert all(horizontal(image) for image in test.support_x)
    assert not all(horizontal(image) for task in batch.support_x for image in task)
    assert sources["train"].num_pooled_classes == 13 * 4


def test_rotations_are_off_by_default():
    cfg = compose_config(["dataset=image_folder"])
    assert list(cfg.dataset.rotations) == [0] and cfg.dataset.channels == 3


# ---- errors -------------------------------------------------------------------------------------------------------
def test_a_class_with_too_few_images_is_named(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=5, per_class=6)
    for path in sorted((root / "class_02").glob("img_*"))[3:]:
        path.unlink()
    with pytest.raises(DataError, match=r"class 'class_02' \((train|validation|test) split of image folder .*\) has "
                                        r"3 images, fewer than dataset.shots \+ dataset.(eval_)?query_shots = 1 \+ 5 "
                                        r"= 6"):
        build_image_folder(dataset_cfg(root, tmp_path / "cache", ways=1))


def test_a_split_with_fewer_classes_than_ways(flat_root, tmp_path):
    with pytest.raises(DataError, match=r"dataset.ways=4 exceeds the 3 classes of the validation split of image "
                                        r"folder '.*'; allowed: 1..3"):
        build_image_folder(dataset_cfg(flat_root, tmp_path, ways=4))


def test_an_unreadable_file_is_named(tmp_path):
    root = make_image_folder(tmp_path / "data", classes=3, per_class=4)
    victim = root / "class_01" / "img_002.JPG"
    victim.write_bytes(b"definitely not a jpeg")
    with pytest.raises(DataError, match=r"cannot decode '.*class_01/img_002.JPG' \(UnidentifiedImageError\): not a "
                                        r"readable image; remove or replace it"):
        load_image_folder(root, 16, 3, cache_dir=tmp_path / "cache")


def test_missing_root_empty_class_and_partial_split_folders(tmp_path):
    with pytest.raises(DataError, match=r"image folder '.*nowhere' not found: expected class folders"):
        load_image_folder(tmp_path / "nowhere", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"image folder '.*empty' has no class folders"):
        load_image_folder(tmp_path / "empty", 16)
    root = make_image_folder(tmp_path / "data", classes=3, per_class=2)
    (root / "class_03").mkdir()
    with pytest.raises(DataError, match=r"class folder '.*class_03' holds no image files"):
        load_image_folder(root, 16, cache_dir=tmp_path / "cache")
    split = make_image_folder(tmp_path / "split", per_class=2, split_folders=(3, 3, 3))
    import shutil
    shutil.rmtree(split / "val")
    with pytest.raises(DataError, match=r"has train/, test/ but no val/: give all three split folders"):
        load_image_folder(split, 16, cache_dir=tmp_path / "cache")


def test_bad_options_are_one_line(flat_root, tmp_path):
    with pytest.raises(UserError, match=r"dataset.channels=2 is invalid: expected 1 \(grayscale\) or 3 \(RGB\)"):
        build_image_folder(dataset_cfg(flat_root, tmp_path, channels=2))
    with pytest.raises(UserError, match=r"dataset.split=\[0.5, 0.5\] is invalid: expected three positive proportions"):
        build_image_folder(dataset_cfg(flat_root, tmp_path, split=[0.5, 0.5]))
    with pytest.raises(UserError, match=r"dataset.rotations/eval_rotations hold 45: expected multiples of 90"):
        build_image_folder(dataset_cfg(flat_root, tmp_path, rotations=[0, 45]))


# ---- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_maml_run_on_an_image_folder(split_root, tmp_path):
    cfg = compose_config(["dataset=image_folder", f"dataset.root={split_root}"])
    validate(cfg)
    result = run_cli("dataset=image_folder", f"dataset.root={split_root}", f"dataset.cache_dir={tmp_path / 'cache'}",
                     "dataset.image_size=28", "dataset.query_shots=3", "model.hidden=8", "train.iterations=4",
                     "train.val_interval=2", "train.val_tasks=3", "eval.num_tasks=4", "hardware=cpu",
                     "hardware.threads=1", "report.enabled=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    row = read_csv(tmp_path / "run" / "results.csv", typed=True)[0]
    assert (row["dataset.name"], row["iterations_done"], row["n_tasks"]) == ("image_folder_5w1s", 4, 4)
    assert 0 <= row["mean"] <= 1
