"""A task-grouped 2-d convolution whose derivatives, to any order, are convolutions torch runs well on CPU.

Why: second-order MAML differentiates the inner step's convolution backward once more. Torch's own rule for that
(`_convolution_double_backward`) computes the filter term of a grouped convolution as one small convolution per
group (per task, on a copy of each slice), and the input gradient inside its fused `convolution_backward` was up to
a few times slower than the same product written as `conv_transpose2d` (stride 2, this 2-core CPU; the gap varies
between runs). Here every derivative that is itself differentiated (the inner step's, under create_graph) is one of
three grouped operations, each with its backward written in the same three:

    y  = conv(x, w)               forward:        conv2d
    gx = input_grad(gy, w)        d y / d x:      conv_transpose2d
    gw = weight_grad(x, gy)       d y / d w:      convolution_backward, filter gradient only

    d input_grad:  gy <- conv(ggx, w),           w <- weight_grad(ggx, gy)
    d weight_grad: x  <- input_grad(gy, ggw),    gy <- conv(x, ggw)

A backward that runs without create_graph (the outer pass) calls torch's fused `convolution_backward`, as F.conv2d
would. Same values as torch's rules up to float rounding (float64 tests against F.conv2d's first and second
derivatives). Used in second-order steps on CPU only (`second_order_step`, `EXPLICIT_BACKWARD_DEVICES`): that is
where it was measured faster, 1.02-1.13x per vectorized train step (docs/benchmarks.md, "Convolution
derivatives"); first-order steps, CUDA and compiled graphs keep torch's own rules. Both the task-grouped forward
(models.grouped_conv2d, groups = tasks) and the per-task loops (models.Conv2d, groups = 1) take it.

The task-grouped forward's first inner step also runs its support pass at the shared filters (`_SharedConv`,
section below): as ordinary convolutions over all tasks' images wherever the products do not differ per task, on
CPU, in second-order and first-order steps (1.10x MAML 5w1s, 1.06x FOMAML and Reptile; docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

# The device types where second-order steps use these derivatives: measured faster on CPU (docs/benchmarks.md);
# scripts/bench_formulations.py convgrad sets it per variant to time both side by side (on CUDA too: gpu_check.sh).
EXPLICIT_BACKWARD_DEVICES: tuple[str, ...] = ("cpu",)
_in_second_order_step = False

Pair = tuple[int, int]


def _pair(value) -> Pair:
    return (value, value) if isinstance(value, int) else tuple(value)


@contextlib.contextmanager
def second_order_step(enabled: bool = True):
    """Inside: convolutions take this module's derivatives (`use_explicit_backward`). Around the inner loops whose
    backward is differentiated (second order: vectorized.adapt_and_query_grouped, and the per-task `adapt` of MAML,
    Meta-SGD and MAML++); elsewhere F.conv2d as it is, since a first-order step gains nothing from them
    (0.95-1.05x, docs/benchmarks.md)."""
    global _in_second_order_step
    previous, _in_second_order_step = _in_second_order_step, enabled
    try:
        yield
    finally:
        _in_second_order_step = previous


def in_second_order_step() -> bool:
    """Whether a `second_order_step` (not disabled by a nested first-order one) is running."""
    return _in_second_order_step


def use_explicit_backward(x: torch.Tensor, padding) -> bool:
    """Whether `grouped_conv2d` takes this module's Functions for `x`: inside `second_order_step`, on a device of
    EXPLICIT_BACKWARD_DEVICES, with numeric padding, in eager mode."""
    return (_in_second_order_step and x.device.type in EXPLICIT_BACKWARD_DEVICES
            and not isinstance(padding, str) and not torch.compiler.is_compiling())


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride: Pair, padding: Pair, dilation: Pair, groups: int):
        ctx.save_for_backward(x, weight)
        ctx.geometry = stride, padding, dilation, groups
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        if not torch.is_grad_enabled():  # a backward nobody differentiates (first order, the outer pass): torch's
            stride, padding, dilation, groups = ctx.geometry  # one fused call measured as fast or faster
            return (*torch.ops.aten.convolution_backward(
                gy, x, weight, [weight.shape[0]] if ctx.has_bias else None, list(stride), list(padding),
                list(dilation), False, [0, 0], groups,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]),
                None, None, None, None)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _InputGrad.apply(gy, weight, x.shape[2:], *ctx.geometry)
        if ctx.needs_input_grad[1]:
            gw = _WeightGrad.apply(x, gy, weight, *ctx.geometry)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


def _output_padding(size, out_size, kernel, stride, padding, dilation) -> list[int]:
    """The rows/columns a strided convolution skipped at the far edge: conv_transpose2d must restore them."""
    return [full - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for full, out, s, p, d, k in
            zip(size, out_size, stride, padding, dilation, kernel)]


class _InputGrad(torch.autograd.Function):
    """conv's input gradient for output gradient `gy`: a transposed convolution back to the input's size."""

    @staticmethod
    def forward(ctx, gy, weight, size, stride: Pair, padding: Pair, dilation: Pair, groups: int):
        ctx.save_for_backward(gy, weight)
        ctx.geometry = stride, padding, dilation, groups
        output_padding = _output_padding(size, gy.shape[2:], weight.shape[2:], stride, padding, dilation)
        return F.conv_transpose2d(gy, weight, None, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def backward(ctx, ggx):
        gy, weight = ctx.saved_tensors
        d_gy = d_weight = None
        if ctx.needs_input_grad[0]:
            d_gy = _Conv.apply(ggx, weight, None, *ctx.geometry)
        if ctx.needs_input_grad[1]:
            d_weight = _WeightGrad.apply(ggx, gy, weight, *ctx.geometry)
        return d_gy, d_weight, None, None, None, None, None


class _WeightGrad(torch.autograd.Function):
    """conv's filter gradient for input `x` and output gradient `gy`; `like` gives the filter's shape only."""

    @staticmethod
    def forward(ctx, x, gy, like, stride: Pair, padding: Pair, dilation: Pair, groups: int):
        ctx.save_for_backward(x, gy)
        ctx.geometry = stride, padding, dilation, groups
        return torch.ops.aten.convolution_backward(gy, x, like, None, list(stride), list(padding), list(dilation),
                                                   False, [0, 0], groups, [False, True, False])[1]

    @staticmethod
    def backward(ctx, ggw):
        x, gy = ctx.saved_tensors
        d_x = d_gy = None
        if ctx.needs_input_grad[0]:
            d_x = _InputGrad.apply(gy, ggw, x.shape[2:], *ctx.geometry)
        if ctx.needs_input_grad[1]:
            d_gy = _Conv.apply(x, ggw, None, *ctx.geometry)
        return d_x, d_gy, None, None, None, None, None


# ---- the first inner step: every task's filters are the same tensor ---------------------------------------------
# At inner step 0 each task's filters are an expanded view of the shared ones (stride 0 over tasks). Products that
# only apply the filters (the forward, the input gradient and its derivative in the images) then run as ordinary
# convolutions over all N*T images, which this CPU runs up to 2.3x faster than the grouped ones (stride-2 transposed
# convolution, 14x14, 11 tasks). Only filter gradients differ per task: inside the inner step (differentiated) they
# stay task-grouped; in the outer pass, whose filter gradient the expand sums over tasks anyway, each is one ordinary
# filter gradient over all images, spread evenly over the tasks' rows (the sum is the same up to float rounding).
# First-order steps take the inner gradient at detached per-task copies of the filters (leaves, still stride 0):
# there the forward and input gradient are shared too and every filter gradient is each task's own.
# scripts/bench_formulations.py firststep switches it off per variant to time both side by side.
SHARE_FIRST_STEP_FILTERS = True


def _expanded(value: torch.Tensor) -> bool:
    """`value` [T, ...] is one tensor expanded over the tasks, whose gradient the expand sums."""
    return value.grad_fn is not None and type(value.grad_fn).__name__.startswith("ExpandBackward")


def shared_filters(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding) -> bool | None:
    """None unless every task's filters (and biases) are one tensor (stride 0 over tasks) that `_SharedConv` can
    take on this device; then whether its outer-pass filter gradients may be summed over tasks (True: expanded
    views of the model's filters in a second-order step) or must be each task's own (False: leaves, the detached
    copies of a first-order step)."""
    values = [weight] + ([] if bias is None else [bias])
    if not (SHARE_FIRST_STEP_FILTERS and x.device.type in EXPLICIT_BACKWARD_DEVICES and not isinstance(padding, str)
            and not torch.compiler.is_compiling() and all(v.stride(0) == 0 and v.requires_grad for v in values)):
        return None
    if _in_second_order_step and all(_expanded(v) for v in values):
        return True
    if all(v.is_leaf for v in values):
        return False
    return None


def tasks_as_batch(x: torch.Tensor, tasks: int) -> torch.Tensor:
    """[N, T*C, H, W] -> [N*T, C, H, W] (a view)."""
    return x.reshape(x.shape[0] * tasks, -1, *x.shape[2:])


def batch_as_tasks(x: torch.Tensor, n: int) -> torch.Tensor:
    """[N*T, C, H, W] -> [N, T*C, H, W] (a view)."""
    return x.reshape(n, -1, *x.shape[2:])


def _spread_over_tasks(summed: torch.Tensor, tasks: int) -> torch.Tensor:
    """A [T, ...] gradient whose sum over tasks is `summed`: an expanded view of summed / T (no copy; 2 % faster
    MAML 5w1s step than a zero-filled tensor with `summed` in its first row, which gave the sum exactly)."""
    return (summed / tasks).expand(tasks, *summed.shape)


def _filter_shape(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like the grouped filters [T*Cout, Cin, k, k] (convolution_backward reads its shape only)."""
    return x.new_empty(1, 1, 1, 1).expand(weight.shape[0] * weight.shape[1], *weight.shape[2:])


def _grouped_filter_gradient(x, gy, weight, geometry) -> torch.Tensor:
    """Each task's own filter gradient [T, *filter] (differentiable: _WeightGrad)."""
    return _WeightGrad.apply(x, gy, _filter_shape(x, weight), *geometry, weight.shape[0]).view(weight.shape)


def _outer_filter_gradient(x, gy, weight, geometry, summed: bool) -> torch.Tensor:
    """The filter gradient [T, *filter] in a backward nobody differentiates: one ordinary filter gradient over all
    images spread over the tasks (`summed`), else each task's own."""
    stride, padding, dilation = (list(g) for g in geometry)
    tasks = weight.shape[0]
    if summed:
        gw = torch.ops.aten.convolution_backward(tasks_as_batch(gy, tasks), tasks_as_batch(x, tasks), weight[0],
                                                 None, stride, padding, dilation, False, [0, 0], 1,
                                                 [False, True, False])[1]
        return _spread_over_tasks(gw, tasks)
    return torch.ops.aten.convolution_backward(gy, x, _filter_shape(x, weight), None, stride, padding, dilation,
                                               False, [0, 0], tasks, [False, True, False])[1].view(weight.shape)


def _shared_input_grad(gy, weight, size, stride: Pair, padding: Pair, dilation: Pair) -> torch.Tensor:
    """The input gradient at filters shared by all tasks: one transposed convolution over all N*T output
    gradients."""
    output_padding = _output_padding(size, gy.shape[2:], weight.shape[3:], stride, padding, dilation)
    out = F.conv_transpose2d(tasks_as_batch(gy, weight.shape[0]), weight[0], None, stride, padding, output_padding,
                             1, dilation)
    return batch_as_tasks(out, gy.shape[0])


class _SharedConv(torch.autograd.Function):
    """conv of each task's images with its filters `weight` [T, Cout, Cin, k, k], all equal (`shared_filters`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: Pair, padding: Pair, dilation: Pair, summed: bool):
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.summed = (stride, padding, dilation), summed
        ctx.has_bias = bias is not None
        out = F.conv2d(tasks_as_batch(x, weight.shape[0]), weight[0], None if bias is None else bias[0], stride,
                       padding, dilation)
        return batch_as_tasks(out, x.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        tasks = weight.shape[0]
        need_x, need_w = ctx.needs_input_grad[:2]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        differentiated = torch.is_grad_enabled()
        if ctx.summed and not differentiated:  # the outer pass of a second-order step: one fused call, all images
            stride, padding, dilation = (list(g) for g in ctx.geometry)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                tasks_as_batch(gy, tasks), tasks_as_batch(x, tasks), weight[0],
                [weight.shape[1]] if ctx.has_bias else None, stride, padding, dilation, False, [0, 0], 1,
                [need_x, need_w, need_b])
            return (None if gx is None else batch_as_tasks(gx, x.shape[0]),
                    None if gw is None else _spread_over_tasks(gw, tasks),
                    None if gb is None else _spread_over_tasks(gb, tasks), None, None, None, None)
        # Differentiated (the inner step of a second-order step), or a first-order inner gradient: each task's own
        # filter gradient; the input gradient at the shared filters.
        gx = gw = gb = None
        if need_x:
            gx = (_SharedInputGrad.apply(gy, weight, x.shape[2:], *ctx.geometry, ctx.summed) if differentiated
                  else _shared_input_grad(gy, weight, x.shape[2:], *ctx.geometry))
        if need_w:
            gw = (_grouped_filter_gradient(x, gy, weight, ctx.geometry) if differentiated
                  else _outer_filter_gradient(x, gy, weight, ctx.geometry, False))
        if need_b:
            gb = gy.sum((0, 2, 3)).view(tasks, -1)
        return gx, gw, gb, None, None, None, None


class _SharedInputGrad(torch.autograd.Function):
    """_InputGrad for filters shared by all tasks (`_shared_input_grad`), differentiable."""

    @staticmethod
    def forward(ctx, gy, weight, size, stride: Pair, padding: Pair, dilation: Pair, summed: bool):
        ctx.save_for_backward(gy, weight)
        ctx.geometry, ctx.summed = (stride, padding, dilation), summed
        return _shared_input_grad(gy, weight, size, stride, padding, dilation)

    @staticmethod
    def backward(ctx, ggx):
        gy, weight = ctx.saved_tensors
        tasks, (stride, padding, dilation) = weight.shape[0], ctx.geometry
        d_gy = d_weight = None
        if not torch.is_grad_enabled():
            if ctx.needs_input_grad[0]:
                d_gy = batch_as_tasks(F.conv2d(tasks_as_batch(ggx, tasks), weight[0], None, stride, padding,
                                                dilation), gy.shape[0])
            if ctx.needs_input_grad[1]:
                d_weight = _outer_filter_gradient(ggx, gy, weight, ctx.geometry, ctx.summed)
            return d_gy, d_weight, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            d_gy = _SharedConv.apply(ggx, weight, None, *ctx.geometry, ctx.summed)
        if ctx.needs_input_grad[1]:
            d_weight = _grouped_filter_gradient(ggx, gy, weight, ctx.geometry)
        return d_gy, d_weight, None, None, None, None, None


def task_grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                        dilation) -> torch.Tensor:
    """Each task's convolution in the layout [N, T*C, H, W], with per-task filters `weight` [T, Cout, Cin, k, k]
    and biases [T, Cout]: `_SharedConv` where they are one tensor for all tasks (`shared_filters`), else
    `grouped_conv2d` with groups = T."""
    tasks = weight.shape[0]
    summed = shared_filters(x, weight, bias, padding)
    if summed is not None:
        return _SharedConv.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), summed)
    return grouped_conv2d(x, weight.reshape(-1, *weight.shape[2:]), None if bias is None else bias.reshape(-1),
                          stride, padding, dilation, tasks)


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                   groups: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), with this module's derivatives where
    `use_explicit_backward` says so."""
    if not use_explicit_backward(x, padding):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _Conv.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)
