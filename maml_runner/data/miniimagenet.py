"""miniImageNet few-shot episodes: Ravi & Larochelle's split (64 train / 16 validation / 20 test classes, 600 images
each, 84x84 RGB), read from what users already have (nothing is downloaded), in either of two layouts under
`dataset.root` (or MINIIMAGENET_ROOT):

(a) learn2learn's pickles `mini-imagenet-cache-{train,validation,test}.pkl`: a dict with `image_data`
    (N x 84 x 84 x 3 uint8) and `class_dict` (class -> image indices). They are read with an unpickler that only
    rebuilds numpy arrays and plain containers (a pickle from elsewhere never runs code here).
(b) Ravi's `train.csv`, `val.csv`, `test.csv` (filename,label) with the images in `images/` or already moved into
    `train|val|test/<label>/` by cbfinn/maml's `data/miniImagenet/proc_images.py`. The JPEGs are decoded once
    (resized to `dataset.image_size` with Lanczos where they are not, as proc_images.py) into a uint8 tensor
    cache whose name holds a fingerprint of the CSVs and file sizes.

Images are x / 255 in [0, 1] (cbfinn/maml's data_generator.py), no rotations; the split is the files' own.
"""
from __future__ import annotations

import csv
import logging
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .image_classes import (SPLITS, ClassImages, build_tasks, check_task_shape, decode_files, fingerprint,
                            load_cached, save_cached)

log = logging.getLogger(__name__)

PICKLES = {"train": "mini-imagenet-cache-train.pkl", "validation": "mini-imagenet-cache-validation.pkl",
           "test": "mini-imagenet-cache-test.pkl"}
CSVS = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
FOLDERS = {"train": "train", "validation": "val", "test": "test"}  # proc_images.py's output folders
STANDARD = {"train": 64, "validation": 16, "test": 20}  # Ravi & Larochelle's classes, 600 images each
IMAGES_PER_CLASS = 600


def _where_to_put(root: Path) -> str:
    return (f"put mini-imagenet-cache-{{train,validation,test}}.pkl (learn2learn) or train.csv, val.csv, test.csv "
            f"with the images in images/ or train|val|test/<label>/ (cbfinn/maml's proc_images.py) in '{root}', "
            f"or set dataset.root=... or MINIIMAGENET_ROOT")


def locate_miniimagenet(root) -> tuple[str, dict[str, Path]]:
    """("pickle" | "csv", split -> file); pickles win when both layouts are complete."""
    root = Path(root).expanduser()
    for layout, names in (("pickle", PICKLES), ("csv", CSVS)):
        found = {split: root / name for split, name in names.items() if (root / name).is_file()}
        if len(found) == len(SPLITS):
            return layout, found
    for layout, names in (("pickle", PICKLES), ("csv", CSVS)):  # a partial layout: name what is missing
        present = [split for split in SPLITS if (root / names[split]).is_file()]
        if present:
            missing = [names[split] for split in SPLITS if split not in present]
            raise DataError(f"miniImageNet under '{root}' lacks {', '.join(missing)}: {_where_to_put(root)}")
    raise DataError(f"miniImageNet not found under '{root}': {_where_to_put(root)}")


# ---- layout (a): learn2learn's pickles --------------------------------------------------------------------------
class _ArraysOnly(pickle.Unpickler):
    """Rebuilds numpy arrays, numpy scalars and builtin containers; refuses every other global (no code runs)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    hint = f"replace it with learn2learn's original {path.name}"
    try:
        with open(path, "rb") as handle:
            payload = _ArraysOnly(handle, encoding="latin1").load()
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or malicious files alike
        raise DataError(f"'{path}' is not a readable miniImageNet pickle ({type(exc).__name__}: "
                        f"{str(exc)[:80]}): {hint}") from None
    images = payload.get("image_data") if isinstance(payload, dict) else None
    classes = payload.get("class_dict") if isinstance(payload, dict) else None
    if not isinstance(images, np.ndarray) or not isinstance(classes, dict):
        raise DataError(f"'{path}' lacks image_data (array) or class_dict (dict): {hint}")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise DataError(f"'{path}': image_data has shape {tuple(images.shape)} {images.dtype}, expected "
                        f"N x S x S x 3 uint8: {hint}")
    out = {}
    for name, indices in classes.items():
        try:
            indices = [int(i) for i in indices]
        except (TypeError, ValueError):
            raise DataError(f"'{path}': class_dict['{name}'] is not a list of image indices: {hint}") from None
        if not indices or min(indices) < 0 or max(indices) >= len(images):
            raise DataError(f"'{path}': class_dict['{name}'] indexes images outside 0..{len(images) - 1}: {hint}")
        out[str(name)] = indices
    if not out:
        raise DataError(f"'{path}' has an empty class_dict: {hint}")
    return images, out


def _resized(images: np.ndarray, size: int) -> np.ndarray:
    """N x S x S x 3 -> N x 3 x size x size (Lanczos, where the stored size differs); a view when it does not."""
    if images.shape[1] == size:
        return images.transpose(0, 3, 1, 2)
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS)).transpose(2, 0, 1)
                     for image in images])


def read_pickles(files: dict[str, Path], size: int) -> ClassImages:
    """The three pickles, split after split, classes in name order; each split filled into one array (a pickle's
    own array is freed before the next is read)."""
    parts, labels, names, splits = [], [], [], {}
    for split in SPLITS:
        images, classes = _read_pickle(files[split])
        if images.shape[1] != size:
            log.info("resizing %s miniImageNet images from %d to %d pixels", files[split].name, images.shape[1], size)
        part = np.empty((sum(len(v) for v in classes.values()), 3, size, size), dtype=np.uint8)
        splits[split], row = [], 0
        for name in sorted(classes):
            if name in names:
                raise DataError(f"class '{name}' is in more than one of {', '.join(PICKLES.values())}: the split "
                                f"must be by class; restore the original files")
            count = len(classes[name])
            part[row:row + count] = _resized(images[classes[name]], size)
            row += count
            splits[split].append(len(names))
            labels += [len(names)] * count
            names.append(name)
        parts.append(part)
        del images
    return ClassImages(torch.from_numpy(np.concatenate(parts)), torch.tensor(labels), names, splits)


# ---- layout (b): Ravi's CSVs and JPEGs ------------------------------------------------------------------------
def _read_csv(path: Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read '{path}' ({type(exc).__name__}): expected Ravi & Larochelle's "
                        f"filename,label CSV") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    out = []
    for number, row in enumerate(rows, start=2):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"'{path}' line {number} is {','.join(row)!r}: expected filename,label")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"'{path}' lists no images: expected filename,label rows")
    return out


def _image_path(root: Path, split: str, filename: str, label: str) -> Path:
    for candidate in (root / "images" / filename, root / FOLDERS[split] / label / filename):
        if candidate.is_file():
            return candidate
    raise DataError(f"image '{filename}' of {CSVS[split]} is in neither '{root / 'images'}' nor "
                    f"'{root / FOLDERS[split] / label}': {_where_to_put(root)}")


def read_csvs(root: Path, files: dict[str, Path], size: int, configured_cache) -> ClassImages:
    rows = {split: _read_csv(files[split]) for split in SPLITS}
    paths, labels, names, splits = [], [], [], {}
    for split in SPLITS:
        by_class: dict[str, list[Path]] = {}
        for filename, label in rows[split]:
            by_class.setdefault(label, []).append(_image_path(root, split, filename, label))
        splits[split] = []
        for name in sorted(by_class):
            if name in names:
                raise DataError(f"class '{name}' is in more than one of {', '.join(CSVS.values())}: the split must "
                                f"be by class")
            splits[split].append(len(names))
            labels += [len(names)] * len(by_class[name])
            names.append(name)
            paths += sorted(by_class[name])
    key = fingerprint(size, *(files[s].read_bytes() for s in SPLITS),
                      *(f"{p.relative_to(root)}:{p.stat().st_size}" for p in paths))
    name = f"miniimagenet_{size}px_{key}.pt"
    cached = load_cached(root, configured_cache, "miniimagenet", name, len(paths))
    if cached is not None:
        return cached
    images = decode_files(paths, size, 3, "restore the original miniImageNet images", "miniImageNet")
    data = ClassImages(images, torch.tensor(labels), names, splits)
    save_cached(data, root, configured_cache, "miniimagenet", name)
    return data


# ---- building --------------------------------------------------------------------------------------------------
def load_miniimagenet(root, image_size: int = 84, cache_dir=None) -> ClassImages:
    """All images of the three splits (uint8 [N, 3, S, S]), their class ids, class names and the files' split."""
    root = Path(root).expanduser()
    layout, files = locate_miniimagenet(root)
    data = read_pickles(files, image_size) if layout == "pickle" else read_csvs(root, files, image_size, cache_dir)
    counts = {split: len(ids) for split, ids in data.splits.items()}
    sizes = set(data.class_sizes().tolist())
    if counts != STANDARD or sizes != {IMAGES_PER_CLASS}:
        log.warning("miniImageNet under %s has %s classes (train/validation/test) with %s images each; Ravi & "
                    "Larochelle's split has 64/16/20 with 600: results are not comparable with published ones",
                    root, "/".join(str(counts[s]) for s in SPLITS),
                    "/".join(str(s) for s in sorted(sizes)) if len(sizes) < 4 else f"{min(sizes)}..{max(sizes)}")
    return data


def build_miniimagenet(dataset_cfg) -> dict:
    """Episode sources for the train / validation / test classes of the files' own split."""
    check_task_shape(dataset_cfg)
    if int(dataset_cfg.get("channels", 3)) != 3:
        raise DataError(f"dataset.channels={dataset_cfg.get('channels')} is invalid for miniImageNet: its images "
                        f"are RGB, expected 3")
    data = load_miniimagenet(dataset_cfg.root, int(dataset_cfg.image_size), dataset_cfg.get("cache_dir"))
    return build_tasks(dataset_cfg, data, data.splits, "files", f"miniImageNet under '{dataset_cfg.root}'")
