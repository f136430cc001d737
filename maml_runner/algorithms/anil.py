"""ANIL (Raghu et al. 2020): the inner loop adapts only the head; the body is learned in the outer loop only.

The body's features are computed once per task (they do not change during adaptation), which is also what
makes ANIL cheap. The model must expose `body` and `head` (every model in `models.py` does). Training steps may
adapt the whole meta-batch's heads at once, on features computed task-grouped (algorithms/vectorized.py,
hardware.vectorize), for models with a task-grouped forward.
"""
from __future__ import annotations

import learn2learn as l2l
import torch
from torch import nn

from ..data.base import Task, TaskBatch
from ..errors import UserError
from .base import MetaAlgorithm
from .inner_update import inner_update, set_parameters
from .maml import MAML
from .vectorized import adapt_head_and_query_grouped, grouped_model_reason, train_step_in_chunks, use_vectorized


class ANIL(MetaAlgorithm):
    Config = MAML.Config  # inner_steps, inner_lr (of the head), outer_lr, first_order
    name = "anil"
    honours_outer_loop_only = True  # only the head is adapted
    vectorize = "auto"  # hardware.vectorize (set by build_algorithm)

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        if not (hasattr(model, "body") and hasattr(model, "head")):
            raise UserError(f"algorithm=anil needs a model with body/head; {type(model).__name__} has none")
        self.first_order = bool(cfg.get("first_order", False))
        self.head = l2l.algorithms.MAML(model.head, lr=float(cfg.inner_lr), first_order=self.first_order)

    def use_first_order(self, iteration: int | None) -> bool:
        return iteration is None or self.first_order

    def adapt(self, task: Task, steps: int, iteration=None):
        body = self.model.body
        first_order = self.use_first_order(iteration)
        head = self.head.clone(first_order=first_order)
        support = body(task.support_x)
        for step in range(steps):
            loss = self.loss_fn(head(support), task.support_y)
            params = dict(head.module.named_parameters())
            grads = torch.autograd.grad(loss, list(params.values()), retain_graph=not first_order,
                                        create_graph=not first_order)
            set_parameters(head.module, inner_update(params, dict(zip(params, grads)), self.head.lr, step))
        return HeadAdapted(body, head)

    def vectorized_for(self, tasks) -> bool:
        """Whether this meta-batch takes the task-grouped path (models with a grouped forward only; a subclass
        changing adaptation keeps the loop)."""
        unchanged = type(self).adapt is ANIL.adapt and type(self).query_loss is MetaAlgorithm.query_loss
        return unchanged and isinstance(tasks, TaskBatch) and use_vectorized(self.vectorize, self.model, tasks) \
            and grouped_model_reason(self.model) is None

    def train_step(self, tasks, iteration: int) -> dict[str, float]:
        if not self.vectorized_for(tasks):
            return super().train_step(tasks, iteration)
        return train_step_in_chunks(self, tasks, iteration, lambda chunk: adapt_head_and_query_grouped(
            self.model, chunk, float(self.head.lr), int(self.cfg.inner_steps), self.use_first_order(iteration),
            self.loss_fn), second_order=False)  # second order in the head only: the body has no double backward


class HeadAdapted(nn.Module):
    """The shared body followed by a task-adapted head."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, x):
        return self.head(self.body(x))
