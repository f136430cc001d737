"""MAML (Finn et al. 2017) through learn2learn's `MAML` wrapper; `first_order=true` drops second derivatives."""
from __future__ import annotations

import learn2learn as l2l

from ..data.base import Task
from .base import MetaAlgorithm


class MAML(MetaAlgorithm):
    name = "maml"

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.first_order = bool(cfg.get("first_order", False))
        # `model` stays registered through the wrapper: its parameters are the meta-parameters.
        self.maml = l2l.algorithms.MAML(model, lr=float(cfg.inner_lr), first_order=self.first_order)

    def use_first_order(self, iteration: int | None) -> bool:
        return iteration is None or self.first_order

    def adapt(self, task: Task, steps: int, iteration=None):
        learner = self.maml.clone(first_order=self.use_first_order(iteration))
        for _ in range(steps):
            learner.adapt(self.loss_fn(learner(task.support_x), task.support_y))
        return learner
