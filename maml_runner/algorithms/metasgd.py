"""Meta-SGD (Li et al. 2017): every parameter has its own inner learning rate, learned with the initialization
(learn2learn `MetaSGD`); the rates start at `algorithm.inner_lr`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import learn2learn as l2l
import torch

from ..data.base import Task
from ..schema import OPTIONAL_POSITIVE_FLOAT, required
from .base import MetaAlgorithm
from .maml import MAML


class MetaSGD(MetaAlgorithm):
    @dataclass
    class Config(MAML.Config):
        rate_outer_lr: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)

    name = "metasgd"

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.first_order = bool(cfg.get("first_order", False))
        self.meta_sgd = l2l.algorithms.MetaSGD(model, lr=float(cfg.inner_lr), first_order=self.first_order)

    def adapt(self, task: Task, steps: int, iteration=None):
        learner = self.meta_sgd.clone()
        first_order = iteration is None or self.first_order
        for _ in range(steps):
            learner.adapt(self.loss_fn(learner(task.support_x), task.support_y), first_order=first_order)
        return learner

    def learned_rate_parameters(self):
        return list(self.meta_sgd.lrs)

    def extra_scalars(self) -> dict[str, float]:
        with torch.no_grad():
            rates = torch.cat([lr.flatten() for lr in self.meta_sgd.lrs])
        return {"inner_lr_mean": rates.mean().item(), "inner_lr_min": rates.min().item(),
                "inner_lr_max": rates.max().item()}
