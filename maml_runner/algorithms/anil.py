"""ANIL (Raghu et al. 2020): the inner loop adapts only the head; the body is learned in the outer loop only.

The body's features are computed once per task (they do not change during adaptation), which is also what
makes ANIL cheap. The model must expose `body` and `head` (every model in `models.py` does).
"""
from __future__ import annotations

import learn2learn as l2l
from torch import nn

from ..data.base import Task
from ..errors import UserError
from .base import MetaAlgorithm
from .maml import MAML


class ANIL(MetaAlgorithm):
    Config = MAML.Config  # inner_steps, inner_lr (of the head), outer_lr, first_order
    name = "anil"
    honours_outer_loop_only = True  # only the head is adapted

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        if not (hasattr(model, "body") and hasattr(model, "head")):
            raise UserError(f"algorithm=anil needs a model with body/head; {type(model).__name__} has none")
        self.first_order = bool(cfg.get("first_order", False))
        self.head = l2l.algorithms.MAML(model.head, lr=float(cfg.inner_lr), first_order=self.first_order)

    def adapt(self, task: Task, steps: int, iteration=None):
        body = self.model.body
        head = self.head.clone(first_order=iteration is None or self.first_order)
        support = body(task.support_x)
        for _ in range(steps):
            head.adapt(self.loss_fn(head(support), task.support_y))
        return HeadAdapted(body, head)


class HeadAdapted(nn.Module):
    """The shared body followed by a task-adapted head."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x))
