"""Tiny miniImageNet (both layouts) and image-folder trees: each class has its own colour and bar, each image noise."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_CSVS = {"train": "train.csv", "validation": "val.csv", "test": "test.csv"}
SPLIT_PICKLES = {"train": "mini-imagenet-cache-train.pkl", "validation": "mini-imagenet-cache-validation.pkl",
                 "test": "mini-imagenet-cache-test.pkl"}
PROC_FOLDERS = {"train": "train", "validation": "val", "test": "test"}


def class_image(label: int, index: int, size=(84, 84)) -> np.ndarray:
    """H x W x 3 uint8: a class colour, a class-specific horizontal bar, per-image noise."""
    height, width = size[1], size[0]
    colour = np.random.RandomState(label).randint(40, 216, size=3)
    image = np.empty((height, width, 3), dtype=np.int64)
    image[:] = colour
    row = (label * 7) % max(1, height - 10)
    image[row:row + 8] = 255 - colour
    image += np.random.RandomState(10_000 + 100 * label + index).randint(-30, 31, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def class_name(label: int) -> str:
    return f"n{label:08d}"


def split_labels(classes=(10, 5, 5)) -> dict[str, list[int]]:
    bounds = np.cumsum([0, *classes])
    return {split: list(range(bounds[i], bounds[i + 1])) for i, split in enumerate(SPLIT_CSVS)}


def make_miniimagenet_pickles(root, classes=(10, 5, 5), per_class=30) -> Path:
    """learn2learn's layout: mini-imagenet-cache-<split>.pkl = {image_data: N x 84 x 84 x 3, class_dict}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in split_labels(classes).items():
        images, class_dict = [], {}
        for label in labels:
            # learn2learn's files interleave nothing, but indices need not be contiguous: store them reversed.
            class_dict[class_name(label)] = list(range(len(images) + per_class - 1, len(images) - 1, -1))
            images += [class_image(label, i) for i in reversed(range(per_class))]
        with open(root / SPLIT_PICKLES[split], "wb") as handle:
            pickle.dump({"image_data": np.stack(images), "class_dict": class_dict}, handle)
    return root


def make_miniimagenet_csv(root, classes=(10, 5, 5), per_class=30, moved=False, size=(84, 84)) -> Path:
    """Ravi's layout: <split>.csv (filename,label) + images/ (or, `moved`, proc_images.py's <split>/<label>/)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in split_labels(classes).items():
        rows = [("filename", "label")]
        for label in labels:
            folder = root / PROC_FOLDERS[split] / class_name(label) if moved else root / "images"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                filename = f"{class_name(label)}{i:08d}.jpg"
                Image.fromarray(class_image(label, i, size)).save(folder / filename, quality=95, subsampling=0)
                rows.append((filename, class_name(label)))
        with open(root / SPLIT_CSVS[split], "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    return root


def make_image_folder(root, classes=20, per_class=30, split_folders=None, size=(40, 32)) -> Path:
    """root/<class>/<images> (or, with split_folders=(10, 5, 5), root/train|val|test/<class>/<images>); PNG and
    JPEG mixed, not square (the loader resizes), plus a stray text file the loader skips."""
    root = Path(root)
    layout = split_labels(split_folders) if split_folders else {None: list(range(classes))}
    for split, labels in layout.items():
        for label in labels:
            folder = root / (PROC_FOLDERS[split] if split else "") / f"class_{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                extension = ".png" if i % 2 else ".JPG"
                Image.fromarray(class_image(label, i, size)).save(folder / f"img_{i:03d}{extension}",
                                                                  format="PNG" if i % 2 else "JPEG")
            (folder / "notes.txt").write_text("not an image")
    return root
