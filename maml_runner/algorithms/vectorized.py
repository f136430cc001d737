"""MAML's inner loop for a whole meta-batch at once (torch.func), instead of one learn2learn clone per task.

Each task gets its own copy of the parameters (a leading task dimension under `vmap`); `functional_call` runs the
unchanged model with them. Batch norm without running statistics normalises each task's samples with that task's
own statistics inside `vmap` (no leakage between tasks), which is what the per-task reference loop does. It is
computed from plain tensor ops there: torch's batched rule for `batch_norm` gives a wrong second-order gradient
through the normalised input under vmap(grad) (torch 2.x; off by ~1e-3 relative in float64 against the per-task
loop and finite differences), while mean/var/rsqrt compose correctly.

Second order: the inner gradient from `torch.func.grad` stays differentiable, so the outer `backward` goes through
it. First order: the inner gradient is taken at detached parameters (a constant to the outer level), as
learn2learn's `MAML(first_order=True)` does; no second-order graph is built.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from .. import models
from ..data.base import TaskBatch
from ..models import PerStepBatchNorm

VECTORIZE_MODES = ("auto", "on", "off")

# hardware.vectorize=auto on CPU: vectorized only while a task's images (support + query) are at most this many.
# Measured (docs/benchmarks.md, 2-core CPU, meta-batch 32, 1 thread): 5w1s (10 images/task) 1.4x (MAML) and
# 1.8x (FOMAML) faster train step; 20w1s (40) 0.8-1.2x, about even; 20w5s (200) 0.4x: big grouped convolutions
# are slower than the per-task loop there. Vectors (sinusoid) always: 7-14x. Other devices (CUDA): always.
CPU_MAX_IMAGES_PER_TASK = 40

# On CPU the vectorized step runs the meta-batch in chunks of about this many images (support + query): the
# elementwise passes of batch norm's double backward are memory-bound, and chunks keep activations in cache.
# Measured (2-core CPU, 2 threads, meta-batch 32, s/iter of the train step by tasks per chunk 32/16/8/4/1):
# MAML 5w1s 0.194/0.152/0.162/0.183/0.332, FOMAML 5w1s 0.081/0.062/0.067/0.084/0.141, MAML 20w1s (40 images per
# task) 0.645/0.545/0.451/0.459/0.622. Other devices: one chunk (a GPU wants the big batch).
CPU_IMAGES_PER_CHUNK = 256


def task_chunks(tasks: TaskBatch) -> list[TaskBatch]:
    """The meta-batch split for the vectorized step: equal chunks of about CPU_IMAGES_PER_CHUNK images on CPU."""
    count = len(tasks)
    if tasks.support_x.device.type != "cpu" or tasks.support_x.dim() <= 3:
        return [tasks]
    images = count * (tasks.support_x.shape[1] + tasks.query_x.shape[1])
    chunks = min(count, -(-images // CPU_IMAGES_PER_CHUNK))
    size = -(-count // chunks)
    return [tasks.slice(start, start + size) for start in range(0, count, size)]


def supports_vectorization(model: nn.Module) -> str | None:
    """None if the model can run under vmap; else why not (modules that update buffers, e.g. running BN stats)."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats) or \
                (isinstance(module, PerStepBatchNorm) and module.use_running_stats):
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


def _batch_norm(x, weight, bias, eps):
    """Training-mode batch norm over all dims but the channel one (dim 1), from ops vmap differentiates right."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


class _CompositeBatchNorm(TorchFunctionMode):
    """Routes F.batch_norm calls without running statistics (transductive BN) to `_batch_norm`."""

    _NAMES = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            call = {**dict(zip(self._NAMES, args)), **kwargs}
            if call.get("running_mean") is None and call.get("running_var") is None:
                return _batch_norm(call["input"], call.get("weight"), call.get("bias"), call.get("eps", 1e-5))
        return func(*args, **kwargs)


# ---- task-grouped forward for the known building blocks ------------------------------------------------------
# Activations of T tasks at once: images as [N, T*C, H, W] (task t owns channels t*C..t*C+C-1), so a grouped
# convolution (groups=T) applies each task's own filters and batch norm's per-channel statistics are per task
# and channel: exactly each task's transductive BN, with torch's native (correct, fast) batch_norm and its
# double backward. Vectors as [T, N, F] with batched matmuls.
_ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity)
_CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, models.TFSamePad2d)


def _grouped_reason(module: nn.Module) -> str | None:
    """None if `_grouped_forward` knows how to run `module` (and everything in it); else what it does not know."""
    if isinstance(module, nn.Sequential):
        return next((r for r in map(_grouped_reason, module) if r), None)
    if isinstance(module, nn.Conv2d):
        return None if module.groups == 1 and module.padding_mode == "zeros" else "grouped/padded-mode Conv2d"
    if isinstance(module, nn.BatchNorm2d):
        return None if not module.track_running_stats else "BatchNorm2d with running statistics"
    if isinstance(module, PerStepBatchNorm):
        return None if not module.use_running_stats else "PerStepBatchNorm with running statistics"
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return None if module.output_size in (1, (1, 1)) else "AdaptiveAvgPool2d to more than 1x1"
    if isinstance(module, nn.Flatten):
        return None if module.start_dim == 1 and module.end_dim == -1 else "Flatten other than from dim 1"
    if isinstance(module, (nn.Linear, *_ELEMENTWISE, *_CHANNELWISE)):
        return None
    return f"{type(module).__name__} is not known to the grouped forward"


def grouped_model_reason(model: nn.Module) -> str | None:
    """None for `head(body(x))` models built from known blocks (Conv4, MLP), which run task-grouped."""
    known = tuple(getattr(models, name) for name in ("Conv4", "MLP", "_FlatMLP") if hasattr(models, name))
    if type(model) not in known:
        return f"{type(model).__name__} is not a known head(body(x)) model"
    return _grouped_reason(model.body) or _grouped_reason(model.head)


def _grouped_forward(module: nn.Module, x: torch.Tensor, params: dict, prefix: str, tasks: int,
                     step: int) -> torch.Tensor:
    """`module` on task-grouped activations; `step` (the inner step) picks per-step batch-norm weights."""
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            x = _grouped_forward(child, x, params, f"{prefix}{name}.", tasks, step)
        return x
    if isinstance(module, PerStepBatchNorm):  # weights [T, steps, C]: this step's row of every task
        i = module.index(step)
        weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
        return F.batch_norm(x, None, None, None if weight is None else weight[:, i].reshape(-1),
                            None if bias is None else bias[:, i].reshape(-1), True, 0.0, module.eps)
    if isinstance(module, nn.Conv2d):
        weight = params[prefix + "weight"]
        bias = params.get(prefix + "bias")
        return F.conv2d(x, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                        module.stride, module.padding, module.dilation, groups=tasks)
    if isinstance(module, nn.BatchNorm2d):
        weight, bias = params.get(prefix + "weight"), params.get(prefix + "bias")
        return F.batch_norm(x, None, None, None if weight is None else weight.reshape(-1),
                            None if bias is None else bias.reshape(-1), True, 0.0, module.eps)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return x.mean((-2, -1), keepdim=True)
    if isinstance(module, nn.Flatten):
        if x.dim() == 4:  # [N, T*C, H, W] -> [T, N, C*H*W]
            n = x.shape[0]
            return x.reshape(n, tasks, -1).transpose(0, 1)
        return x.reshape(tasks, x.shape[1], -1)
    if isinstance(module, nn.Linear):
        weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
        if x.dim() == 4:  # a Linear straight on images is not a head(body(x)) model we know
            raise ValueError("Linear on image activations")
        out = torch.bmm(x, weight.transpose(1, 2))
        return out if bias is None else out + bias.unsqueeze(1)
    return module(x)  # elementwise / channel-wise: the layout does not matter


def _to_grouped(x: torch.Tensor) -> torch.Tensor:
    """[T, N, C, H, W] -> [N, T*C, H, W]; [T, N, F] stays."""
    if x.dim() == 5:
        t, n = x.shape[:2]
        # channels_last measured slower here (2-core CPU: second-order grouped convs ~2x slower), so not used.
        return x.transpose(0, 1).reshape(n, t * x.shape[2], *x.shape[3:])
    return x


def _per_task_loss(loss_fn, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vmap(loss_fn)(predictions, targets)


def adapt_and_query_grouped(model: nn.Module, tasks: TaskBatch, inner_lr, steps: int, first_order: bool, loss_fn,
                            adapted: list[str] | None = None, step_weights: list[float] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`adapt_and_query` for models `grouped_model_reason` accepts, without vmap (see the notes above).

    For MAML++: `inner_lr` may be `inner_lr(name, step)` (learned per-layer per-step rates), `adapted` names the
    parameters the inner loop changes (default all; the others only get the outer gradient), and `step_weights`
    makes each task's loss the weighted sum of its query losses after every step (multi-step loss)."""
    count = len(tasks)
    adapted = [name for name, _ in model.named_parameters()] if adapted is None else list(adapted)
    rate = inner_lr if callable(inner_lr) else (lambda name, step: inner_lr)
    # Per-task parameters as expanded views: the outer gradient sums over tasks into the shared ones.
    fast = {name: p.expand(count, *p.shape) for name, p in model.named_parameters()}
    support_x, query_x = _to_grouped(tasks.support_x), _to_grouped(tasks.query_x)

    def forward(params, x, step):
        body = _grouped_forward(model.body, x, params, "body.", count, step)
        return _grouped_forward(model.head, body, params, "head.", count, step)

    def query(params, step):
        predictions = forward(params, query_x, step)
        return _per_task_loss(loss_fn, predictions, tasks.query_y), predictions

    weighted = 0.0
    for step in range(steps):
        at = {k: v.detach().requires_grad_() for k, v in fast.items()} if first_order else fast
        losses = _per_task_loss(loss_fn, forward(at, support_x, step), tasks.support_y)
        # d(sum of task losses)/d(task t's parameters) = task t's own gradient.
        gradients = torch.autograd.grad(losses.sum(), [at[k] for k in adapted], create_graph=not first_order,
                                        allow_unused=True)
        fast = {**fast, **{k: fast[k] - rate(k, step) * g for k, g in zip(adapted, gradients) if g is not None}}
        if step_weights is not None:
            step_losses, predictions = query(fast, step)
            weighted = weighted + step_weights[step] * step_losses
    if step_weights is not None and steps > 0:
        return weighted, predictions
    return query(fast, max(steps - 1, 0))


def train_step_in_chunks(algorithm, tasks: TaskBatch, iteration: int, adapt_and_query_chunk) -> dict[str, float]:
    """The base loop's semantics (mean of the per-task query losses, mean per-task accuracy, `finish_step`) with
    `adapt_and_query_chunk(chunk) -> (per-task losses, predictions)` run on each of `task_chunks(tasks)`: one
    backward per chunk, the gradient of the mean accumulated."""
    algorithm.optimizer.zero_grad(set_to_none=True)
    losses, predictions = [], []
    for chunk in task_chunks(tasks):
        chunk_losses, chunk_predictions = adapt_and_query_chunk(chunk)
        (chunk_losses.sum() / len(tasks)).backward()
        losses.append(chunk_losses.detach())
        predictions.append(chunk_predictions.detach())
    losses, predictions = torch.cat(losses), torch.cat(predictions)
    # Equal query sizes: accuracy over the whole batch = mean of the per-task accuracies.
    acc = algorithm.metric(predictions.flatten(0, 1), tasks.query_y.flatten(0, 1))
    return algorithm.finish_step(losses.mean().item(), acc, iteration)


# ---- generic path: vmap over any functional_call-able model ----------------------------------------------------
def adapt_and_query_vmap(model: nn.Module, tasks: TaskBatch, inner_lr: float, steps: int, first_order: bool,
                         loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         adapted: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query losses [tasks] and query predictions [tasks, query, ...] after `steps` SGD steps on each
    task's support set, differentiable w.r.t. the model's parameters (MAML's meta-objective per task)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    adapted = set(params if adapted is None else adapted)

    def loss_at(p, x, y):
        return loss_fn(functional_call(model, (p, buffers), (x,)), y)

    inner_grad = grad(loss_at)

    def one_task(support_x, support_y, query_x, query_y):
        fast = params
        for _ in range(steps):
            at = {k: v.detach() for k, v in fast.items()} if first_order else fast
            gradients = inner_grad(at, support_x, support_y)
            fast = {k: fast[k] - inner_lr * gradients[k] if k in adapted else fast[k] for k in fast}
        predictions = functional_call(model, (fast, buffers), (query_x,))
        return loss_fn(predictions, query_y), predictions

    with _CompositeBatchNorm():
        return vmap(one_task)(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)


def adapt_and_query(model: nn.Module, tasks: TaskBatch, inner_lr: float, steps: int, first_order: bool,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    adapted: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query losses [tasks] and query predictions [tasks, query, ...] after `steps` SGD steps on each
    task's support set, differentiable w.r.t. the model's parameters (MAML's meta-objective per task). `adapted`
    names the parameters the inner loop changes (default: all).

    Known models (Conv4, MLP) run task-grouped; anything else under vmap."""
    if grouped_model_reason(model) is None:
        return adapt_and_query_grouped(model, tasks, inner_lr, steps, first_order, loss_fn, adapted=adapted)
    return adapt_and_query_vmap(model, tasks, inner_lr, steps, first_order, loss_fn, adapted=adapted)
