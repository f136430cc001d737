"""What every episode source provides: tasks as (support_x, support_y, query_x, query_y) tensors."""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import numpy as np
import torch


class Task(NamedTuple):
    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def to(self, device) -> "Task":
        return Task(*(t.to(device, non_blocking=True) for t in self))


class TaskBatch:
    """A meta-batch of equally shaped tasks as stacked tensors (leading task dimension).

    Iterating yields one `Task` per task (views), so per-task algorithms treat it like a list of tasks while
    vectorized ones use the stacked tensors directly.
    """

    def __init__(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                 query_y: torch.Tensor):
        self.support_x, self.support_y, self.query_x, self.query_y = support_x, support_y, query_x, query_y

    @classmethod
    def stack(cls, tasks) -> "TaskBatch":
        return cls(*(torch.stack(field) for field in zip(*tasks)))

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def __getitem__(self, index: int) -> Task:
        return Task(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])

    def __iter__(self) -> Iterator[Task]:
        return (self[i] for i in range(len(self)))

    def slice(self, start: int, stop: int) -> "TaskBatch":
        return TaskBatch(self.support_x[start:stop], self.support_y[start:stop], self.query_x[start:stop],
                         self.query_y[start:stop])

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device, non_blocking=True) for t in
                           (self.support_x, self.support_y, self.query_x, self.query_y)))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block under fixed Python/NumPy/torch RNG seeds, then restore the caller's streams.

    learn2learn samples tasks with the global `random` module, so fixed task sets (validation, test) are drawn
    inside this block and do not disturb the training stream.
    """
    caller = _capture()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        _restore(caller)


class EpisodeSource(ABC):
    """Samples tasks of one split (train / validation / test)."""

    task_type: str = "classification"  # or "regression"

    @abstractmethod
    def sample(self) -> Task:
        """One task from the global RNG stream (learn2learn's convention)."""

    def sample_batch(self, num_tasks: int) -> TaskBatch:
        """`num_tasks` tasks, the same ones `num_tasks` calls of `sample` would give; sources may do it faster."""
        return TaskBatch.stack([self.sample() for _ in range(num_tasks)])

    def pooled_batch(self, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Supervised samples (x, y) pooled from `num_tasks` tasks (the pre-training baseline's data). Labels must
        mean the same thing in every task, so classification sources override this with global class labels."""
        if self.task_type != "regression":
            raise NotImplementedError(f"{type(self).__name__} has no global class labels to pool")
        tasks = [self.sample() for _ in range(num_tasks)]
        return (torch.cat([t.support_x for t in tasks] + [t.query_x for t in tasks]),
                torch.cat([t.support_y for t in tasks] + [t.query_y for t in tasks]))

    def fixed_tasks(self, num_tasks: int, seed: int) -> list[Task]:
        """The same `num_tasks` tasks for the same seed, independent of the global RNG state."""
        return list(self.iter_fixed_tasks(num_tasks, seed))

    def iter_fixed_tasks(self, num_tasks: int, seed: int) -> Iterator[Task]:
        """Like `fixed_tasks`, one task at a time (a 600-task 20-way test set need not sit in memory).

        The seeded stream is swapped in only while a task is drawn, so the caller's RNG streams are untouched.
        """
        with seeded_global_rng(seed):
            streams = _capture()
        for _ in range(num_tasks):
            caller = _capture()
            _restore(streams)
            task = self.sample()
            streams = _capture()
            _restore(caller)
            yield task


def _capture():
    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _restore(state) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.random.set_rng_state(state[2])
