"""MAML's inner loop for a whole meta-batch at once (torch.func), instead of one learn2learn clone per task.

Each task gets its own copy of the parameters (a leading task dimension under `vmap`); `functional_call` runs the
unchanged model with them. Batch norm without running statistics normalises each task's samples with that task's
own statistics inside `vmap` (no leakage between tasks), which is what the per-task reference loop does.

Second order: the inner gradient from `torch.func.grad` stays differentiable, so the outer `backward` goes through
it. First order: the inner gradient is taken at detached parameters (a constant to the outer level), as
learn2learn's `MAML(first_order=True)` does; no second-order graph is built.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ..data.base import TaskBatch

VECTORIZE_MODES = ("auto", "on", "off")

# hardware.vectorize=auto on CPU: vmap only while a task's images (support + query) are at most this many.
# Measured with scripts/bench_speed.py on a 2-core CPU (docs/benchmarks.md): conv4 MAML is 3-5x faster under
# vmap at 5w1s (10 images/task) and 20w1s (40), about even at 20w5s (200: large grouped convolutions, where the
# per-task loop is as fast). On CUDA vmap wins at every size measured.
CPU_MAX_IMAGES_PER_TASK = 100


def supports_vectorization(model: nn.Module) -> str | None:
    """None if the model can run under vmap; else why not (modules that update buffers, e.g. running BN stats)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return f"{name or type(module).__name__} tracks running statistics (model.bn=running)"
    return None


def use_vectorized(mode: str, model: nn.Module, tasks: TaskBatch) -> bool:
    """The hardware.vectorize decision for one meta-batch (`on` still needs a model that vmap can run)."""
    if mode == "off" or supports_vectorization(model) is not None:
        return False
    if mode == "on" or tasks.support_x.device.type != "cpu":
        return True
    per_task = tasks.support_x.shape[1] + tasks.query_x.shape[1]
    return tasks.support_x.dim() <= 3 or per_task <= CPU_MAX_IMAGES_PER_TASK  # vectors (sinusoid): always


def adapt_and_query(model: nn.Module, tasks: TaskBatch, inner_lr: float, steps: int, first_order: bool,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query losses [tasks] and query predictions [tasks, query, ...] after `steps` SGD steps on each
    task's support set, differentiable w.r.t. the model's parameters (MAML's meta-objective per task)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss_at(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x,)), y)

    inner_grad = grad(loss_at)

    def one_task(support_x, support_y, query_x, query_y):
        fast = params
        for _ in range(steps):
            at = {k: v.detach() for k, v in fast.items()} if first_order else fast
            gradients = inner_grad(at, support_x, support_y)
            fast = {k: fast[k] - inner_lr * gradients[k] for k in fast}
        predictions = functional_call(model, (fast, buffers), (query_x,))
        return loss_fn(predictions, query_y), predictions

    return vmap(one_task)(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
