"""Everything the fast episode sampler (fast_episodes.py) needs from learn2learn beyond its documented API, in one
place, for the learn2learn version it was written against.

`CachedEpisodes` replays learn2learn's own task sampling and so relies on how learn2learn 0.2.0 works inside:

  * `TaskDataset`: `.num_tasks` (-1: a new task every time), `.task_transforms`, `.dataset` (the MetaDataset),
    `len()`, and that `TaskDataset.sample()` first draws `random.randint(0, len - 1)` even when it resamples;
  * `MetaDataset`: `.dataset` (the wrapped dataset) and `.indices_to_labels`;
  * a task description: a list of `DataDescription`s with `.index` and `.transforms`, callables on an `(x, y)` pair;
  * which transform classes only choose samples (`NWays`, `KShots`, ...), which relabel (`RemapLabels`) and which
    loads (`LoadData`);
  * rotations that add one callable per sample through a `_rotate(k)` hook (omniglot.ClassRotation, in the way of
    learn2learn's RandomClassRotation).

Another learn2learn may change any of these without an error, only different tasks. So `check_version` stops with
one line when the installed learn2learn is not one this module was checked against (tests/test_fast_path.py
compares the fast sampler's tasks with learn2learn's own, task by task); after checking a new version that way,
add it to SUPPORTED_VERSIONS.
"""
from __future__ import annotations

import random

import learn2learn as l2l

from ..errors import UserError

SUPPORTED_VERSIONS = ("0.2.0",)

_transforms = l2l.data.transforms
# Transforms that only select samples (kept as they are), the one that relabels an (x, y) pair, the one that loads.
SELECTING = (_transforms.NWays, _transforms.KShots, _transforms.FusedNWaysKShots, _transforms.FilterLabels,
             _transforms.ConsecutiveLabels)
RELABELLING = (_transforms.RemapLabels,)
LOADING = (_transforms.LoadData,)


def check_version(installed: str | None = None) -> None:
    """Raise `UserError` (one line) unless learn2learn `installed` (default: the imported one) is supported."""
    installed = str(getattr(l2l, "__version__", "unknown")) if installed is None else installed
    if installed not in SUPPORTED_VERSIONS:
        raise UserError(f"learn2learn {installed} is installed, but maml-runner's episode sampler "
                        f"(maml_runner/data/l2l_compat.py) supports learn2learn {', '.join(SUPPORTED_VERSIONS)} "
                        f"only; install learn2learn=={SUPPORTED_VERSIONS[-1]} (scripts/setup_env.sh does)")


# ---- TaskDataset / MetaDataset -----------------------------------------------------------------------------
def resamples_every_time(task_dataset) -> bool:
    """True when the TaskDataset draws a new task description at every sample (num_tasks=-1), none cached."""
    return task_dataset.num_tasks == -1


def dataset_images(task_dataset):
    """The `images` attribute of the dataset the MetaDataset wraps (None if it has none)."""
    return getattr(task_dataset.dataset.dataset, "images", None)


def indices_to_labels(task_dataset) -> dict:
    """The MetaDataset's sample index -> label map."""
    return task_dataset.dataset.indices_to_labels


def task_transforms(task_dataset) -> list:
    return list(task_dataset.task_transforms)


def draw_task_index(task_dataset) -> None:
    """The draw `TaskDataset.sample()` makes before building a task (kept: the same `random` calls, the same tasks)."""
    random.randint(0, len(task_dataset) - 1)


# ---- task descriptions -------------------------------------------------------------------------------------
def samples(description) -> list[tuple[int, list]]:
    """(dataset index, per-sample transforms) of each sample of a task description, in its order."""
    return [(data.index, data.transforms) for data in description]


def relabel(transform, label):
    """What a relabelling transform (RELABELLING) makes of `label`."""
    return transform((None, label))[1]


def has_rotate_hook(transform) -> bool:
    return callable(getattr(type(transform), "_rotate", None))


class QuarterTurns:
    """Marker left in a sample's transform list in place of a rotation: rotate by `k` quarter turns."""

    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = int(k)


def planned_rotation(rotation):
    """A copy of a rotation transform with a `_rotate(k)` hook that leaves `QuarterTurns` markers instead of
    closures.

    It subclasses the transform's own class, so drawing the rotations (and the random calls) stays its code.
    """
    planned = type(f"Planned{type(rotation).__name__}", (type(rotation),),
                   {"_rotate": staticmethod(QuarterTurns)})
    clone = planned.__new__(planned)
    clone.__dict__.update(rotation.__dict__)
    return clone
