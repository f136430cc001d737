"""Omniglot few-shot episodes (Finn et al. 2017 protocol) through learn2learn's MetaDataset / TaskDataset.

Images come from the two original parts (`images_background`, `images_evaluation`) as zips or extracted folders, are
verified by content (every character has 20 drawings), decoded once to 28x28 (ink = 1) and cached as a tensor file.
`dataset.image_resize`: `lanczos` converts to grayscale and resamples with Lanczos (89 grey levels); `binary_nearest`
is what cbfinn/maml's resize script produced: PIL's resize(LANCZOS) on the original mode-"1" PNGs resamples with
nearest neighbour (PIL does so for modes "1" and "P"), so the images stay binary. Characters are shuffled with a
fixed seed into meta-train / meta-validation / meta-test; each class of a task is one character rotated by a random
multiple of 90 degrees (`dataset.eval_rotations` may turn that off for validation and test tasks), or, with
`dataset.rotations_as_classes`, each training character in each rotation is a class of its own. `dataset.ink`
picks the polarity the models see (1: ink 1 on 0, the default and cbfinn/maml's; 0: the PNGs' dark ink on 1).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import urllib.request
import zipfile
from pathlib import Path

import learn2learn as l2l
import numpy as np
import torch
from PIL import Image

from ..config import RESIZE_MODES, check_omniglot_split, check_value
from ..errors import DataError, UserError
from ..io import atomic_write, atomic_write_text
from ..schema import BOOL, INK
from .base import EpisodeSource, Task

log = logging.getLogger(__name__)

PARTS = ("images_background", "images_evaluation")
DRAWINGS_PER_CHARACTER = 20
URL = "https://github.com/brendenlake/omniglot/raw/master/python/{part}.zip"
SPLITS = ("train", "validation", "test")


def _where_to_put(root: Path) -> str:
    return (f"put images_background.zip and images_evaluation.zip (or their extracted folders) in '{root}', "
            f"set dataset.root=... or OMNIGLOT_ROOT, or pass dataset.download=true")


# ---- locating and listing ------------------------------------------------------------------------------------
def locate_omniglot(root, download: bool = False) -> dict[str, Path]:
    """Per part, the extracted folder or the zip to read (a folder wins when both exist)."""
    root = Path(root).expanduser()
    found = {}
    for part in PARTS:
        folder, archive = root / part, root / f"{part}.zip"
        if folder.is_dir():
            found[part] = folder
        elif archive.is_file():
            found[part] = archive
    missing = [part for part in PARTS if part not in found]
    if missing and download:
        for part in missing:
            found[part] = _download(part, root)
        missing = []
    if len(missing) == len(PARTS):
        raise DataError(f"Omniglot not found under '{root}': {_where_to_put(root)}")
    if missing:
        raise DataError(f"Omniglot under '{root}' lacks {missing[0]} (.zip or folder): {_where_to_put(root)}")
    return found


def _download(part: str, root: Path) -> Path:
    target = root / f"{part}.zip"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(URL.format(part=part), timeout=60) as response:
            payload = response.read()
    except OSError as exc:
        raise DataError(f"downloading {part}.zip failed ({exc}); {_where_to_put(root)}") from None
    return atomic_write(target, lambda handle: handle.write(payload))


def _character_files(source: Path) -> dict[str, list[str]]:
    """character name ('images_background/<Alphabet>/characterNN') -> sorted image paths/members."""
    characters: dict[str, list[str]] = {}
    if source.is_dir():
        part = source.name
        for png in source.glob("*/*/*.png"):
            characters.setdefault(f"{part}/{png.parent.parent.name}/{png.parent.name}", []).append(str(png))
    else:
        try:
            with zipfile.ZipFile(source) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"'{source}' is not a readable zip ({exc}): replace it with the original "
                            f"{source.name}") from None
        for name in names:
            pieces = name.split("/")
            if len(pieces) == 4 and pieces[3].endswith(".png"):
                characters.setdefault("/".join(pieces[:3]), []).append(name)
    if not characters:
        raise DataError(f"'{source}' holds no Omniglot images (expected <Alphabet>/character<NN>/*.png "
                        f"under {source.stem}/)")
    for name, files in characters.items():
        if len(files) != DRAWINGS_PER_CHARACTER:
            raise DataError(f"character '{name}' in '{source}' has {len(files)} drawings, expected "
                            f"{DRAWINGS_PER_CHARACTER} (partial extraction or damaged zip?): restore the original files")
        files.sort()
    return dict(sorted(characters.items()))


def _fingerprint(sources: dict[str, Path], characters: dict[str, list[str]]) -> str:
    digest = hashlib.sha256()
    for part, source in sources.items():
        size = source.stat().st_size if source.is_file() else 0
        digest.update(f"{part}:{source.suffix}:{size}".encode())
    for name in characters:
        digest.update(name.encode())
    return digest.hexdigest()[:16]


# ---- decoding and caching ------------------------------------------------------------------------------------
def _decode(data: bytes, where: str, size: int, resize: str = "lanczos") -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        if resize == "binary_nearest":  # what PIL does for resize(LANCZOS) on a mode-"1" image, made explicit
            image = image.convert("1").resize((size, size), Image.NEAREST).convert("L")
        else:
            image = image.convert("L").resize((size, size), Image.LANCZOS)
    except Exception as exc:  # PIL raises a zoo of types for broken files
        raise DataError(f"cannot decode '{where}' ({type(exc).__name__}): the file is corrupt; "
                        f"restore the original Omniglot files") from None
    return 255 - np.asarray(image, dtype=np.uint8)  # ink (black in the PNGs) becomes 1


def decode_images(sources: dict[str, Path], characters: dict[str, list[str]], size: int,
                  resize: str = "lanczos") -> torch.Tensor:
    """uint8 [N, 1, size, size], characters in the given order, 20 drawings each."""
    out = np.empty((len(characters) * DRAWINGS_PER_CHARACTER, 1, size, size), dtype=np.uint8)
    row = 0
    for part, source in sources.items():
        names = [name for name in characters if name.startswith(part + "/")]
        archive = zipfile.ZipFile(source) if source.is_file() else None
        try:
            for name in names:
                for member in characters[name]:
                    try:
                        data = archive.read(member) if archive else Path(member).read_bytes()
                    except (zipfile.BadZipFile, OSError, KeyError) as exc:
                        raise DataError(f"cannot read '{member}' from '{source}' ({exc}): restore the original "
                                        f"Omniglot files") from None
                    out[row, 0] = _decode(data, f"{source}:{member}" if archive else member, size, resize)
                    row += 1
        finally:
            if archive:
                archive.close()
    return torch.from_numpy(out)


def _cache_dir(root: Path, cache_dir) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    # Permission bits, not os.access: as root, os.access says yes even for a directory marked read-only.
    if os.access(root, os.W_OK) and root.stat().st_mode & 0o222:
        return root
    return Path.home() / ".cache" / "maml_runner" / "omniglot"


class OmniglotImages:
    """All decoded images (uint8 [N, 1, S, S]), their character ids and the character names."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str]):
        self.images, self.labels, self.names = images, labels, names

    @property
    def num_characters(self) -> int:
        return len(self.names)


def load_omniglot(root, image_size: int = 28, cache_dir=None, download: bool = False,
                  resize: str = "lanczos") -> OmniglotImages:
    """Decoded Omniglot, from the tensor cache when it matches the source files, else decoded and cached."""
    if resize not in RESIZE_MODES:
        raise UserError(f"dataset.image_resize={resize!r} is not allowed; use one of {', '.join(RESIZE_MODES)}")
    root = Path(root).expanduser()
    sources = locate_omniglot(root, download)
    characters = _character_files(sources[PARTS[0]]) | _character_files(sources[PARTS[1]])
    mode = "" if resize == "lanczos" else f"{resize}_"  # the lanczos cache keeps its earlier name
    name = f"omniglot_{image_size}px_{mode}{_fingerprint(sources, characters)}.pt"
    cache = _cache_dir(root, cache_dir) / name
    images = None
    # A cache someone built beside a read-only dataset (a shared data folder) is read, never replaced or deleted.
    candidates = [cache] if cache.is_file() else [root / name] if cache_dir is None else []
    for candidate in [c for c in candidates if c.is_file()]:
        try:
            images = torch.load(candidate, weights_only=True)["images"]
            if images.shape[0] != len(characters) * DRAWINGS_PER_CHARACTER:
                raise ValueError("image count differs")
            break
        except Exception as exc:
            log.warning("not using the Omniglot cache %s (%s)", candidate, type(exc).__name__)
            if candidate == cache:
                cache.unlink(missing_ok=True)
            images = None
    if images is None:
        log.info("decoding %d Omniglot images to %dx%d (once; cached at %s)",
                 len(characters) * DRAWINGS_PER_CHARACTER, image_size, image_size, cache)
        images = decode_images(sources, characters, image_size, resize)
        buffer = io.BytesIO()
        torch.save({"images": images}, buffer)
        try:
            atomic_write(cache, lambda handle: handle.write(buffer.getvalue()))
        except UserError as exc:  # an unwritable cache only costs decoding time next run
            log.warning("could not write the Omniglot cache: %s", exc)
    labels = torch.arange(len(characters)).repeat_interleave(DRAWINGS_PER_CHARACTER)
    return OmniglotImages(images, labels, list(characters))


# ---- split -----------------------------------------------------------------------------------------------------
def split_characters(num_characters: int, split, seed: int) -> dict[str, np.ndarray]:
    """Character ids per partition from one seeded shuffle (Finn et al.: 1100 / 100 / 423 of 1623). A validation
    size of 0 (supervised-reptile's 1200 / 0 / 423: no validation set) gives an empty validation partition.

    A smaller dataset (a test fixture) gets the same proportions, at least one character per non-empty partition.
    """
    sizes = [int(s) for s in split]
    if sum(sizes) != num_characters:
        scaled = [0 if s == 0 else max(1, int(round(s * num_characters / sum(sizes)))) for s in sizes]
        scaled[0] = num_characters - sum(scaled[1:])
        if scaled[0] < 1:
            raise DataError(f"Omniglot under dataset.root has only {num_characters} characters; need at least "
                            f"{len(sizes)} for the train/validation/test split")
        sizes = scaled
    order = np.random.RandomState(seed).permutation(num_characters)
    bounds = np.cumsum([0, *sizes])
    return {name: np.sort(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(SPLITS)}


def write_split(path, names: list[str], split: dict[str, np.ndarray], seed: int) -> Path:
    payload = {"split_seed": seed, **{part: [names[i] for i in ids] for part, ids in split.items()}}
    return atomic_write_text(path, json.dumps(payload, indent=1))


# ---- episodes ----------------------------------------------------------------------------------------------
def check_ink(dataset_cfg) -> int:
    """`dataset.ink`: 1 (the runner's default and cbfinn/maml's `1 - x/255`: ink 1 on a background of 0) or 0 (the
    PNGs' own polarity, ink 0 on a background of 1, as openai/supervised-reptile and MAML++'s loaders read them)."""
    ink = dataset_cfg.get("ink", 1)
    check_value("dataset.ink", ink, INK)  # the schema's range, for configs built without it
    return int(ink)


class CharacterImages(torch.utils.data.Dataset):
    """The images of some characters, float in [0, 1]; label = character id. The cache holds ink = 255; `ink=0`
    inverts (background 1)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ink: int = 1):
        self.images = images.float().div_(255.0)
        if ink == 0:
            self.images = self.images.neg_().add_(1.0)
        self.labels = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


class ClassRotation:
    """Task transform: rotate all images of a class by one multiple of 90 degrees, drawn per class and task.

    Replaces learn2learn 0.2.0's RandomClassRotation, whose lambda binds the loop variable late (every class of a
    task ends up with the last class's rotation) and which goes through slow PIL/affine rotation.
    """

    def __init__(self, dataset, degrees):
        self.dataset = dataset
        self.quarter_turns = [int(d) // 90 for d in degrees]

    @staticmethod
    def _rotate(k: int):
        return lambda item: (torch.rot90(item[0], k, dims=(-2, -1)), item[1])

    def __call__(self, task_description):
        turns: dict[int, int] = {}
        for description in task_description:
            label = self.dataset.indices_to_labels[description.index]
            if label not in turns:
                turns[label] = random.choice(self.quarter_turns)
            if turns[label]:
                description.transforms.append(self._rotate(turns[label]))
        return task_description


class OmniglotTasks(EpisodeSource):
    """N-way K-shot tasks over one partition of the characters."""

    task_type = "classification"

    def __init__(self, images: CharacterImages, ways: int, shots: int, query_shots: int, degrees=(0, 90, 180, 270)):
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        labels_to_indices: dict[int, list[int]] = {}
        for index, label in enumerate(images.labels):
            labels_to_indices.setdefault(label, []).append(index)
        self.num_classes = len(labels_to_indices)
        self.meta_dataset = l2l.data.MetaDataset(images, labels_to_indices=labels_to_indices)
        transforms = [
            l2l.data.transforms.NWays(self.meta_dataset, ways),
            l2l.data.transforms.KShots(self.meta_dataset, shots + query_shots),
            l2l.data.transforms.LoadData(self.meta_dataset),
            ClassRotation(self.meta_dataset, degrees),
            l2l.data.transforms.RemapLabels(self.meta_dataset),
            l2l.data.transforms.ConsecutiveLabels(self.meta_dataset),
        ]
        self.task_dataset = l2l.data.TaskDataset(self.meta_dataset, task_transforms=transforms, num_tasks=-1)
        self.split_info: tuple | None = None  # (names, split, seed) for write_split
        # Pre-training baseline: every (character, rotation) is one class, as rotations are classes in the tasks.
        self.images = images
        self.quarter_turns = [int(d) // 90 for d in degrees]
        self.num_pooled_classes = self.num_classes * len(self.quarter_turns)
        self._class_of_label = {label: i for i, label in enumerate(sorted(labels_to_indices))}

    def pooled_batch(self, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """As many images as `num_tasks` tasks hold, drawn uniformly, each randomly rotated; global labels."""
        n = num_tasks * self.ways * (self.shots + self.query_shots)
        indices = torch.randint(len(self.images), (n,))
        turn_ids = torch.randint(len(self.quarter_turns), (n,))
        x = self.images.images[indices].clone()
        for turn_id, k in enumerate(self.quarter_turns):
            chosen = turn_ids == turn_id
            if k and bool(chosen.any()):
                x[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        classes = torch.tensor([self._class_of_label[self.images.labels[i]] for i in indices.tolist()])
        return x, classes * len(self.quarter_turns) + turn_ids

    def sample(self) -> Task:
        x, y = self.task_dataset.sample()
        # ConsecutiveLabels sorts by label; a stable sort keeps that and makes the grouping explicit.
        order = torch.argsort(y, stable=True)
        per_class = self.shots + self.query_shots
        x = x[order].view(self.ways, per_class, *x.shape[1:])
        y = y[order].view(self.ways, per_class)
        k = self.shots
        return Task(x[:, :k].reshape(-1, *x.shape[2:]), y[:, :k].reshape(-1),
                    x[:, k:].reshape(-1, *x.shape[2:]), y[:, k:].reshape(-1))

    def write_split(self, path) -> Path | None:
        return write_split(path, *self.split_info) if self.split_info else None


def rotations_as_classes(images: torch.Tensor, labels: torch.Tensor, degrees) -> tuple[torch.Tensor, torch.Tensor]:
    """Every character in every rotation of `degrees` as a class of its own (supervised-reptile's `augment_dataset`):
    label `character * len(degrees) + i` holds the drawings turned by `degrees[i]`. Tasks then draw classes from the
    enlarged set, so one task may hold a character twice, in two rotations, as two classes."""
    turns = [int(d) // 90 for d in degrees]
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in turns])
    classes = torch.cat([labels * len(turns) + i for i in range(len(turns))])
    return rotated, classes


def eval_query_shots(dataset_cfg) -> int:
    """Query examples per class in validation and test tasks: `dataset.eval_query_shots`, null = query_shots."""
    value = dataset_cfg.get("eval_query_shots")
    return int(dataset_cfg.query_shots if value is None else value)


def check_task_shape(dataset_cfg) -> None:
    """Checks that need no data: positive sizes, at most 20 drawings per class and task."""
    for key in ("ways", "shots", "query_shots"):
        value = int(dataset_cfg[key])
        if value <= 0:
            raise UserError(f"dataset.{key}={value} must be a positive integer")
    shots = int(dataset_cfg.shots)
    for key, query in (("query_shots", int(dataset_cfg.query_shots)),
                       ("eval_query_shots", eval_query_shots(dataset_cfg))):
        if shots + query > DRAWINGS_PER_CHARACTER:
            raise UserError(f"dataset.shots + dataset.{key} = {shots} + {query} = {shots + query} exceeds the "
                            f"{DRAWINGS_PER_CHARACTER} drawings per Omniglot character")


def check_ways(dataset_cfg, split_sizes: dict[str, int]) -> None:
    split_sizes = {name: size for name, size in split_sizes.items() if size > 0}  # an empty validation is no split
    smallest = min(split_sizes, key=split_sizes.get)
    if int(dataset_cfg.ways) > split_sizes[smallest]:
        raise DataError(f"dataset.ways={int(dataset_cfg.ways)} exceeds the {split_sizes[smallest]} characters of the "
                        f"{smallest} split; allowed: 1..{split_sizes[smallest]}")


def build_omniglot(dataset_cfg) -> dict[str, OmniglotTasks]:
    """Episode sources for the train / validation / test characters (no "validation" entry when dataset.split's
    validation size is 0)."""
    check_task_shape(dataset_cfg)
    ink = check_ink(dataset_cfg)
    as_classes = dataset_cfg.get("rotations_as_classes", False)
    check_value("dataset.rotations_as_classes", as_classes, BOOL)
    data = load_omniglot(dataset_cfg.root, int(dataset_cfg.get("image_size", 28)), dataset_cfg.get("cache_dir"),
                         bool(dataset_cfg.get("download", False)), str(dataset_cfg.get("image_resize", "lanczos")))
    seed = int(dataset_cfg.get("split_seed", 1))
    sizes = check_omniglot_split(dataset_cfg.get("split", (1100, 100, 423)))
    split = split_characters(data.num_characters, sizes, seed)
    check_ways(dataset_cfg, {name: len(ids) for name, ids in split.items()})
    degrees = tuple(dataset_cfg.get("rotations", (0, 90, 180, 270)))
    eval_degrees = dataset_cfg.get("eval_rotations")
    eval_degrees = degrees if eval_degrees is None else tuple(eval_degrees)  # MAML++/Reptile: test classes unrotated
    sources = {}
    for name, ids in split.items():
        if len(ids) == 0:  # dataset.split=[..., 0, ...]: no validation source; the trainer then validates nothing
            continue
        mask = torch.zeros(data.num_characters, dtype=torch.bool)
        mask[torch.as_tensor(ids)] = True
        keep = mask[data.labels]
        split_images, split_labels = data.images[keep], data.labels[keep]
        split_degrees = degrees if name == "train" else eval_degrees
        if name == "train" and as_classes:
            split_images, split_labels = rotations_as_classes(split_images, split_labels, degrees)
            split_degrees = (0,)  # the rotation is part of the class now
        images = CharacterImages(split_images, split_labels, ink)
        query = int(dataset_cfg.query_shots) if name == "train" else eval_query_shots(dataset_cfg)
        sources[name] = OmniglotTasks(images, int(dataset_cfg.ways), int(dataset_cfg.shots), query, split_degrees)
        sources[name].split_info = (data.names, split, seed)
    return sources
