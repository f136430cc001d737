"""MAML++ (Antoniou et al. 2019, "How to train your MAML"): MAML plus five switches under `algorithm.*`; all on by
default except derivative-order annealing, which the released Omniglot configs turn off
(`first_order_to_second_order_epoch: -1`: second order from the start):

- multi_step_loss (MSL): the meta-loss is a weighted sum of the query losses after every inner step; the weights
  start uniform and anneal towards the last step over the first `msl_fraction` of training, then only the last
  step counts.
- derivative_order_annealing (DA, default off): first-order meta-gradients for the first `first_order_fraction` of
  training, second order afterwards.
- learned_step_rates (LSLR): one learned inner learning rate per layer (parameter tensor) and inner step.
- per_step_bn (BNRS + BNWB): every batch norm keeps its own running statistics and its own weight/bias per inner
  step; these are learned in the outer loop only (the inner loop adapts conv/linear weights).
- cosine_annealing (CA): the outer Adam lr follows a cosine from `outer_lr` to `min_outer_lr` over training.

An inner step beyond those trained (e.g. 3 eval steps after 1-step training) reuses the last step's rates and batch
norm. With `model.bn=running`, evaluation uses the per-step running statistics; otherwise batch statistics
(transductive, as MAML).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.func import functional_call

from ..data.base import Task, TaskBatch
from ..grouped_conv import second_order_step
from ..models import PerStepBatchNorm, outer_loop_only, per_step_batch_norms
from ..schema import (BOOL, FRACTION, OPTIONAL_POSITIVE_FLOAT, OPTIONAL_POSITIVE_INT, POSITIVE_FLOAT, required)
from .base import MetaAlgorithm
from .inner_update import Rate, inner_update, per_step_rates
from .maml import MAML
from .vectorized import adapt_and_query_grouped, grouped_model_reason, train_step_in_chunks, use_vectorized


class MAMLPlusPlus(MetaAlgorithm):
    @dataclass
    class Config(MAML.Config):
        rate_outer_lr: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)
        min_outer_lr: float = required(POSITIVE_FLOAT)
        multi_step_loss: bool = required(BOOL)
        msl_fraction: float = required(FRACTION)
        derivative_order_annealing: bool = required(BOOL)
        first_order_fraction: float = required(FRACTION)
        learned_step_rates: bool = required(BOOL)
        per_step_bn: bool = required(BOOL)
        bn_steps: Optional[int] = required(OPTIONAL_POSITIVE_INT)
        cosine_annealing: bool = required(BOOL)

    name = "mamlpp"
    honours_outer_loop_only = True
    vectorize = "auto"  # hardware.vectorize (set by build_algorithm)

    def __init__(self, model, cfg, task_type, total_iterations):
        super().__init__(model, cfg, task_type, total_iterations)
        self.train_steps = int(cfg.inner_steps)
        steps = int(cfg.get("bn_steps") or self.train_steps)
        self.per_step_bn = bool(cfg.get("per_step_bn", True))
        self.batch_norms = per_step_batch_norms(model, steps) if self.per_step_bn else []
        in_per_step_bn = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, PerStepBatchNorm)
                          for p in ("weight", "bias")}
        # The inner loop adapts everything except per-step batch-norm parameters (those are outer-loop only), and
        # with model.bn_adapted=false any batch-norm parameter.
        frozen = in_per_step_bn | outer_loop_only(model)
        self.adapted = [n for n, _ in model.named_parameters() if n not in frozen]
        self.learned_step_rates = bool(cfg.get("learned_step_rates", True))
        if self.learned_step_rates:
            dtype = next(model.parameters()).dtype
            self.step_rates = nn.ParameterDict({
                self._key(n): nn.Parameter(torch.full((self.train_steps,), float(cfg.inner_lr), dtype=dtype))
                for n in self.adapted})
        self.multi_step_loss = bool(cfg.get("multi_step_loss", True))
        self.msl_iterations = float(cfg.get("msl_fraction", 0.1)) * self.total_iterations
        annealing = bool(cfg.get("derivative_order_annealing", False))
        self.first_order_iterations = float(cfg.get("first_order_fraction", 0.5)) * self.total_iterations \
            if annealing else 0.0

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")  # ParameterDict keys cannot contain dots

    # ---- schedules ---------------------------------------------------------------------------------------
    def build_optimizer(self) -> None:
        super().build_optimizer()
        if bool(self.cfg.get("cosine_annealing", True)):
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(self.total_iterations, 1), eta_min=float(self.cfg.get("min_outer_lr", 1e-5)))

    def learned_rate_parameters(self):
        return list(self.step_rates.values()) if self.learned_step_rates else []

    def needs_double_backward(self) -> bool:
        return not bool(self.cfg.first_order)  # derivative-order annealing still ends second-order

    def first_order_at(self, iteration: int | None) -> bool:
        return iteration is None or bool(self.cfg.first_order) or iteration < self.first_order_iterations

    def step_weights(self, iteration: int) -> list[float] | None:
        """Antoniou et al.'s per-step loss importance at this iteration; None once only the last step counts."""
        k = self.train_steps
        if not self.multi_step_loss or k == 1 or iteration >= self.msl_iterations:
            return None
        progress, floor = iteration / self.msl_iterations, 0.03 / k
        non_final = max(1.0 / k - progress / k, floor)
        final = min(1.0 / k + progress * (k - 1) / k, 1.0 - (k - 1) * floor)
        return [non_final] * (k - 1) + [final]

    # ---- inner loop --------------------------------------------------------------------------------------
    def inner_rate(self) -> Rate:
        """The inner step size: learned per layer and step (LSLR), else `algorithm.inner_lr`."""
        if self.learned_step_rates:
            return per_step_rates(self.step_rates, self._key)
        return float(self.cfg.inner_lr)

    def forward_at(self, params: dict, x: torch.Tensor, step: int) -> torch.Tensor:
        for bn in self.batch_norms:
            bn.step = step
        return functional_call(self.model, params, (x,))

    def inner_loop(self, task: Task, steps: int, iteration: int | None, query_each_step: bool = False):
        """Adapted parameters after `steps` steps and, if asked, the query predictions after every step."""
        second_order = not self.first_order_at(iteration)
        named = dict(self.model.named_parameters())
        params = {n: named[n] for n in self.adapted}
        rate = self.inner_rate()
        per_step = []
        with second_order_step(second_order):
            for step in range(steps):
                loss = self.loss_fn(self.forward_at(params, task.support_x, step), task.support_y)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order)
                params = inner_update(params, dict(zip(params, grads)), rate, step)
                if query_each_step:
                    per_step.append(self.forward_at(params, task.query_x, step))
        return params, per_step

    def adapt(self, task: Task, steps: int, iteration=None):
        params, _ = self.inner_loop(task, steps, iteration)
        last = max(steps - 1, 0)
        return lambda x: self.forward_at(params, x, last)

    def query_loss(self, task: Task, iteration: int):
        weights = self.step_weights(iteration)
        if weights is None:
            return super().query_loss(task, iteration)
        _, per_step = self.inner_loop(task, self.train_steps, iteration, query_each_step=True)
        loss = sum(w * self.loss_fn(p, task.query_y) for w, p in zip(weights, per_step))
        return loss, self.metric(per_step[-1], task.query_y)

    # ---- vectorized meta-batch (algorithms/vectorized.py): the same objective as query_loss per task ---------
    def vectorized_for(self, tasks) -> bool:
        return isinstance(tasks, TaskBatch) and use_vectorized(self.vectorize, self.model, tasks) \
            and grouped_model_reason(self.model) is None

    def train_step(self, tasks, iteration: int) -> dict[str, float]:
        if not self.vectorized_for(tasks):
            return super().train_step(tasks, iteration)
        weights = self.step_weights(iteration)
        return train_step_in_chunks(self, tasks, iteration, lambda chunk: adapt_and_query_grouped(
            self.model, chunk, self.inner_rate(), self.train_steps, self.first_order_at(iteration), self.loss_fn,
            adapted=self.adapted, step_weights=weights), second_order=not self.first_order_at(iteration))

    def extra_scalars(self) -> dict[str, float]:
        scalars = {}
        if self.learned_step_rates:
            with torch.no_grad():
                rates = torch.stack(list(self.step_rates.values()))  # [parameters, steps]
            scalars.update({f"inner_lr_step{i}": rates[:, i].mean().item() for i in range(rates.shape[1])})
        if self.scheduler is not None:
            scalars["outer_lr"] = self.optimizer.param_groups[0]["lr"]
        return scalars
