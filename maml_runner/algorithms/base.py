"""The one interface every meta-learning algorithm implements.

An algorithm owns its meta-parameters (the model plus anything learned alongside it, e.g. inner learning
rates) and its outer optimizer. The trainer only calls `train_step`, `evaluate_task` and the checkpoint hooks,
so adding an algorithm means one module (anywhere importable) plus one `conf/algorithm/<name>.yaml` that names its
class with `_target_`. The class's `Config` dataclass lists the keys that YAML holds, with their types and allowed
values (maml_runner/schema.py); config.validate checks the YAML's section against it right after composition.
"""
from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import Task, TaskBatch
from ..config import LOSS_REDUCTIONS
from ..schema import AlgorithmConfig
from ..errors import UserError
from ..models import outer_loop_only


def task_loss_fn(task_type: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return F.mse_loss if task_type == "regression" else F.cross_entropy


def sum_over_shots_loss(shots: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """cbfinn/maml's `xent`: per-example cross-entropy / K, differentiated as a sum over the examples. On N*K
    support examples that is N times the mean, so an inner step of alpha moves as alpha*N would on the mean."""
    return lambda logits, targets: F.cross_entropy(logits, targets, reduction="sum") / shots


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == targets).float().mean().item()


class MetaAlgorithm(nn.Module, ABC):
    """Meta-parameters + outer optimizer + how to adapt to one task."""

    Config = AlgorithmConfig  # the keys of its conf/algorithm/<name>.yaml; subclasses extend it
    name: str = "base"
    # Whether the algorithm keeps model.bn_adapted=false's batch-norm parameters out of its inner loop.
    honours_outer_loop_only = False

    def __init__(self, model: nn.Module, cfg, task_type: str, total_iterations: int):
        super().__init__()
        self.cfg = cfg
        self.task_type = task_type
        self.total_iterations = int(total_iterations)
        self.loss_fn = task_loss_fn(task_type)  # the loss adapted and meta-trained on (`set_loss_reduction`)
        self.report_loss_fn = self.loss_fn      # the loss reported for validation and test: always the mean
        self.grad_clip = None
        self.grad_clip_value = None  # train.grad_clip_value: element-wise clip of the meta-gradient
        self.model = model
        if outer_loop_only(model) and not self.honours_outer_loop_only:
            raise UserError(f"model.bn_adapted=false is supported by maml, fomaml, anil and mamlpp; algorithm="
                            f"{self.name} adapts every parameter: use model.bn_adapted=true")
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    # ---- what each algorithm defines -------------------------------------------------------------------
    @abstractmethod
    def adapt(self, task: Task, steps: int, iteration: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """A predictor adapted on the task's support set with `steps` inner steps.

        `iteration` is the training iteration when called from meta-training (graph kept for the meta-gradient
        where the algorithm needs it) and None at evaluation (no second-order graph).
        """

    def query_loss(self, task: Task, iteration: int) -> tuple[torch.Tensor, float]:
        """Differentiable query loss after adaptation (the meta-objective of one task) and its accuracy."""
        learner = self.adapt(task, int(self.cfg.inner_steps), iteration)
        predictions = learner(task.query_x)
        return self.loss_fn(predictions, task.query_y), self.metric(predictions, task.query_y)

    def set_loss_reduction(self, reduction: str, shots: int | None) -> None:
        """`algorithm.loss_reduction`: `mean` (default) or `sum_over_shots` (Finn's code, classification only), for
        the inner loss and the meta-objective alike; validation and test losses stay means."""
        if reduction not in LOSS_REDUCTIONS:
            raise UserError(f"algorithm.loss_reduction={reduction!r} is not allowed; use one of "
                            f"{', '.join(LOSS_REDUCTIONS)}")
        if reduction == "sum_over_shots":
            if self.task_type == "regression" or not shots:
                raise UserError("algorithm.loss_reduction=sum_over_shots applies to classification (Finn's xent); "
                                "the MAML code's regression loss is a mean: use algorithm.loss_reduction=mean")
            self.loss_fn = sum_over_shots_loss(int(shots))

    def needs_double_backward(self) -> bool:
        """Whether some training step differentiates through the inner loop's gradients (second-order
        meta-gradients). torch.compile cannot (hardware.compile). Algorithms with a `first_order` switch answer
        by it; the rest are assumed second-order unless they say otherwise."""
        return not bool(getattr(self, "first_order", False))

    # ---- data hooks (defaults fit every episodic meta-learner) ----------------------------------------------
    def bind_data(self, train_source) -> None:
        """Called once before the optimizer is built; algorithms that need facts about the data (e.g. the
        number of training classes) take them here."""

    def next_batch(self, train_source, meta_batch_size: int):
        """The training batch of one iteration: a meta-batch of tasks unless the algorithm is not episodic."""
        return train_source.sample_batch(meta_batch_size)

    # ---- shared machinery ------------------------------------------------------------------------------
    def learned_rate_parameters(self) -> list[nn.Parameter]:
        """Inner learning rates learned in the outer loop (Meta-SGD, MAML++ LSLR); empty for the others."""
        return []

    def build_optimizer(self) -> None:
        """Adam over the meta-parameters; learned inner rates get their own step size, `algorithm.rate_outer_lr`
        (null: outer_lr × inner_lr, so rates move at the relative speed of weights of order 1). With the papers'
        choice, outer_lr, sinusoid's 0.01 rates move by up to 10 % per iteration and cross the inner loop's
        stability limit: 10-step training diverged at iteration 47, and rates trained for 1 step (some negative)
        diverged when evaluation took 10 steps."""
        outer_lr = float(self.cfg.outer_lr)
        rates = self.learned_rate_parameters()
        if not rates:
            self.optimizer = torch.optim.Adam(self.parameters(), lr=outer_lr)
            return
        rate_lr = self.cfg.get("rate_outer_lr", None)
        rate_lr = outer_lr * float(self.cfg.inner_lr) if rate_lr is None else rate_lr
        rate_ids = {id(p) for p in rates}
        others = [p for p in self.parameters() if id(p) not in rate_ids]
        self.optimizer = torch.optim.Adam([{"params": others}, {"params": rates, "lr": float(rate_lr)}],
                                          lr=outer_lr)

    def metric(self, predictions: torch.Tensor, targets: torch.Tensor) -> float:
        return float("nan") if self.task_type == "regression" else accuracy(predictions, targets)

    def train_step(self, tasks: TaskBatch, iteration: int) -> dict[str, float]:
        """One meta-update on a meta-batch. A non-finite loss or gradient leaves the parameters unchanged."""
        self.optimizer.zero_grad(set_to_none=True)
        losses, accs = [], []
        for task in tasks:
            loss, acc = self.query_loss(task, iteration)
            (loss / len(tasks)).backward()
            losses.append(loss.item())
            accs.append(acc)
        return self.finish_step(sum(losses) / len(losses), sum(accs) / len(accs), iteration)

    def finish_step(self, loss: float, acc: float, iteration: int) -> dict[str, float]:
        max_norm = float(self.grad_clip) if self.grad_clip else math.inf
        gradients = [p for p in self.parameters() if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(gradients, max_norm))
        if self.grad_clip_value:  # after the norm is read: clamping would turn an inf gradient into a finite one
            torch.nn.utils.clip_grad_value_(gradients, float(self.grad_clip_value))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.after_step(iteration)
        return {"loss": loss, "acc": acc, "grad_norm": grad_norm, "finite": float(finite), **self.extra_scalars()}

    def after_step(self, iteration: int) -> None:
        """Schedules (learning rates, annealing) advance here, once per meta-iteration."""
        if self.scheduler is not None:
            self.scheduler.step()

    def extra_scalars(self) -> dict[str, float]:
        """Extra per-step scalars for TensorBoard (e.g. learned learning rates)."""
        return {}

    def query_predictions(self, task: Task, steps: int) -> torch.Tensor:
        """The outputs on the task's query set (logits for classification) of the model adapted with `steps` inner
        steps on its support set, without a meta-gradient: what `evaluate_task` scores and what an ensemble test
        averages (evaluate.evaluate_ensemble)."""
        learner = self.adapt(task, steps, None)
        with torch.no_grad():
            return learner(task.query_x)

    def score(self, predictions: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
        """(query loss, accuracy) of query outputs: the reported loss (a mean) and, for classification, the accuracy
        of the argmax (nan for regression)."""
        with torch.no_grad():
            return self.report_loss_fn(predictions, targets).item(), self.metric(predictions, targets)

    def evaluate_task(self, task: Task, steps: int) -> tuple[float, float]:
        """Query loss and accuracy after adapting with `steps` inner steps (no meta-gradient)."""
        return self.score(self.query_predictions(task, steps), task.query_y)

    def fine_tune(self, model: nn.Module, task: Task, steps: int, lr: float, optimizer: str = "sgd",
                  betas=(0.9, 0.999), data=None, state: dict | None = None, on_done=None,
                  batches: list[torch.Tensor] | None = None) -> nn.Module:
        """A copy of `model` trained for `steps` steps on the support set (or `data`): full-batch, or on the rows
        `batches[step]` (mini-batches). `state`: an optimizer state_dict to start from (a copy is loaded);
        `on_done(optimizer)` is called after the steps."""
        learner = copy.deepcopy(model)
        x, y = data if data is not None else (task.support_x, task.support_y)
        if optimizer == "adam":
            opt = torch.optim.Adam(learner.parameters(), lr=lr, betas=tuple(betas))
        else:
            opt = torch.optim.SGD(learner.parameters(), lr=lr)
        if state is not None:
            opt.load_state_dict(copy.deepcopy(state))
        with torch.enable_grad():
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                if batches is None:
                    self.loss_fn(learner(x), y).backward()
                else:
                    self.loss_fn(learner(x[batches[step]]), y[batches[step]]).backward()
                opt.step()
        if on_done is not None:
            on_done(opt)
        return learner

    # ---- checkpoint hooks ------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {
            "parameters": self.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["parameters"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
