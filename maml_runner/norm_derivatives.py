"""Transductive batch norm (training mode, no running statistics) with a hand-written double backward.

Why: second-order MAML differentiates batch norm's backward once more. Torch's rule for that
(`batchnorm_double_backward`) is a composite of some thirty elementwise passes and reductions over the activation;
on the 2-core CPU they were a visible share of a MAML 5w1s step (most of its `aten::mul` and `aten::sum` time).
The same derivative needs far fewer. Per channel, with M values, xhat = (x - mean) * rstd, the backward is

    gb = sum(gy),  gw = sum(gy * xhat),  gx = w * rstd * P(gy),  P(v) = v - mean(v) - xhat * mean(v * xhat)

P is symmetric (and is rstd times the Jacobian of xhat in x). Differentiating <ggx, gx> + ggw * gw + ggb * gb,
with s1 = sum(ggx), s2 = sum(ggx * xhat), u = P(ggx) and G = sum(gy * u) = sum(ggx * gy) - s1 * gb / M - s2 * gw / M:

    d gy = w * rstd * u + ggw * xhat + ggb
    d w  = rstd * G
    d x  = rstd * alpha * P(gy) - w * rstd^2 * (gw / M) * u - w * rstd^2 * G / M * xhat,
           alpha = ggw - w * rstd * s2 / M

i.e. three reductions and a few fused multiply-adds. Torch's own kernels still run the forward and the first
backward (`native_batch_norm`, `native_batch_norm_backward`), and a backward nobody differentiates (the outer pass).
Same values up to float rounding (float64 tests against F.batch_norm's first, second and third derivatives). Used
where grouped_conv's derivatives are (inside `second_order_step`, in eager mode) on the devices in
EXPLICIT_BACKWARD_DEVICES, for float32/float64 inputs, and on every device where torch's own rule fails (no gamma,
beta adapted); elsewhere F.batch_norm as it is. With hardware.compile=true (second-order algorithms) the double
backward runs as a torch.compile'd kernel (`compile_kernels`): it is never differentiated itself, so torch.compile
can fuse its passes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped_conv import in_second_order_step

# Measured faster on CPU (docs/benchmarks.md, "Batch-norm derivatives"); scripts/bench_formulations.py bngrad sets
# it per variant to time both side by side (on CUDA too: gpu_check.sh).
EXPLICIT_BACKWARD_DEVICES: tuple[str, ...] = ("cpu",)
_DIMS = (0, 2, 3)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, 1, 1)


def use_explicit_backward(x: torch.Tensor, weight: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None) -> bool:
    """Whether `transductive_batch_norm` takes this module's Functions for `x` (images [N, C, H, W]): inside a
    second-order step, for float32/float64 images in eager mode, on the devices of EXPLICIT_BACKWARD_DEVICES, and on
    any device without gamma when beta is differentiated (model.bn_scale=false with beta adapted), where torch
    2.14's own double backward fails ("Expected a proper Tensor but got None"; tests/test_norm_derivatives.py)."""
    if not (in_second_order_step() and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling()):
        return False
    return x.device.type in EXPLICIT_BACKWARD_DEVICES or (weight is None and bias is not None and bias.requires_grad)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        y, mean, invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)[:3]
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, invstd = ctx.saved_tensors
        if not torch.is_grad_enabled():  # nobody differentiates this backward: torch's fused kernel
            return (*torch.ops.aten.native_batch_norm_backward(
                gy, x, _weight_or_ones(weight, mean), None, None, mean, invstd, True, ctx.eps,
                list(ctx.needs_input_grad[:3])), None)
        gx, gw, gb = _BatchNormBackward.apply(gy, x, weight, mean, invstd, ctx.eps)
        return gx, gw if ctx.needs_input_grad[1] else None, gb if ctx.needs_input_grad[2] else None, None


def _weight_or_ones(weight: torch.Tensor | None, mean: torch.Tensor) -> torch.Tensor:
    """Gamma, or ones without it (model.bn_scale=false): CUDA's batch-norm backward fails on a missing weight
    ("tensor does not have a device", torch 2.11 on an H200); gw = sum(gy * xhat) and gx do not change."""
    return torch.ones_like(mean) if weight is None else weight


class _BatchNormBackward(torch.autograd.Function):
    """(gy, x, weight) -> (gx, gw, gb), batch norm's backward; its own backward is the formula in the docstring."""

    @staticmethod
    def forward(ctx, gy, x, weight, mean, invstd, eps: float):
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(gy, x, _weight_or_ones(weight, mean), None, None,
                                                               mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(gy, x, weight, mean, invstd, gw, gb)
        ctx.eps = eps
        return gx, gw, gb

    @staticmethod
    def backward(ctx, ggx, ggw, ggb):
        gy, x, weight, mean, invstd, gw, gb = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # differentiated again (third order): every term as a function of x and gy
            var, mean = torch.var_mean(x, _DIMS, unbiased=False)
            invstd = torch.rsqrt(var + ctx.eps)
            xhat = (x - _per_channel(mean)) * _per_channel(invstd)
            return (*_double_backward(gy, xhat, weight, invstd, (gy * xhat).sum(_DIMS), gy.sum(_DIMS), ggx, ggw,
                                      ggb, needs), None, None, None)
        kernel = _compiled_kernel or _double_backward_from_x
        return (*kernel(gy, x, weight, mean, invstd, gw, gb, ggx, ggw, ggb, needs), None, None, None)


def _double_backward_from_x(gy, x, weight, mean, invstd, gw, gb, ggx, ggw, ggb, needs):
    """`_double_backward` with xhat computed from x and the saved statistics (the kernel hardware.compile=true
    compiles)."""
    xhat = (x - _per_channel(mean)).mul_(_per_channel(invstd))
    return _double_backward(gy, xhat, weight, invstd, gw, gb, ggx, ggw, ggb, needs)


def _double_backward(gy, xhat, weight, invstd, gw, gb, ggx, ggw, ggb, needs):
    """(d gy, d x, d weight) of <ggx, gx> + <ggw, gw> + <ggb, gb> (the module docstring's formula); None where
    `needs` (gy, x, weight) is False or the term does not exist."""
    m = xhat.numel() // xhat.shape[1]
    w_rstd = invstd if weight is None else weight * invstd
    a, bq = gb / m, gw / m  # mean(gy), mean(gy * xhat)
    zero = torch.zeros_like(invstd)
    if ggx is not None:
        s1, s2, s3 = ggx.sum(_DIMS), (ggx * xhat).sum(_DIMS), (ggx * gy).sum(_DIMS)
        big_g = s3 - a * s1 - bq * s2
    else:
        s1 = s2 = big_g = zero
    ggw = zero if ggw is None else ggw
    ggb = zero if ggb is None else ggb
    # u = P(ggx) = ggx - s1 / m - xhat * s2 / m is expanded into each result, so it is never materialised.
    d_gy = d_x = d_w = None
    if needs[0]:  # w_rstd * u + ggw * xhat + ggb
        d_gy = torch.addcmul(_per_channel(ggb - w_rstd * s1 / m), xhat, _per_channel(ggw - w_rstd * s2 / m))
        if ggx is not None:
            d_gy = torch.addcmul(d_gy, ggx, _per_channel(w_rstd))
    if needs[1]:  # c_gy * P(gy) + c_u * u - w_rstd * rstd * G / m * xhat
        c_gy = invstd * (ggw - w_rstd * s2 / m)  # rstd * alpha
        c_u = -w_rstd * invstd * bq
        c_xhat = -c_gy * bq - w_rstd * invstd * big_g / m - c_u * s2 / m
        d_x = torch.addcmul(_per_channel(-c_gy * a - c_u * s1 / m), gy, _per_channel(c_gy))
        d_x = torch.addcmul(d_x, xhat, _per_channel(c_xhat))
        if ggx is not None:
            d_x = torch.addcmul(d_x, ggx, _per_channel(c_u))
    if needs[2]:
        d_w = invstd * big_g
    return d_gy, d_x, d_w


# hardware.compile=true with a second-order algorithm on CPU: `_double_backward_from_x` under torch.compile (one
# fused C++ loop nest per shape instead of some twelve memory-bound passes; see `compile_kernels`).
_compiled_kernel = None
RECOMPILE_LIMIT = 64


def raise_recompile_limit() -> None:
    """hardware.compile=true compiles one graph per shape and dtype (here: 4 layers x chunk sizes per dataset; the
    first-order forward: also per inner step), more across the runs of one process (sweeps) or float64 checks.
    Past torch's default limit of 8 graphs per function, new shapes would silently run eagerly."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


def compile_kernels(enabled: bool = True) -> None:
    """Run batch norm's double backward (outside third order) as a torch.compile'd kernel (`enabled`) or eagerly.
    torch.compile cannot differentiate twice, but this kernel is never differentiated: it runs inside the outer
    backward with gradients off. Shapes are compiled as they come (each layer's, each chunk's; the first
    meta-batch pays a few seconds per shape, less from the on-disk cache)."""
    global _compiled_kernel
    if enabled:
        raise_recompile_limit()
    _compiled_kernel = torch.compile(_double_backward_from_x, dynamic=False) if enabled else None


def transductive_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                            eps: float) -> torch.Tensor:
    """F.batch_norm(x, None, None, weight, bias, True, 0.0, eps), with this module's double backward where
    `use_explicit_backward` says so."""
    if not use_explicit_backward(x, weight, bias):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return _BatchNorm.apply(x, weight, bias, eps)
