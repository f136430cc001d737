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


class _InputGrad(torch.autograd.Function):
    """conv's input gradient for output gradient `gy`: a transposed convolution back to the input's size."""

    @staticmethod
    def forward(ctx, gy, weight, size, stride: Pair, padding: Pair, dilation: Pair, groups: int):
        ctx.save_for_backward(gy, weight)
        ctx.geometry = stride, padding, dilation, groups
        # The rows/columns a strided convolution skipped at the far edge: conv_transpose2d must restore them.
        output_padding = [full - ((out - 1) * s - 2 * p + d * (k - 1) + 1) for full, out, s, p, d, k in
                          zip(size, gy.shape[2:], stride, padding, dilation, weight.shape[2:])]
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


def grouped_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                   groups: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride, padding, dilation, groups), with this module's derivatives where
    `use_explicit_backward` says so."""
    if not use_explicit_backward(x, padding):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _Conv.apply(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups)
