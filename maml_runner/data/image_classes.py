"""What miniImageNet and `dataset=image_folder` share: decoded images kept as one uint8 tensor, a tensor cache with a
content fingerprint in its name, class splits, and N-way K-shot tasks sampled a meta-batch at a time.

Images stay uint8 in memory ([N, C, S, S]; miniImageNet's 60,000 84x84 RGB images are 1.27 GB as uint8, 5 GB as
float32) and become float in [0, 1] (x / 255, as cbfinn/maml's loader) per sampled batch. A task draws `ways`
classes with `random.sample`, then `shots + query_shots` images of each class without replacement, like
cbfinn/maml's `get_images`; the class order of the draw is the label order. Everything random goes through the
global `random` module, so `EpisodeSource.iter_fixed_tasks` gives fixed validation/test tasks for a seed and
`sample_batch(n)` returns the same tasks as `n` calls of `sample()`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError, UserError
from ..io import atomic_write, atomic_write_text
from .base import EpisodeSource, Task, TaskBatch

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


class ClassImages:
    """Decoded images (uint8 [N, C, S, S]), the class id of each, the class names and, where the data defines its
    own split (miniImageNet's files, image_folder's train/val/test folders), the class ids of each split."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str],
                 splits: dict[str, list[int]] | None = None):
        self.images, self.labels, self.names, self.splits = images, labels, names, splits

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def class_sizes(self) -> np.ndarray:
        return np.bincount(self.labels.numpy(), minlength=self.num_classes)


# ---- the tensor cache ------------------------------------------------------------------------------------------
def fingerprint(*parts) -> str:
    """16 hex digits of a SHA-256 over the given strings/bytes (what identifies the source files)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def cache_dir(root: Path, configured, kind: str) -> Path:
    """`dataset.cache_dir` if set, else the data folder when writable, else ~/.cache/maml_runner/<kind>."""
    if configured:
        return Path(configured).expanduser()
    # Permission bits, not os.access alone: as root, os.access says yes even for a directory marked read-only.
    if root.is_dir() and os.access(root, os.W_OK) and root.stat().st_mode & 0o222:
        return root
    return Path.home() / ".cache" / "maml_runner" / kind


def load_cached(root: Path, configured_dir, kind: str, name: str, expected_images: int | None):
    """The cached ClassImages called `name` (the writable cache, else one beside a read-only dataset), or None.

    A broken cache in the writable place is deleted (it is rebuilt); one beside the data is only skipped."""
    cache = cache_dir(root, configured_dir, kind) / name
    candidates = [cache] if cache.is_file() else [root / name] if configured_dir is None else []
    for candidate in [c for c in candidates if c.is_file()]:
        try:
            payload = torch.load(candidate, weights_only=True)
            images, labels, names = payload["images"], payload["labels"], list(payload["names"])
            splits = payload.get("splits")
            if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape[0] != images.shape[0] or \
                    (expected_images is not None and images.shape[0] != expected_images):
                raise ValueError("shape or count differs")
            return ClassImages(images, labels, names, splits)
        except Exception as exc:  # noqa: BLE001 - any unreadable cache is decoded again
            log.warning("not using the %s cache %s (%s)", kind, candidate, type(exc).__name__)
            if candidate == cache:
                cache.unlink(missing_ok=True)
    return None


def save_cached(data: ClassImages, root: Path, configured_dir, kind: str, name: str) -> None:
    """Writes the cache atomically; an unwritable cache only costs decoding time next run."""
    buffer = io.BytesIO()
    torch.save({"images": data.images, "labels": data.labels, "names": data.names, "splits": data.splits}, buffer)
    path = cache_dir(root, configured_dir, kind) / name
    try:
        atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    except UserError as exc:
        log.warning("could not write the %s cache: %s", kind, exc)


# ---- splits --------------------------------------------------------------------------------------------------
def seeded_split(num_classes: int, fractions, seed: int, what: str) -> dict[str, list[int]]:
    """Class ids per split from one seeded shuffle, sizes in proportion to `fractions` (at least one class each)."""
    try:
        weights = [float(f) for f in fractions]
    except (TypeError, ValueError):
        weights = []
    if len(weights) != 3 or min(weights) <= 0:
        raise UserError(f"dataset.split={list(fractions) if isinstance(fractions, (list, tuple)) else fractions} "
                        f"is invalid: expected three positive proportions for train/validation/test, "
                        f"e.g. [0.64, 0.16, 0.2]")
    if num_classes < 3:
        raise DataError(f"{what} has {num_classes} class(es); a train/validation/test split needs at least 3")
    total = sum(weights)
    sizes = [max(1, int(round(w / total * num_classes))) for w in weights[1:]]
    sizes = [num_classes - sum(sizes), *sizes]
    if sizes[0] < 1:
        raise DataError(f"{what} has only {num_classes} classes: too few for dataset.split={weights}")
    order = np.random.RandomState(seed).permutation(num_classes)
    bounds = np.cumsum([0, *sizes])
    return {name: sorted(order[bounds[i]:bounds[i + 1]].tolist()) for i, name in enumerate(SPLITS)}


def write_split(path, names: list[str], split: dict[str, list[int]], seed) -> Path:
    payload = {"split_seed": seed, **{part: [names[i] for i in ids] for part, ids in split.items()}}
    return atomic_write_text(path, json.dumps(payload, indent=1))


# ---- checks ----------------------------------------------------------------------------------------------------
def eval_query_shots(dataset_cfg) -> int:
    """Query examples per class in validation and test tasks: `dataset.eval_query_shots`, null = query_shots."""
    value = dataset_cfg.get("eval_query_shots")
    return int(dataset_cfg.query_shots if value is None else value)


def check_task_shape(dataset_cfg) -> None:
    """Checks that need no data: positive sizes, 1 or 3 channels, a square image size."""
    for key in ("ways", "shots", "query_shots", "image_size"):
        value = dataset_cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise UserError(f"dataset.{key}={value} is invalid: expected a positive integer")
    if dataset_cfg.get("download"):
        raise UserError(f"dataset.download=true is not available for dataset.kind={dataset_cfg.get('kind')}: nothing "
                        f"is downloaded; put the files under dataset.root")
    channels = dataset_cfg.get("channels", 3)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UserError(f"dataset.channels={channels} is invalid: expected 1 (grayscale) or 3 (RGB)")


def check_split(dataset_cfg, data: ClassImages, split: dict[str, list[int]], what: str) -> None:
    """Every split has at least `ways` classes and every class enough images for a task of its split."""
    ways, shots = int(dataset_cfg.ways), int(dataset_cfg.shots)
    sizes = data.class_sizes()
    for name in SPLITS:
        ids = split[name]
        if ways > len(ids):
            raise DataError(f"dataset.ways={ways} exceeds the {len(ids)} classes of the {name} split of {what}; "
                            f"allowed: 1..{min(len(i) for i in split.values())}")
        key = "query_shots" if name == "train" else "eval_query_shots"
        query = int(dataset_cfg.query_shots) if name == "train" else eval_query_shots(dataset_cfg)
        smallest = min(ids, key=lambda i: sizes[i])
        if sizes[smallest] < shots + query:
            raise DataError(f"class '{data.names[smallest]}' ({name} split of {what}) has {sizes[smallest]} images, "
                            f"fewer than dataset.shots + dataset.{key} = {shots} + {query} = {shots + query}")


# ---- episodes --------------------------------------------------------------------------------------------------
class ImageClassTasks(EpisodeSource):
    """N-way K-shot tasks over some classes of a ClassImages; optional rotation of each class by a random
    multiple of 90 degrees per task (`degrees`, off = (0,))."""

    task_type = "classification"

    def __init__(self, data: ClassImages, class_ids, ways: int, shots: int, query_shots: int, degrees=(0,)):
        self.ways, self.shots, self.query_shots = int(ways), int(shots), int(query_shots)
        class_ids = [int(c) for c in class_ids]
        keep = torch.zeros(data.num_classes, dtype=torch.bool)
        keep[torch.as_tensor(class_ids, dtype=torch.long)] = True
        rows = keep[data.labels]
        # This split's images, classes renumbered 0..C-1. The readers store each split's images as one block: then
        # this is a view (no second copy of a 1.27 GB miniImageNet), else a copy of the rows.
        where = torch.nonzero(rows).flatten()
        contiguous = len(where) > 0 and int(where[-1] - where[0]) + 1 == len(where)
        self.pixels = (data.images[int(where[0]):int(where[-1]) + 1] if contiguous else data.images[rows]).numpy()
        local = {c: i for i, c in enumerate(class_ids)}
        labels = [local[int(c)] for c in data.labels[rows].tolist()]
        self.members: list[list[int]] = [[] for _ in class_ids]
        for index, label in enumerate(labels):
            self.members[label].append(index)
        self.pixel_labels = np.asarray(labels, dtype=np.int64)
        self.class_names = [data.names[c] for c in class_ids]
        self.num_classes = len(class_ids)
        self.quarter_turns = [int(d) // 90 % 4 for d in degrees] or [0]
        self.num_pooled_classes = self.num_classes * len(self.quarter_turns)  # pretrain: (class, rotation) = class
        self.split_info: tuple | None = None  # (names, split, seed) for write_split

    def _plan(self) -> tuple[list[list[int]], list[int]]:
        """Image indices [ways][shots + query] and quarter turns [ways] of one task (global `random` stream)."""
        per_class = self.shots + self.query_shots
        classes = random.sample(range(self.num_classes), self.ways)
        turns = [random.choice(self.quarter_turns) for _ in classes] if len(self.quarter_turns) > 1 else \
            [self.quarter_turns[0]] * self.ways
        return [random.sample(self.members[c], per_class) for c in classes], turns

    def _float(self, pixels: np.ndarray) -> torch.Tensor:
        # numpy, not torch: single-threaded small copies (see fast_episodes.py); x / 255 as cbfinn/maml's loader.
        x = pixels.astype(np.float32)
        x /= 255.0
        return torch.from_numpy(x)

    def sample_batch(self, num_tasks: int) -> TaskBatch:
        plans = [self._plan() for _ in range(num_tasks)]
        indices = np.array([p[0] for p in plans])  # [tasks, ways, per_class]
        turns = np.array([p[1] for p in plans])    # [tasks, ways]
        x = self.pixels[indices]                   # [tasks, ways, per_class, C, S, S] uint8
        for k in (1, 2, 3):
            chosen = turns == k
            if chosen.any():
                x[chosen] = np.rot90(x[chosen], k, axes=(-2, -1))
        x = self._float(x)
        k = self.shots
        y = torch.arange(self.ways).view(1, self.ways, 1).expand(num_tasks, self.ways, self.shots + self.query_shots)
        return TaskBatch(x[:, :, :k].reshape(num_tasks, -1, *x.shape[3:]), y[:, :, :k].reshape(num_tasks, -1),
                         x[:, :, k:].reshape(num_tasks, -1, *x.shape[3:]), y[:, :, k:].reshape(num_tasks, -1))

    def sample(self) -> Task:
        return self.sample_batch(1)[0]

    def pooled_batch(self, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As many images as `num_tasks` tasks hold, drawn uniformly, each randomly rotated; global labels
        (class id x rotations + rotation id)."""
        n = num_tasks * self.ways * (self.shots + self.query_shots)
        indices = torch.randint(len(self.pixels), (n,)).numpy()
        turn_ids = torch.randint(len(self.quarter_turns), (n,)).numpy()
        x = self.pixels[indices]
        for turn_id, k in enumerate(self.quarter_turns):
            chosen = turn_ids == turn_id
            if k and chosen.any():
                x[chosen] = np.rot90(x[chosen], k, axes=(-2, -1))
        labels = self.pixel_labels[indices] * len(self.quarter_turns) + turn_ids
        return self._float(x), torch.from_numpy(labels)

    def write_split(self, path) -> Path | None:
        return write_split(path, *self.split_info) if self.split_info else None


def build_tasks(dataset_cfg, data: ClassImages, split: dict[str, list[int]], split_seed, what: str,
                default_degrees=(0,)) -> dict[str, ImageClassTasks]:
    """Episode sources for the train / validation / test classes, after `check_split`."""
    check_split(dataset_cfg, data, split, what)
    degrees = tuple(dataset_cfg.get("rotations") or default_degrees)
    eval_degrees = dataset_cfg.get("eval_rotations")
    eval_degrees = degrees if eval_degrees is None else tuple(eval_degrees)
    for value in (*degrees, *eval_degrees):
        if isinstance(value, bool) or not isinstance(value, int) or value % 90:
            raise UserError(f"dataset.rotations/eval_rotations hold {value!r}: expected multiples of 90 (degrees)")
    sources = {}
    for name in SPLITS:
        query = int(dataset_cfg.query_shots) if name == "train" else eval_query_shots(dataset_cfg)
        sources[name] = ImageClassTasks(data, split[name], int(dataset_cfg.ways), int(dataset_cfg.shots), query,
                                        degrees if name == "train" else eval_degrees)
        sources[name].split_info = (data.names, split, split_seed)
    return sources


# ---- decoding --------------------------------------------------------------------------------------------------
def decode_image(path: Path, size: int, channels: int, hint: str) -> np.ndarray:
    """One image file as uint8 [channels, size, size]: PIL decodes any format it knows, converts to RGB or L and,
    when the size differs, resizes with Lanczos (what cbfinn/maml's proc_images.py does). `hint` ends the error."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises a zoo of types for broken files
        raise DataError(f"cannot decode '{path}' ({type(exc).__name__}): not a readable image; {hint}") from None
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_files(files: list[Path], size: int, channels: int, hint: str, what: str) -> torch.Tensor:
    """uint8 [len(files), channels, size, size], in the given order."""
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    log.info("decoding %d %s images to %dx%d (once; then cached)", len(files), what, size, size)
    for row, path in enumerate(files):
        out[row] = decode_image(path, size, channels, hint)
    return torch.from_numpy(out)
