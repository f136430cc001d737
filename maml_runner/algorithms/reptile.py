"""Reptile (Nichol et al. 2018): train a copy of the model on each task for k steps, then move the
initialization towards the adapted weights, theta <- theta + eps * mean_tasks(theta' - theta), with the meta step
size eps annealed linearly to 0 over training.

The inner loop trains on all of the task's data (support and query: Reptile has no query loss); evaluation adapts
on the support set with plain SGD (`eval_optimizer=sgd`, at `eval_inner_lr`) or with the training inner optimizer
(`eval_optimizer=inner`). `algorithm.meta_step_size` is eps; Reptile has no `outer_lr`.

`inner_optimizer_state=persistent` is openai/supervised-reptile's behaviour: only the model's trainable variables are
reset between tasks, so the inner Adam's moments and step count carry over across tasks and meta-iterations; its
evaluation starts every test task from that state and restores it afterwards. `fresh` gives every task a new
optimizer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..data.base import Task
from ..schema import (OPTIONAL_POSITIVE_FLOAT, POSITIVE_FLOAT, POSITIVE_INT, AlgorithmConfig, one_of, required)
from .base import MetaAlgorithm

log = logging.getLogger(__name__)


class Reptile(MetaAlgorithm):
    @dataclass
    class Config(AlgorithmConfig):  # no outer_lr: the outer step is meta_step_size
        inner_steps: int = required(POSITIVE_INT)
        inner_lr: float = required(POSITIVE_FLOAT)
        inner_optimizer: str = required(one_of("sgd", "adam"))
        inner_betas: List[float] = required()
        meta_step_size: float = required(POSITIVE_FLOAT)
        eval_inner_lr: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)
        inner_optimizer_state: str = required(one_of("fresh", "persistent"))
        eval_optimizer: str = required(one_of("sgd", "inner"))

    name = "reptile"

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.inner_optimizer = str(cfg.get("inner_optimizer", "sgd"))
        self.inner_betas = tuple(cfg.get("inner_betas", (0.0, 0.999)))
        self.eval_lr = float(cfg.get("eval_inner_lr") or cfg.inner_lr)
        self.persistent = str(cfg.get("inner_optimizer_state", "fresh")) == "persistent"
        self.eval_with_inner = str(cfg.get("eval_optimizer", "sgd")) == "inner"
        self.inner_state: dict | None = None  # the persistent inner optimizer's state_dict (None: not started)
        if int(cfg.inner_steps) == 1:
            # With one step, theta' - theta is the negative gradient of the task loss: the outer update is plain
            # SGD on the pooled loss (Nichol et al. 2018, section 5), i.e. the pretrain baseline.
            log.warning("reptile with algorithm.inner_steps=1 is joint training on pooled tasks (the pretrain "
                        "baseline), not meta-learning; use algorithm.inner_steps >= 2 (e.g. 10 on sinusoid)")

    def build_optimizer(self) -> None:
        # SGD with lr eps on the pseudo-gradient (theta - mean theta') is exactly the Reptile step.
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=float(self.cfg.meta_step_size))
        total = max(self.total_iterations, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda t: max(0.0, 1.0 - t / total))

    def adapt(self, task: Task, steps: int, iteration=None):
        if iteration is None and not self.eval_with_inner:  # evaluation: plain SGD on the support set
            return self.fine_tune(self.model, task, steps, self.eval_lr)
        data = None if iteration is None else \
            (torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y]))
        # Evaluation starts from the persistent state and leaves it as it was (supervised-reptile restores it).
        keep = self.persistent and iteration is not None
        return self.fine_tune(self.model, task, steps, float(self.cfg.inner_lr), self.inner_optimizer,
                              self.inner_betas, data=data, state=self.inner_state if self.persistent else None,
                              on_done=self._keep_state if keep else None)

    def _keep_state(self, optimizer: torch.optim.Optimizer) -> None:
        self.inner_state = optimizer.state_dict()

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "inner_state": self.inner_state}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.inner_state = state.get("inner_state")

    def train_step(self, tasks, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        initial = [p.detach().clone() for p in self.model.parameters()]
        adapted_sum = [torch.zeros_like(p) for p in initial]
        losses, accs = [], []
        for task in tasks:
            learner = self.adapt(task, int(self.cfg.inner_steps), iteration)
            with torch.no_grad():  # the adapted model on the task's query set (what the logs call train loss)
                predictions = learner(task.query_x)
                losses.append(self.report_loss_fn(predictions, task.query_y).item())
                accs.append(self.metric(predictions, task.query_y))
            for total, p in zip(adapted_sum, learner.parameters()):
                total += p.detach()
        for p, theta, total in zip(self.model.parameters(), initial, adapted_sum):
            p.grad = theta - total / len(tasks)
        return self.finish_step(sum(losses) / len(losses), sum(accs) / len(accs), iteration)

    def extra_scalars(self) -> dict[str, float]:
        return {"meta_step_size": self.optimizer.param_groups[0]["lr"]}
