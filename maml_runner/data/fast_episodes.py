"""Fast episode sampling for learn2learn TaskDataset sources: one gather per meta-batch from the cached images.

learn2learn builds a task by running its task transforms (NWays, KShots, ... : which samples, which rotation,
which label) and then loading, rotating and collating every sample in Python. `CachedEpisodes` keeps the first
half exactly (the same transform objects, so the same `random` calls and the same task distribution: the same
tasks for the same seed) and replaces the second half by tensor operations on the whole meta-batch: one
indexing of the pre-decoded image tensor, then `torch.rot90` per group of samples sharing a rotation.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from . import l2l_compat as l2l
from .base import EpisodeSource, Task, TaskBatch

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The source cannot be sampled by `CachedEpisodes`; the reason is the message."""


class CachedEpisodes(EpisodeSource):
    """Same tasks as `source.sample()` (an Omniglot-style learn2learn source), sampled a meta-batch at a time.

    Requires: `source.task_dataset` (a learn2learn TaskDataset resampling every time, num_tasks=-1) whose
    transforms are selecting ones, LoadData, RemapLabels and a class rotation with a `_rotate(k)` hook; the
    dataset behind it exposing all images as one tensor `images`; `ways`, `shots`, `query_shots`. What it reads
    of learn2learn's insides goes through `l2l_compat`, which refuses a learn2learn version it was not checked with.
    """

    def __init__(self, source):
        self.source = source
        task_dataset = getattr(source, "task_dataset", None)
        if task_dataset is None or not hasattr(source, "ways"):
            raise Unsupported(f"{type(source).__name__} is not a learn2learn TaskDataset source")
        l2l.check_version()
        if not l2l.resamples_every_time(task_dataset):
            raise Unsupported("the TaskDataset caches a fixed number of task descriptions")
        images = l2l.dataset_images(task_dataset)
        if not isinstance(images, torch.Tensor):
            raise Unsupported("the dataset does not hold its images as one tensor")
        self.images = images
        self.images_np = images.numpy()  # shares memory with the tensor
        self.task_dataset = task_dataset
        self.indices_to_labels = l2l.indices_to_labels(task_dataset)
        self.ways, self.shots, self.query_shots = int(source.ways), int(source.shots), int(source.query_shots)
        self.transforms = [self._plan_transform(t) for t in l2l.task_transforms(task_dataset)]
        self.transforms = [t for t in self.transforms if t is not None]
        self.task_type = source.task_type

    @staticmethod
    def _plan_transform(transform):
        if isinstance(transform, l2l.SELECTING + l2l.RELABELLING):
            return transform
        if isinstance(transform, l2l.LOADING):
            return None  # loading is the one gather in `sample_batch`
        if l2l.has_rotate_hook(transform):
            return l2l.planned_rotation(transform)
        raise Unsupported(f"task transform {type(transform).__name__} is not known to the fast sampler")

    def pooled_batch(self, num_tasks: int):
        # Defined on EpisodeSource, so __getattr__ would not forward it: the source knows the global labels.
        return self.source.pooled_batch(num_tasks)

    def __getattr__(self, name):
        # Everything else (write_split, state_dict, ...) is the wrapped source's.
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def _plan(self) -> tuple[list[int], list[int], list[int]]:
        """Dataset indices, quarter turns and labels of one task, in the order the reference `sample` returns."""
        # TaskDataset.sample draws an index first, even when it resamples every time: same random calls.
        l2l.draw_task_index(self.task_dataset)
        description = None
        for transform in self.transforms:
            description = transform(description)
        indices, turns, labels = [], [], []
        for index, steps in l2l.samples(description):
            k, label = 0, self.indices_to_labels[index]
            for step in steps:
                if isinstance(step, l2l.QuarterTurns):
                    k += step.k
                else:  # RemapLabels: maps the (x, y) pair's label
                    label = l2l.relabel(step, label)
            indices.append(index)
            turns.append(k % 4)
            labels.append(label)
        order = sorted(range(len(labels)), key=labels.__getitem__)  # stable, as the reference's argsort
        return [indices[i] for i in order], [turns[i] for i in order], [labels[i] for i in order]

    def sample_batch(self, num_tasks: int) -> TaskBatch:
        plans = [self._plan() for _ in range(num_tasks)]
        indices = np.array([p[0] for p in plans])
        turns = np.array([p[1] for p in plans])
        labels = torch.tensor([p[2] for p in plans])
        # numpy, not torch: these small copies are single-threaded there; torch's intra-op threads made them
        # ~100x slower on a loaded 2-core machine. Same values (a gather and exact quarter turns).
        x = self.images_np[indices]  # [tasks, samples, C, H, W]
        for k in (1, 2, 3):
            chosen = turns == k
            if chosen.any():
                x[chosen] = np.rot90(x[chosen], k, axes=(-2, -1))
        x = torch.from_numpy(x)
        per_class, k = self.shots + self.query_shots, self.shots
        x = x.view(num_tasks, self.ways, per_class, *x.shape[2:])
        y = labels.view(num_tasks, self.ways, per_class)
        return TaskBatch(x[:, :, :k].reshape(num_tasks, -1, *x.shape[3:]), y[:, :, :k].reshape(num_tasks, -1),
                         x[:, :, k:].reshape(num_tasks, -1, *x.shape[3:]), y[:, :, k:].reshape(num_tasks, -1))

    def sample(self) -> Task:
        return self.sample_batch(1)[0]


def cached_episodes(source: EpisodeSource) -> EpisodeSource:
    """`CachedEpisodes(source)` where the source allows it, else the source itself (sampled task by task)."""
    try:
        return CachedEpisodes(source)
    except Unsupported as reason:
        log.debug("task-by-task sampling for %s: %s", type(source).__name__, reason)
        return source
