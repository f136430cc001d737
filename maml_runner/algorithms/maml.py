"""MAML (Finn et al. 2017) through learn2learn's `MAML` wrapper; `first_order=true` drops second derivatives.

Training steps may instead adapt the whole meta-batch at once (algorithms/vectorized.py, hardware.vectorize):
same meta-objective and meta-gradient, one pass over the batch instead of one learn2learn clone per task.
"""
from __future__ import annotations

from dataclasses import dataclass

import learn2learn as l2l
import torch

from ..data.base import Task, TaskBatch
from ..grouped_conv import second_order_step
from ..models import outer_loop_only
from ..schema import BOOL, POSITIVE_FLOAT, POSITIVE_INT, AlgorithmConfig, required
from .base import MetaAlgorithm
from .inner_update import inner_update, set_parameters
from .vectorized import adapt_and_query, train_step_in_chunks, use_vectorized


class MAML(MetaAlgorithm):
    @dataclass
    class Config(AlgorithmConfig):
        inner_steps: int = required(POSITIVE_INT)
        inner_lr: float = required(POSITIVE_FLOAT)
        outer_lr: float = required(POSITIVE_FLOAT)
        first_order: bool = required(BOOL)

    name = "maml"
    honours_outer_loop_only = True
    vectorize = "auto"  # hardware.vectorize (set by build_algorithm)

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.first_order = bool(cfg.get("first_order", False))
        # `model` stays registered through the wrapper: its parameters are the meta-parameters.
        self.maml = l2l.algorithms.MAML(model, lr=float(cfg.inner_lr), first_order=self.first_order)
        # model.bn_adapted=false: batch-norm parameters get outer-loop gradients only (Finn's code).
        frozen = outer_loop_only(model)
        self.adapted = [name for name, _ in model.named_parameters() if name not in frozen]

    def use_first_order(self, iteration: int | None) -> bool:
        return iteration is None or self.first_order

    def adapt(self, task: Task, steps: int, iteration=None):
        first_order = self.use_first_order(iteration)
        learner = self.maml.clone(first_order=first_order)
        with second_order_step(not first_order):
            for _ in range(steps):
                loss = self.loss_fn(learner(task.support_x), task.support_y)
                params = dict(learner.module.named_parameters())
                # model.bn_adapted=false: the outer-loop-only parameters get no gradient and no update here.
                grads = torch.autograd.grad(loss, [params[name] for name in self.adapted],
                                            retain_graph=not first_order, create_graph=not first_order)
                set_parameters(learner.module, inner_update(params, dict(zip(self.adapted, grads)), self.maml.lr))
        return learner

    def vectorized_for(self, tasks) -> bool:
        """Whether this meta-batch takes the vectorized path. Subclasses that change how a task is adapted or
        scored keep the per-task loop, which runs their code."""
        unchanged = type(self).adapt is MAML.adapt and type(self).query_loss is MetaAlgorithm.query_loss
        return unchanged and isinstance(tasks, TaskBatch) and use_vectorized(self.vectorize, self.model, tasks)

    def train_step(self, tasks: TaskBatch, iteration: int) -> dict[str, float]:
        if not self.vectorized_for(tasks):
            return super().train_step(tasks, iteration)
        return train_step_in_chunks(self, tasks, iteration, lambda chunk: adapt_and_query(
            self.model, chunk, float(self.maml.lr), int(self.cfg.inner_steps), self.use_first_order(iteration),
            self.loss_fn, adapted=self.adapted), second_order=not self.use_first_order(iteration))
