"""Sinusoid regression tasks (Finn et al. 2017): y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
from __future__ import annotations

import math
import random

import torch

from .base import EpisodeSource, Task


class SinusoidTasks(EpisodeSource):
    task_type = "regression"

    def __init__(self, shots: int, query_shots: int, amplitude=(0.1, 5.0), phase=(0.0, math.pi),
                 x_range=(-5.0, 5.0)):
        self.shots, self.query_shots = int(shots), int(query_shots)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def sample_function(self) -> tuple[float, float]:
        return random.uniform(*self.amplitude), random.uniform(*self.phase)

    def sample(self) -> Task:
        amplitude, phase = self.sample_function()
        lo, hi = self.x_range
        # x drawn through `random` so that one seeded stream (as for learn2learn) fixes the whole task.
        n = self.shots + self.query_shots
        x = torch.tensor([random.uniform(lo, hi) for _ in range(n)], dtype=torch.float32).unsqueeze(1)
        y = amplitude * torch.sin(x - phase)
        return Task(x[: self.shots], y[: self.shots], x[self.shots:], y[self.shots:])
