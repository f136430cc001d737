"""Meta-SGD (Li et al. 2017): every parameter has its own inner learning rate, learned with the initialization
(learn2learn `MetaSGD` holds them, `meta_sgd.lrs`); the rates start at `algorithm.inner_lr`.

The inner step is algorithms/inner_update.py's with per-parameter rates; training steps may adapt the whole
meta-batch at once (algorithms/vectorized.py, hardware.vectorize), as MAML's do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import learn2learn as l2l
import torch

from ..data.base import Task, TaskBatch
from ..grouped_conv import second_order_step
from ..schema import OPTIONAL_POSITIVE_FLOAT, required
from .base import MetaAlgorithm
from .inner_update import Rate, inner_update, per_parameter_rates, set_parameters
from .maml import MAML
from .vectorized import adapt_and_query, train_step_in_chunks, use_vectorized


class MetaSGD(MetaAlgorithm):
    @dataclass
    class Config(MAML.Config):
        rate_outer_lr: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)

    name = "metasgd"
    vectorize = "auto"  # hardware.vectorize (set by build_algorithm)

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.first_order = bool(cfg.get("first_order", False))
        self.meta_sgd = l2l.algorithms.MetaSGD(model, lr=float(cfg.inner_lr), first_order=self.first_order)
        self.parameter_names = [name for name, _ in model.named_parameters()]  # the order of `meta_sgd.lrs`

    def use_first_order(self, iteration: int | None) -> bool:
        return iteration is None or self.first_order

    def inner_rate(self, lrs=None) -> Rate:
        """Per-parameter rates: `lrs` (a learner's clones of them) or the learned ones."""
        return per_parameter_rates(self.parameter_names, list(self.meta_sgd.lrs if lrs is None else lrs))

    def adapt(self, task: Task, steps: int, iteration=None):
        learner = self.meta_sgd.clone()
        first_order = self.use_first_order(iteration)
        rate = self.inner_rate(learner.lrs)
        with second_order_step(not first_order):
            for step in range(steps):
                loss = self.loss_fn(learner(task.support_x), task.support_y)
                params = dict(learner.module.named_parameters())
                grads = torch.autograd.grad(loss, list(params.values()), retain_graph=not first_order,
                                            create_graph=not first_order)
                set_parameters(learner.module, inner_update(params, dict(zip(params, grads)), rate, step))
        return learner

    def vectorized_for(self, tasks) -> bool:
        """Whether this meta-batch takes the vectorized path (a subclass changing adaptation keeps the loop)."""
        unchanged = type(self).adapt is MetaSGD.adapt and type(self).query_loss is MetaAlgorithm.query_loss
        return unchanged and isinstance(tasks, TaskBatch) and use_vectorized(self.vectorize, self.model, tasks)

    def train_step(self, tasks, iteration: int) -> dict[str, float]:
        if not self.vectorized_for(tasks):
            return super().train_step(tasks, iteration)
        return train_step_in_chunks(self, tasks, iteration, lambda chunk: adapt_and_query(
            self.model, chunk, self.inner_rate(), int(self.cfg.inner_steps), self.use_first_order(iteration),
            self.loss_fn), second_order=not self.use_first_order(iteration))

    def learned_rate_parameters(self):
        return list(self.meta_sgd.lrs)

    def extra_scalars(self) -> dict[str, float]:
        with torch.no_grad():
            rates = torch.cat([lr.flatten() for lr in self.meta_sgd.lrs])
        return {"inner_lr_mean": rates.mean().item(), "inner_lr_min": rates.min().item(),
                "inner_lr_max": rates.max().item()}
