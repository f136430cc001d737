"""Omniglot reader, cache, split and episodes on a tiny generated fixture; one test on the real data if present."""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from maml_runner.data import omniglot
from maml_runner.data.omniglot import build_omniglot, load_omniglot, split_characters
from maml_runner.errors import DataError, UserError
from omniglot_fixture import make_fake_omniglot

N_CHARS = 4 * 5  # (2 + 2 alphabets) x 5 characters


def dataset_cfg(root, cache_dir, **overrides):
    values = dict(root=str(root), ways=3, shots=1, query_shots=2, image_size=28, split=[1100, 100, 423], split_seed=1,
                  rotations=[0, 90, 180, 270], cache_dir=str(cache_dir), download=False)
    return OmegaConf.create({**values, **overrides})


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return make_fake_omniglot(tmp_path_factory.mktemp("omniglot"), chars_per_alphabet=5)


@pytest.fixture(scope="module")
def sources(fake_root, tmp_path_factory):
    return build_omniglot(dataset_cfg(fake_root, tmp_path_factory.mktemp("cache"), split=[12, 4, 4]))


@pytest.mark.parametrize("as_zip", [True, False])
def test_reader_counts_range_and_ink(tmp_path, as_zip):
    root = make_fake_omniglot(tmp_path / "data", as_zip=as_zip)
    data = load_omniglot(root, 28, cache_dir=tmp_path / "cache")
    assert data.num_characters == 12 and data.images.shape == (240, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [c for c in range(12) for _ in range(20)]
    assert data.names[0].startswith("images_background/") and data.names[-1].startswith("images_evaluation/")
    images = data.images.float() / 255
    assert images.min() == 0 and images.max() == 1
    assert images.mean() < 0.5  # background 0, ink 1
    assert images[:, :, 0, 0].max() < 0.2  # corners are background


def test_cache_is_written_once_and_reused(tmp_path, monkeypatch):
    root = make_fake_omniglot(tmp_path / "data")
    first = load_omniglot(root, 28, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("omniglot_28px_*.pt"))) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(omniglot, "decode_images", no_decoding)
    second = load_omniglot(root, 28, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images)


def test_corrupt_cache_is_rebuilt(tmp_path):
    root = make_fake_omniglot(tmp_path / "data")
    first = load_omniglot(root, 28, cache_dir=tmp_path / "cache")
    cache = next((tmp_path / "cache").glob("*.pt"))
    cache.write_bytes(b"garbage")
    assert torch.equal(load_omniglot(root, 28, cache_dir=tmp_path / "cache").images, first.images)


def test_split_is_disjoint_complete_and_seeded():
    split = split_characters(1623, [1100, 100, 423], seed=1)
    sizes = {k: len(v) for k, v in split.items()}
    assert sizes == {"train": 1100, "validation": 100, "test": 423}
    union = set().union(*map(set, split.values()))
    assert len(union) == 1623
    again = split_characters(1623, [1100, 100, 423], seed=1)
    other = split_characters(1623, [1100, 100, 423], seed=2)
    assert all((split[k] == again[k]).all() for k in split)
    assert set(split["test"]) != set(other["test"])
    small = split_characters(20, [1100, 100, 423], seed=1)
    assert sum(len(v) for v in small.values()) == 20 and min(len(v) for v in small.values()) >= 1


def test_split_with_no_validation_set():
    """supervised-reptile's split_dataset(num_train=1200): 1,200 training and 423 test characters, no validation."""
    split = split_characters(1623, [1200, 0, 423], seed=1)
    assert {k: len(v) for k, v in split.items()} == {"train": 1200, "validation": 0, "test": 423}
    assert len(set(split["train"]) | set(split["test"])) == 1623
    small = split_characters(20, [1200, 0, 423], seed=1)  # a fixture: the proportions, and still no validation
    assert {k: len(v) for k, v in small.items()} == {"train": 15, "validation": 0, "test": 5}


def test_no_validation_source_when_the_validation_size_is_zero(fake_root, tmp_path):
    sources = build_omniglot(dataset_cfg(fake_root, tmp_path, split=[1200, 0, 423], ways=5))
    assert set(sources) == {"train", "test"}
    assert (sources["train"].num_classes, sources["test"].num_classes) == (15, 5)
    sources["train"].write_split(tmp_path / "split.json")
    import json
    payload = json.loads((tmp_path / "split.json").read_text())
    assert payload["validation"] == [] and len(payload["train"]) + len(payload["test"]) == N_CHARS
    with pytest.raises(DataError, match=r"^dataset.ways=6 exceeds the 5 characters of the test split; allowed: 1..5$"):
        build_omniglot(dataset_cfg(fake_root, tmp_path, split=[1200, 0, 423], ways=6))


@pytest.mark.parametrize("split", [[1200, -1, 423], [0, 100, 423], [1200, 423], [1200, 0, 0], [1200.5, 0, 423]])
def test_bad_split_is_one_line_error(fake_root, tmp_path, split):
    with pytest.raises(UserError) as raised:
        build_omniglot(dataset_cfg(fake_root, tmp_path, split=split))
    assert str(raised.value) == (f"dataset.split={split} is invalid: expected three character counts [train, "
                                 f"validation, test], train and test >= 1, validation >= 0 (0: no validation set)")


def test_episode_shapes_labels_and_disjoint_support_query(sources):
    source = sources["train"]
    assert source.num_classes == 12
    for _ in range(20):
        task = source.sample()
        assert task.support_x.shape == (3, 1, 28, 28) and task.query_x.shape == (6, 1, 28, 28)
        assert sorted(task.support_y.tolist()) == [0, 1, 2]
        assert sorted(task.query_y.tolist()) == [0, 0, 1, 1, 2, 2]
        for s in task.support_x:  # no support image reappears in the query set
            assert not any(torch.equal(s, q) for q in task.query_x)


def _quarter_turns_between(a: torch.Tensor, b: torch.Tensor):
    for k in range(4):
        if torch.equal(torch.rot90(a, k, dims=(-2, -1)), b):
            return k
    return None


def test_rotations_are_per_class_and_differ_across_classes(tmp_path):
    """Each class gets one rotation per task; different classes in a task get different ones (no late binding)."""
    root = make_fake_omniglot(tmp_path / "data", chars_per_alphabet=5)
    source = build_omniglot(dataset_cfg(root, tmp_path / "cache", ways=5, shots=1, query_shots=1,
                                        split=[10, 5, 5]))["train"]
    base = source.meta_dataset.dataset
    seen, mixed = set(), False
    random.seed(0)
    for _ in range(40):
        x, _ = source.task_dataset.sample()
        description_turns = []
        for image in x:  # find which training image (unrotated) this is and by how much it is turned
            for index in range(len(base)):
                k = _quarter_turns_between(base.images[index], image)
                if k is not None:
                    description_turns.append((base.labels[index], k))
                    break
        by_class = {}
        for label, k in description_turns:
            by_class.setdefault(label, set()).add(k)
        assert all(len(ks) == 1 for ks in by_class.values()), "a class was rotated inconsistently"
        turns = {next(iter(ks)) for ks in by_class.values()}
        seen |= turns
        mixed |= len(turns) > 1
    assert seen == {0, 1, 2, 3} and mixed


def test_fixed_tasks_repeat_for_a_seed(sources):
    a = sources["test"].fixed_tasks(3, seed=5)
    b = sources["test"].fixed_tasks(3, seed=5)
    c = sources["test"].fixed_tasks(3, seed=6)
    assert all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    assert not all(torch.equal(x, y) for ta, tc in zip(a, c) for x, y in zip(ta, tc))


def test_split_file_names_every_character_once(sources, tmp_path):
    import json
    sources["train"].write_split(tmp_path / "split.json")
    payload = json.loads((tmp_path / "split.json").read_text())
    names = payload["train"] + payload["validation"] + payload["test"]
    assert len(names) == N_CHARS == len(set(names)) and payload["split_seed"] == 1


# ---- errors ------------------------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"Omniglot not found under '.*nowhere': put images_background.zip and "
                                        r"images_evaluation.zip"):
        load_omniglot(tmp_path / "nowhere")


def test_one_zip_missing(tmp_path):
    root = make_fake_omniglot(tmp_path / "data")
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(DataError, match="lacks images_evaluation"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


def test_corrupt_zip(tmp_path):
    root = make_fake_omniglot(tmp_path / "data")
    (root / "images_background.zip").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="images_background.zip' is not a readable zip"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


def test_corrupt_png(tmp_path):
    root = make_fake_omniglot(tmp_path / "data", as_zip=False)
    victim = sorted((root / "images_background").glob("*/*/*.png"))[3]
    victim.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match=r"cannot decode '.*\.png'.*corrupt"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


def test_partial_extraction(tmp_path):
    root = make_fake_omniglot(tmp_path / "data", as_zip=False)
    sorted((root / "images_evaluation").glob("*/*/*.png"))[0].unlink()
    with pytest.raises(DataError, match="has 19 drawings, expected 20"):
        load_omniglot(root, cache_dir=tmp_path / "cache")


def test_too_many_ways(fake_root, tmp_path):
    with pytest.raises(DataError, match=r"dataset.ways=6 exceeds the 4 characters of the validation split"):
        build_omniglot(dataset_cfg(fake_root, tmp_path, ways=6, split=[12, 4, 4]))


def test_too_many_shots(fake_root, tmp_path):
    with pytest.raises(UserError, match=r"dataset.shots \+ dataset.query_shots = 15 \+ 10 = 25 exceeds the 20"):
        build_omniglot(dataset_cfg(fake_root, tmp_path, shots=15, query_shots=10))


# ---- the real dataset --------------------------------------------------------------------------------------
def real_omniglot_root():
    candidates = [os.environ.get("OMNIGLOT_ROOT"), Path(__file__).resolve().parents[3] / "shared" / "data" / "omniglot"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "images_background.zip").exists() or \
                candidate and (Path(candidate) / "images_background").is_dir():
            return Path(candidate)
    return None


@pytest.mark.skipif(real_omniglot_root() is None,
                    reason="real Omniglot not found (set OMNIGLOT_ROOT or place it at ../shared/data/omniglot)")
def test_real_omniglot(tmp_path_factory):
    cache = Path(os.environ.get("MAML_RUNNER_TEST_CACHE", tmp_path_factory.mktemp("real_cache")))
    sources = build_omniglot(dataset_cfg(real_omniglot_root(), cache, ways=5, shots=1, query_shots=1))
    assert {k: v.num_classes for k, v in sources.items()} == {"train": 1100, "validation": 100, "test": 423}
    assert sum(len(v.meta_dataset.dataset) for v in sources.values()) == 32460
    task = sources["train"].sample()
    assert task.support_x.shape == (5, 1, 28, 28) and task.query_x.shape == (5, 1, 28, 28)
    assert 0.02 < task.support_x.mean().item() < 0.3  # mostly background (0) with ink strokes (1)


def test_read_only_root_caches_in_home(tmp_path, monkeypatch):
    root = make_fake_omniglot(tmp_path / "data")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    root.chmod(0o555)
    try:
        load_omniglot(root, 28)
    finally:
        root.chmod(0o755)
    assert not list(root.glob("*.pt")), "wrote a cache into a read-only data root"
    assert len(list((tmp_path / "home" / ".cache" / "maml_runner" / "omniglot").glob("*.pt"))) == 1


def test_a_cache_beside_a_read_only_dataset_is_read_not_rebuilt(tmp_path, monkeypatch):
    root = make_fake_omniglot(tmp_path / "shared")
    built = load_omniglot(root, 28)  # writable root: the cache is written beside the data
    (shared_cache,) = root.glob("omniglot_28px_*.pt")
    home = tmp_path / "home"
    monkeypatch.setattr(omniglot, "_cache_dir", lambda r, c: home / ".cache")  # as if the root were read-only

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the data folder holds a cache")
    monkeypatch.setattr(omniglot, "decode_images", no_decoding)
    assert torch.equal(load_omniglot(root, 28).images, built.images)
    shared_cache.write_bytes(b"garbage")  # a broken shared cache: decoded into the user's cache, left in place
    monkeypatch.undo()
    monkeypatch.setattr(omniglot, "_cache_dir", lambda r, c: home / ".cache")
    assert torch.equal(load_omniglot(root, 28).images, built.images)
    assert shared_cache.read_bytes() == b"garbage" and len(list((home / ".cache").glob("*.pt"))) == 1
