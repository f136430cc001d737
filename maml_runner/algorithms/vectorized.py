"""The inner loops of a whole meta-batch at once, instead of one learn2learn clone per task (hardware.vectorize).

Each task gets its own copy of the parameters (a leading task dimension). Models that define task-grouped execution
(models.TaskGrouped: Conv4, MLP) run all tasks in one pass of `model.grouped_forward`; any other model runs under
`vmap` with `functional_call`. The inner step is algorithms/inner_update.py's, shared with the per-task loops: MAML
and FOMAML (plain alpha), MAML++ (per-layer per-step rates, multi-step loss), Meta-SGD (per-parameter rates),
ANIL (head only, on body features computed once per task) and Reptile (SGD on support and query, no meta-gradient
through the inner loop).

Second order: the inner gradient stays differentiable, so the outer `backward` goes through it. First order: the
inner gradient is taken at detached parameters (a constant to the outer level), as learn2learn's
`MAML(first_order=True)` does; no second-order graph is built.

Under vmap, batch norm without running statistics normalises each task's samples with that task's own statistics
(no leakage between tasks), which is what the per-task reference loop does. It is computed from plain tensor ops
there: torch's batched rule for `batch_norm` gives a wrong second-order gradient through the normalised input under
vmap(grad) (torch 2.x; off by ~1e-3 relative in float64 against the per-task loop and finite differences), while
mean/var/rsqrt compose correctly. The task-grouped forward needs no such detour (see models.py).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from ..data.base import TaskBatch
from ..grouped_conv import second_order_step
from ..models import running_statistics_reason
from .inner_update import Rate, inner_update

VECTORIZE_MODES = ("auto", "on", "off")

# hardware.vectorize=auto on CPU: vectorized only while a task's pixels (support + query images x height x width) are
# at most those of 60 Omniglot images. Measured (docs/benchmarks.md, 2-core CPU, meta-batch 32), per-task loop /
# fast path, with session 10-11's derivatives and chunks: 5w5s (50 images/task) 1.27-1.36x at 2 threads, 1.05x at
# 1; 10w3s (60) 1.11-1.13x at 2 threads; 8w4s (64) 1.06-1.10x at 2 threads, 0.98-1.01x at 1; 20w5s (200)
# 0.96-0.99x (a chunk then holds one task). 5w1s (10) and 20w1s (40) win clearly. At 84x84 (miniImageNet) even 10
# images per task were 0.7-1.1x (FOMAML 0.68-0.84x), so pixels, not images, decide. Vectors (sinusoid) always:
# 7-14x. Other devices (CUDA): always.
CPU_MAX_IMAGES_PER_TASK = 60
CPU_MAX_PIXELS_PER_TASK = CPU_MAX_IMAGES_PER_TASK * 28 * 28

# On CPU the vectorized step runs the meta-batch in chunks of about this many images (support + query): the
# elementwise passes of batch norm's double backward are memory-bound, and chunks keep activations in cache.
# Measured side by side (docs/benchmarks.md "Chunk sizes", 2026-11-26, quiet 2-core CPU, per-task loop / fast path):
# 128 images beat 256 for every second-order step (MAML 5w1s 1.72 -> 1.93x at 2 threads, 1.36 -> 1.53x at 1;
# MAML++, Meta-SGD alike; 20w1s: 160 beat 320 and 640) and for every step at 1 thread; first-order steps (FOMAML,
# Reptile, ANIL, whose body has no double backward) with 2 threads did better with 256 (FOMAML 2.51 vs 2.35x, ANIL
# 3.07 vs 2.71x): more work per op to share between threads. Since the first inner step runs the support pass as
# ordinary convolutions over all of a chunk's images (grouped_conv._SharedConv, session 11), second-order steps do
# better with 160 than 128 (5w1s: 2 chunks of 16 tasks instead of 3 of 11; MAML 1.07x, Meta-SGD 1.09x, ANIL 1.10x,
# MAML++ 0.98-1.05x at 2 threads; MAML 0.99x at 1 thread), while first-order steps at 1 thread keep 128 (FOMAML 1.66
# vs 1.55x, Reptile 1.42 vs 1.32x). Other devices: one chunk (a GPU wants the big batch).
CPU_IMAGES_PER_CHUNK = 128  # first-order steps at one intra-op thread
CPU_SECOND_ORDER_IMAGES_PER_CHUNK = 160
CPU_FIRST_ORDER_CHUNK_FACTOR = 2  # first-order steps with several intra-op threads: chunks this many times larger


def images_per_chunk(second_order: bool) -> int:
    """CPU chunk size for a step that does (`second_order`) or does not differentiate through the body's inner
    gradient."""
    if second_order:
        return CPU_SECOND_ORDER_IMAGES_PER_CHUNK
    if torch.get_num_threads() == 1:
        return CPU_IMAGES_PER_CHUNK
    return CPU_IMAGES_PER_CHUNK * CPU_FIRST_ORDER_CHUNK_FACTOR


def task_chunks(tasks: TaskBatch, second_order: bool) -> list[TaskBatch]:
    """The meta-batch split for the vectorized step: equal chunks of about `images_per_chunk` images on CPU."""
    count = len(tasks)
    if tasks.support_x.device.type != "cpu" or tasks.support_x.dim() <= 3:
        return [tasks]
    images = count * (tasks.support_x.shape[1] + tasks.query_x.shape[1])
    chunks = min(count, -(-images // images_per_chunk(second_order)))
    size = -(-count // chunks)
    return [tasks.slice(start, start + size) for start in range(0, count, size)]


def supports_vectorization(model: nn.Module) -> str | None:
    """None if the model can run under vmap; else why not (modules that update buffers, e.g. running BN stats)."""
    return running_statistics_reason(model)


def use_vectorized(mode: str, model: nn.Module, tasks: TaskBatch) -> bool:
    """The hardware.vectorize decision for one meta-batch (`on` still needs a model that vmap can run)."""
    if mode == "off" or supports_vectorization(model) is not None:
        return False
    if mode == "on" or tasks.support_x.device.type != "cpu":
        return True
    if tasks.support_x.dim() <= 3:  # vectors (sinusoid): always
        return True
    images = tasks.support_x.shape[1] + tasks.query_x.shape[1]
    return images * tasks.support_x.shape[-2] * tasks.support_x.shape[-1] <= CPU_MAX_PIXELS_PER_TASK


# ---- task-grouped path: models that define grouped_forward (models.TaskGrouped) ----------------------------------
def grouped_model_reason(model: nn.Module) -> str | None:
    """None if `model` runs task-grouped (it defines `grouped_forward` and can use it now); else why not."""
    if not callable(getattr(model, "grouped_forward", None)):
        return f"{type(model).__name__} does not define a task-grouped forward (models.TaskGrouped)"
    return model.grouped_reason()


def _per_task_loss(loss_fn, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return vmap(loss_fn)(predictions, targets)


def _per_task_parameters(model: nn.Module, count: int) -> dict[str, torch.Tensor]:
    """Every parameter as `count` per-task copies: expanded views, so the outer gradient sums over the tasks into
    the shared parameter."""
    return {name: p.expand(count, *p.shape) for name, p in model.named_parameters()}


def _inner_loop(forward, fast: dict, support_x, support_y, rate: Rate, steps: int, first_order: bool, loss_fn,
                adapted: list[str], after_step=None) -> dict:
    """`steps` inner steps of every task at once; `forward(x, params, step)` gives per-task predictions. Calls
    `after_step(fast, step)` after each step (MAML++'s multi-step loss). Returns the adapted per-task parameters."""
    for step in range(steps):
        at = {k: v.detach().requires_grad_() for k, v in fast.items()} if first_order else fast
        losses = _per_task_loss(loss_fn, forward(support_x, at, step), support_y)
        # d(sum of task losses)/d(task t's parameters) = task t's own gradient.
        gradients = torch.autograd.grad(losses.sum(), [at[k] for k in adapted], create_graph=not first_order,
                                        allow_unused=True)
        fast = inner_update(fast, dict(zip(adapted, gradients)), rate, step)
        if after_step is not None:
            after_step(fast, step)
    return fast


def adapt_and_query_grouped(model: nn.Module, tasks: TaskBatch, inner_lr: Rate, steps: int, first_order: bool,
                            loss_fn, adapted: list[str] | None = None, step_weights: list[float] | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`adapt_and_query` for models `grouped_model_reason` accepts, without vmap.

    `inner_lr`: alpha, or a `Rate` callable (MAML++'s per-layer per-step rates, Meta-SGD's per-parameter rates);
    `adapted` names the parameters the inner loop changes (default all; the others only get the outer gradient);
    `step_weights` (MAML++) makes each task's loss the weighted sum of its query losses after every step."""
    adapted = [name for name, _ in model.named_parameters()] if adapted is None else list(adapted)

    def query(params, step):
        predictions = model.grouped_forward(tasks.query_x, params, step)
        return _per_task_loss(loss_fn, predictions, tasks.query_y), predictions

    weighted = [0.0, None]  # the multi-step loss so far, the last predictions

    def add_step_loss(fast, step):
        step_losses, weighted[1] = query(fast, step)
        weighted[0] = weighted[0] + step_weights[step] * step_losses

    with second_order_step(not first_order):
        fast = _inner_loop(model.grouped_forward, _per_task_parameters(model, len(tasks)), tasks.support_x,
                           tasks.support_y, inner_lr, steps, first_order, loss_fn, adapted,
                           add_step_loss if step_weights is not None else None)
        if step_weights is not None and steps > 0:
            return weighted[0], weighted[1]
        return query(fast, max(steps - 1, 0))


def adapt_head_and_query_grouped(model: nn.Module, tasks: TaskBatch, inner_lr: Rate, steps: int, first_order: bool,
                                 loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """ANIL's `adapt_and_query`: only the head is adapted, on body features computed once per task (support and
    query each through the body on its own, as the per-task loop does)."""
    shared = dict(model.named_parameters())  # the body is not adapted: ordinary (shared-weight) layers, faster
    support = model.grouped_body(tasks.support_x, shared)
    query = model.grouped_body(tasks.query_x, shared)
    head = {name: p for name, p in _per_task_parameters(model, len(tasks)).items() if name.startswith("head.")}
    fast = _inner_loop(lambda x, p, step: model.grouped_head(x, p), head, support, tasks.support_y, inner_lr, steps,
                       first_order, loss_fn, list(head))
    predictions = model.grouped_head(query, fast)
    return _per_task_loss(loss_fn, predictions, tasks.query_y), predictions


def fine_tune_grouped(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int, loss_fn,
                      optimizer: str = "sgd", betas=(0.9, 0.999), batches: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
    """Reptile's inner loop for every task at once: `steps` steps from the model's parameters on each task's data
    (`x` [T, N, ...], `y` [T, N]); returns the adapted per-task parameters [T, *shape], detached (Reptile takes no
    gradient through its inner loop).

    `optimizer`: "sgd" at `lr`, or "adam": a fresh torch.optim.Adam per task (lr, `betas`, eps 1e-8), whose
    arithmetic is elementwise, so it runs on the per-task copies as it would on each task's own. `batches`: row
    indices [T, steps, size] of each task's mini-batch at each step (Reptile.mini_batches); None: full batch."""
    fast = {name: p.detach() for name, p in _per_task_parameters(model, x.shape[0]).items()}
    adam = _GroupedAdam(fast, lr, betas) if optimizer == "adam" else None
    tasks = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
    for step in range(steps):
        xs, ys = (x, y) if batches is None else (x[tasks, batches[:, step]], y[tasks, batches[:, step]])
        with torch.enable_grad():
            at = {name: p.detach().requires_grad_() for name, p in fast.items()}
            losses = _per_task_loss(loss_fn, model.grouped_forward(xs, at, step), ys)
            gradients = dict(zip(at, torch.autograd.grad(losses.sum(), list(at.values()), allow_unused=True)))
        fast = adam.step(fast, gradients) if adam is not None else inner_update(fast, gradients, lr, step)
    return fast


class _GroupedAdam:
    """torch.optim.Adam's single-tensor update (no weight decay, no amsgrad) on per-task parameter copies: every
    task has its own moments; all tasks step together, so they share the step count."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, betas, eps: float = 1e-8):
        self.lr, (self.beta1, self.beta2), self.eps, self.count = lr, betas, eps, 0
        self.moments = [torch.zeros_like(p) for p in params.values()]
        self.squares = [torch.zeros_like(p) for p in params.values()]

    def step(self, params: dict[str, torch.Tensor], gradients: dict) -> dict[str, torch.Tensor]:
        """`params` after one Adam step; a parameter without a gradient (unused by the loss) stays, as torch's Adam
        skips it."""
        self.count += 1
        step_size = self.lr / (1 - self.beta1 ** self.count)
        correction2_sqrt = (1 - self.beta2 ** self.count) ** 0.5
        updated = {}
        for (name, p), m, v in zip(params.items(), self.moments, self.squares):
            g = gradients.get(name)
            if g is None:
                updated[name] = p
                continue
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            updated[name] = p.addcdiv(m, (v.sqrt() / correction2_sqrt).add_(self.eps), value=-step_size)
        return updated


def train_step_in_chunks(algorithm, tasks: TaskBatch, iteration: int, adapt_and_query_chunk,
                         second_order: bool) -> dict[str, float]:
    """The base loop's semantics (mean of the per-task query losses, mean per-task accuracy, `finish_step`) with
    `adapt_and_query_chunk(chunk) -> (per-task losses, predictions)` run on each of `task_chunks(tasks,
    second_order)`: one backward per chunk, the gradient of the mean accumulated."""
    algorithm.optimizer.zero_grad(set_to_none=True)
    losses, predictions = [], []
    for chunk in task_chunks(tasks, second_order):
        chunk_losses, chunk_predictions = adapt_and_query_chunk(chunk)
        (chunk_losses.sum() / len(tasks)).backward()
        losses.append(chunk_losses.detach())
        predictions.append(chunk_predictions.detach())
    losses, predictions = torch.cat(losses), torch.cat(predictions)
    # Equal query sizes: accuracy over the whole batch = mean of the per-task accuracies.
    acc = algorithm.metric(predictions.flatten(0, 1), tasks.query_y.flatten(0, 1))
    return algorithm.finish_step(losses.mean().item(), acc, iteration)


# ---- generic path: vmap over any functional_call-able model ----------------------------------------------------
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


def adapt_and_query_vmap(model: nn.Module, tasks: TaskBatch, inner_lr: Rate, steps: int, first_order: bool,
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
            fast = inner_update(fast, {k: gradients[k] for k in adapted}, inner_lr)
        predictions = functional_call(model, (fast, buffers), (query_x,))
        return loss_fn(predictions, query_y), predictions

    with _CompositeBatchNorm():
        return vmap(one_task)(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)


def adapt_and_query(model: nn.Module, tasks: TaskBatch, inner_lr: Rate, steps: int, first_order: bool,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    adapted: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query losses [tasks] and query predictions [tasks, query, ...] after `steps` SGD steps on each
    task's support set, differentiable w.r.t. the model's parameters (MAML's meta-objective per task). `inner_lr`:
    alpha or a `Rate` (e.g. Meta-SGD's per-parameter rates); `adapted` names the parameters the inner loop changes
    (default: all).

    Models with a task-grouped forward (Conv4, MLP) run task-grouped; anything else under vmap."""
    if grouped_model_reason(model) is None:
        return adapt_and_query_grouped(model, tasks, inner_lr, steps, first_order, loss_fn, adapted=adapted)
    return adapt_and_query_vmap(model, tasks, inner_lr, steps, first_order, loss_fn, adapted=adapted)
