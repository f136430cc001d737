"""The "pretrained" baseline of Finn et al. 2017: ordinary supervised training on samples pooled from all
training tasks, then, per test task, the same number of fine-tuning steps (plain SGD at `inner_lr`) as the
meta-learners get.

Classification: the body is trained with a classifier over all training classes (for Omniglot every character in
every rotation is a class); each test task gets a new zero-initialised `ways`-output head. Regression: one network
regresses the pooled points and is fine-tuned as it is.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..data.base import Task, TaskBatch
from ..errors import UserError
from ..schema import POSITIVE_FLOAT, AlgorithmConfig, required
from .base import MetaAlgorithm


class PooledBatch(TaskBatch):
    """Supervised samples (x, y) carried in the support fields of a TaskBatch (so the trainer moves them alike)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *_):
        super().__init__(x, y, x[:0], y[:0])

    def to(self, device) -> "PooledBatch":
        return PooledBatch(self.support_x.to(device, non_blocking=True), self.support_y.to(device, non_blocking=True))


class Pretrain(MetaAlgorithm):
    @dataclass
    class Config(AlgorithmConfig):  # no inner_steps: fine-tuning takes eval.inner_steps
        inner_lr: float = required(POSITIVE_FLOAT)
        outer_lr: float = required(POSITIVE_FLOAT)

    name = "pretrain"

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.classifier: nn.Module | None = None

    def bind_data(self, train_source) -> None:
        if self.task_type == "regression":
            return
        classes = getattr(train_source, "num_pooled_classes", None)
        if not classes:
            raise UserError(f"algorithm=pretrain needs a dataset whose tasks have global class labels; "
                            f"{type(train_source).__name__} has none")
        self.classifier = nn.Linear(self.model.head.in_features, int(classes))

    def next_batch(self, train_source, meta_batch_size: int) -> PooledBatch:
        # The same number of samples per iteration as the meta-learners see: meta-batch x task size.
        return PooledBatch(*train_source.pooled_batch(meta_batch_size))

    def train_step(self, batch: PooledBatch, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        x, y = batch.support_x, batch.support_y
        head = self.classifier if self.classifier is not None else self.model.head
        predictions = head(self.model.body(x))
        loss = self.loss_fn(predictions, y)
        loss.backward()
        return self.finish_step(loss.item(), self.metric(predictions, y), iteration)

    def needs_double_backward(self) -> bool:
        return False  # joint training; fine-tuning happens at evaluation only

    def adapt(self, task: Task, steps: int, iteration=None):
        model = self.model
        if self.task_type != "regression":  # a fresh head for this task's classes
            model = copy.deepcopy(self.model)
            nn.init.zeros_(model.head.weight)
            nn.init.zeros_(model.head.bias)
        return self.fine_tune(model, task, steps, float(self.cfg.inner_lr))
