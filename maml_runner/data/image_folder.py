"""Few-shot tasks from any folder of images (`dataset=image_folder`): one sub-folder per class.

    root/<class>/<image files>                       split by class with a seeded shuffle (dataset.split proportions)
    root/{train,val,test}/<class>/<image files>      the folders are the split (`validation/` may stand for `val/`)

Any format PIL reads (files are picked by the extensions PIL registers; hidden and other files are skipped). Each
image is converted to RGB (`dataset.channels=3`) or grayscale (1), resized to `dataset.image_size` square with
Lanczos where it differs, decoded once into a uint8 tensor cache (fingerprint of the file list, sizes and
modification times in its name), and scaled to [0, 1] per batch. Rotations are off by default (`dataset.rotations`).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import DataError
from .image_classes import (SPLITS, ClassImages, build_tasks, check_task_shape, decode_files, fingerprint,
                            load_cached, save_cached, seeded_split)

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


def _where_to_put(root: Path) -> str:
    return (f"expected class folders '{root}/<class>/<images>' (or '{root}/train|val|test/<class>/<images>'); "
            f"set dataset.root=... or IMAGE_FOLDER_ROOT")


def image_extensions() -> set[str]:
    from PIL import Image
    return {ext.lower() for ext in Image.registered_extensions()}


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path, extensions: set[str]) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.suffix.lower() in extensions)
    if not files:
        raise DataError(f"class folder '{folder}' holds no image files (extensions PIL reads, e.g. .jpg, .png)")
    return files


def _split_folders(root: Path) -> dict[str, Path] | None:
    """split -> folder when root holds train/ val/ test/ (None when it holds none of them: class folders)."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        hits = [root / name for name in names if (root / name).is_dir()]
        if hits:
            found[split] = hits[0]
    if not found:
        return None
    if len(found) < len(SPLITS):
        missing = [SPLIT_FOLDERS[s][0] + "/" for s in SPLITS if s not in found]
        raise DataError(f"'{root}' has {', '.join(p.name + '/' for p in found.values())} but no "
                        f"{', '.join(missing)}: give all three split folders, or only class folders (then "
                        f"dataset.split divides the classes)")
    return found


def scan_image_folder(root) -> tuple[list[str], list[list[Path]], dict[str, list[int]] | None]:
    """(class names, the image files of each class, class ids per split or None for a seeded split)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder '{root}' not found: {_where_to_put(root)}")
    extensions = image_extensions()
    folders = _split_folders(root)
    names, files, splits = [], [], None
    if folders is None:
        for folder in _visible_dirs(root):
            names.append(folder.name)
            files.append(_class_files(folder, extensions))
    else:
        splits = {}
        for split in SPLITS:
            splits[split] = []
            for folder in _visible_dirs(folders[split]):
                if folder.name in names:
                    raise DataError(f"class '{folder.name}' is in more than one split folder of '{root}': the split "
                                    f"must be by class")
                splits[split].append(len(names))
                names.append(folder.name)
                files.append(_class_files(folder, extensions))
    if not names:
        raise DataError(f"image folder '{root}' has no class folders: {_where_to_put(root)}")
    return names, files, splits


def load_image_folder(root, image_size: int, channels: int = 3, cache_dir=None) -> ClassImages:
    """All images (uint8 [N, channels, S, S]) with their class ids; from the tensor cache when it matches."""
    root = Path(root).expanduser()
    names, files, splits = scan_image_folder(root)
    paths = [path for class_files in files for path in class_files]
    stats = [path.stat() for path in paths]
    key = fingerprint(image_size, channels, splits is not None,
                      *(f"{p.relative_to(root)}:{s.st_size}:{int(s.st_mtime)}" for p, s in zip(paths, stats)))
    name = f"image_folder_{image_size}px_{channels}ch_{key}.pt"
    data = load_cached(root, cache_dir, "image_folder", name, len(paths))
    if data is None:
        images = decode_files(paths, image_size, channels, "remove or replace it", f"'{root}'")
        labels = torch.arange(len(names)).repeat_interleave(torch.tensor([len(f) for f in files]))
        data = ClassImages(images, labels, names, splits)
        save_cached(data, root, cache_dir, "image_folder", name)
    return data


def build_image_folder(dataset_cfg) -> dict:
    """Episode sources for the train / validation / test classes (split folders, else a seeded split)."""
    check_task_shape(dataset_cfg)
    root = Path(str(dataset_cfg.root)).expanduser()
    data = load_image_folder(root, int(dataset_cfg.image_size), int(dataset_cfg.get("channels", 3)),
                             dataset_cfg.get("cache_dir"))
    what = f"image folder '{root}'"
    if data.splits is not None:
        log.info("%s: the train/val/test folders are the split (%s classes)", what,
                 "/".join(str(len(data.splits[s])) for s in SPLITS))
        split, seed = data.splits, "folders"
    else:
        seed = int(dataset_cfg.get("split_seed", 1))
        split = seeded_split(data.num_classes, dataset_cfg.get("split", (0.64, 0.16, 0.2)), seed, what)
    return build_tasks(dataset_cfg, data, split, seed, what)
