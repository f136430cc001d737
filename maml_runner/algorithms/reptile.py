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

`inner_batch_size` / `eval_inner_batch_size` (null: full batch) make each inner step use a mini-batch, as
supervised-reptile's `_mini_batches`: the task's examples are reshuffled at every pass and cut into consecutive
batches, a batch may span two passes (so a batch larger than the task repeats examples). Training shuffles with the
global torch RNG (saved in checkpoints: a resumed run draws the same batches); evaluation with a generator seeded
afresh for every task, so testing a checkpoint twice gives the same numbers.

With a fresh inner optimizer (SGD, or Adam: its arithmetic is elementwise, vectorized._GroupedAdam), training steps
may run the meta-batch's inner loops at once (algorithms/vectorized.py, hardware.vectorize) for models with a
task-grouped forward, mini-batches included. A persistent state keeps the per-task loop: task t+1's inner loop
starts from task t's moments and step count, a sequential dependency that cannot be batched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional

import torch
from torch.func import vmap

from ..data.base import Task, TaskBatch
from ..schema import (OPTIONAL_POSITIVE_FLOAT, OPTIONAL_POSITIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, AlgorithmConfig,
                      one_of, required)
from .base import MetaAlgorithm
from .vectorized import fine_tune_grouped, grouped_model_reason, task_chunks, use_vectorized

log = logging.getLogger(__name__)

EVAL_BATCH_SEED = 0  # evaluation mini-batches: the same generator state for every test task (reproducible tests)


class Reptile(MetaAlgorithm):
    @dataclass
    class Config(AlgorithmConfig):  # no outer_lr: the outer step is meta_step_size
        inner_steps: int = required(POSITIVE_INT)
        inner_lr: float = required(POSITIVE_FLOAT)
        inner_optimizer: str = required(one_of("sgd", "adam"))
        inner_betas: List[float] = required()
        meta_step_size: float = required(POSITIVE_FLOAT)
        eval_inner_lr: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)
        inner_batch_size: Optional[int] = required(OPTIONAL_POSITIVE_INT)  # null: full-batch inner steps
        eval_inner_batch_size: Optional[int] = required(OPTIONAL_POSITIVE_INT)
        inner_optimizer_state: str = required(one_of("fresh", "persistent"))
        eval_optimizer: str = required(one_of("sgd", "inner"))

    name = "reptile"
    vectorize = "auto"  # hardware.vectorize (set by build_algorithm)

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.inner_optimizer = str(cfg.get("inner_optimizer", "sgd"))
        self.inner_betas = tuple(cfg.get("inner_betas", (0.0, 0.999)))
        self.eval_lr = float(cfg.get("eval_inner_lr") or cfg.inner_lr)
        self.persistent = str(cfg.get("inner_optimizer_state", "fresh")) == "persistent"
        self.eval_with_inner = str(cfg.get("eval_optimizer", "sgd")) == "inner"
        self.inner_state: dict | None = None  # the persistent inner optimizer's state_dict (None: not started)
        self.inner_batch_size = cfg.get("inner_batch_size")
        self.eval_inner_batch_size = cfg.get("eval_inner_batch_size")
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
        training = iteration is not None
        data = (torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])) if training \
            else (task.support_x, task.support_y)
        batches = self.mini_batches(len(data[1]), steps, training)
        if not training and not self.eval_with_inner:  # evaluation: plain SGD on the support set
            return self.fine_tune(self.model, task, steps, self.eval_lr, batches=batches)
        # Evaluation starts from the persistent state and leaves it as it was (supervised-reptile restores it).
        keep = self.persistent and training
        return self.fine_tune(self.model, task, steps, float(self.cfg.inner_lr), self.inner_optimizer,
                              self.inner_betas, data=data, state=self.inner_state if self.persistent else None,
                              on_done=self._keep_state if keep else None, batches=batches)

    def needs_double_backward(self) -> bool:
        return False  # the meta-step is theta' - theta: no gradient through the inner loop

    def mini_batches(self, examples: int, steps: int, training: bool) -> list[torch.Tensor] | None:
        """Row indices of each inner step's mini-batch (supervised-reptile's `_mini_batches`: consecutive batches of
        passes over the examples, each pass reshuffled); None for full-batch steps."""
        size = self.inner_batch_size if training else self.eval_inner_batch_size
        if size is None:
            return None
        size = int(size)
        generator = None if training else torch.Generator().manual_seed(EVAL_BATCH_SEED)
        passes = -(-steps * size // examples)
        order = torch.cat([torch.randperm(examples, generator=generator) for _ in range(passes)])
        return list(order[:steps * size].view(steps, size))

    def _keep_state(self, optimizer: torch.optim.Optimizer) -> None:
        self.inner_state = optimizer.state_dict()

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "inner_state": self.inner_state}

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self.inner_state = state.get("inner_state")

    def vectorized_for(self, tasks) -> bool:
        """Whether this meta-batch's inner loops run task-grouped: a fresh inner optimizer per task (SGD or Adam;
        a persistent optimizer state is kept by the per-task loop), a model with a grouped forward, and the
        per-task `adapt` and `mini_batches` not overridden."""
        return type(self).adapt is Reptile.adapt and type(self).mini_batches is Reptile.mini_batches \
            and not self.persistent \
            and isinstance(tasks, TaskBatch) and use_vectorized(self.vectorize, self.model, tasks) \
            and grouped_model_reason(self.model) is None

    def train_step(self, tasks, iteration: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.vectorized_for(tasks):
            adapted_mean, loss, acc = self._adapt_grouped(tasks)
        else:
            adapted_mean, loss, acc = self._adapt_per_task(tasks, iteration)
        for p, adapted in zip(self.model.parameters(), adapted_mean):
            p.grad = p.detach() - adapted
        return self.finish_step(loss, acc, iteration)

    def _adapt_per_task(self, tasks, iteration: int) -> tuple[list[torch.Tensor], float, float]:
        """The mean of the adapted parameters over the tasks, the adapted models' mean query loss and accuracy."""
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
        return [total / len(tasks) for total in adapted_sum], sum(losses) / len(losses), sum(accs) / len(accs)

    def _adapt_grouped(self, tasks: TaskBatch) -> tuple[list[torch.Tensor], float, float]:
        """`_adapt_per_task` with the inner loops of each chunk of tasks run at once."""
        adapted_sum = [torch.zeros_like(p) for p in self.model.parameters()]
        losses, predictions = [], []
        for chunk in task_chunks(tasks, second_order=False):
            x = torch.cat([chunk.support_x, chunk.query_x], dim=1)
            y = torch.cat([chunk.support_y, chunk.query_y], dim=1)
            steps = int(self.cfg.inner_steps)
            # task by task, in meta-batch order: the same draws from the global RNG as the per-task loop
            batches = None if self.inner_batch_size is None else \
                torch.stack([torch.stack(self.mini_batches(y.shape[1], steps, True)) for _ in range(len(chunk))])
            fast = fine_tune_grouped(self.model, x, y, float(self.cfg.inner_lr), steps, self.loss_fn,
                                     self.inner_optimizer, self.inner_betas, batches.to(x.device)
                                     if batches is not None else None)
            with torch.no_grad():
                chunk_predictions = self.model.grouped_forward(chunk.query_x, fast)
                losses.append(vmap(self.report_loss_fn)(chunk_predictions, chunk.query_y))
                predictions.append(chunk_predictions)
            for total, adapted in zip(adapted_sum, fast.values()):
                total += adapted.sum(0)
        predictions = torch.cat(predictions)
        # Equal query sizes: accuracy over the whole batch = mean of the per-task accuracies.
        acc = self.metric(predictions.flatten(0, 1), tasks.query_y.flatten(0, 1))
        return [total / len(tasks) for total in adapted_sum], torch.cat(losses).mean().item(), acc

    def extra_scalars(self) -> dict[str, float]:
        return {"meta_step_size": self.optimizer.param_groups[0]["lr"]}
