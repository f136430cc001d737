"""norm_derivatives: transductive batch norm with a hand-written double backward, against torch's own and against
finite differences."""
import pytest
import torch
import torch.nn.functional as F

from maml_runner import norm_derivatives
from maml_runner.grouped_conv import second_order_step
from maml_runner.norm_derivatives import transductive_batch_norm, use_explicit_backward

# (shape, gamma, beta, eps): an odd spatial size, one image, gamma and beta each present or absent, Finn's eps.
CASES = [((3, 4, 5, 5), True, True, 1e-5), ((2, 3, 4, 3), False, True, 1e-3), ((4, 2, 3, 3), True, False, 1e-5),
         ((1, 3, 4, 4), False, False, 1e-5)]


def _inputs(shape, gamma, beta, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=torch.float64, generator=generator, requires_grad=True)
    channels = shape[1]
    w = (torch.rand(channels, dtype=torch.float64, generator=generator) + 0.5).requires_grad_() if gamma else None
    b = torch.randn(channels, dtype=torch.float64, generator=generator, requires_grad=True) if beta else None
    return x, w, b


def _ours(eps):
    def norm(x, w, b):
        with second_order_step():
            out = transductive_batch_norm(x, w, b, eps)
        assert type(out.grad_fn).__name__ == "_BatchNormBackward"  # this module's, not torch's
        return out
    return norm


@pytest.mark.parametrize("shape,gamma,beta,eps", CASES)
def test_first_second_and_third_derivatives_pass_finite_differences(shape, gamma, beta, eps):
    x, w, b = _inputs(shape, gamma, beta)
    present = [t for t in (x, w, b) if t is not None]
    norm = _ours(eps)

    def call(*args):
        it = iter(args)
        return norm(next(it), next(it) if gamma else None, next(it) if beta else None)

    def backward(*args):  # its derivatives with respect to the inputs, for a random output gradient (third order)
        gy, inputs = args[-1], args[:-1]
        with second_order_step():
            return torch.autograd.grad(call(*inputs), inputs, gy, create_graph=True)

    gy = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(call, present)
    assert torch.autograd.gradgradcheck(call, present)
    assert torch.autograd.gradgradcheck(backward, (*present, gy))


def _second_order_quantities(norm, x, w, b):
    """What second-order MAML differentiates: a loss after one inner step on gamma, beta and the input, and its
    gradients with respect to everything before the step."""
    params = [t for t in (w, b) if t is not None]
    loss = (norm(x, w, b).tanh() ** 2).sum()
    gradients = torch.autograd.grad(loss, [x] + params, create_graph=True)
    stepped = iter(p - 0.3 * g for p, g in zip(params, gradients[1:]))
    w2 = next(stepped) if w is not None else None
    b2 = next(stepped) if b is not None else None
    outer = (norm(x + 0.3 * gradients[0], w2, b2).sin() * torch.linspace(-1, 2, x.numel()).view_as(x)).sum()
    return [loss, *gradients, outer, *torch.autograd.grad(outer, [x] + params)]


@pytest.mark.parametrize("shape,gamma,beta,eps", [case for case in CASES if case[1]])
def test_same_numbers_as_torchs_rules_through_an_inner_step(shape, gamma, beta, eps):
    x, w, b = _inputs(shape, gamma, beta, seed=2)
    ours = _second_order_quantities(_ours(eps), x, w, b)
    torchs = _second_order_quantities(lambda *a: F.batch_norm(a[0], None, None, a[1], a[2], True, 0.0, eps), x, w, b)
    assert len(ours) == len(torchs) == (8 if beta else 6)
    for a, b_ in zip(ours, torchs):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_without_gamma_an_adapted_beta_works_where_torchs_rule_fails():
    """model.bn_scale=false with beta adapted: torch 2.14's double backward fails when gamma is None and beta's
    gradient is differentiated; this module's gives the finite-difference derivatives (test above) and the same
    numbers as torch's rule with gamma = 1 fixed."""
    x, _, b = _inputs((3, 4, 5, 5), False, True, seed=3)
    with pytest.raises(RuntimeError, match="Expected a proper Tensor"):
        _second_order_quantities(lambda *a: F.batch_norm(a[0], None, None, None, a[2], True, 0.0, 1e-3), x, None, b)
    ours = _second_order_quantities(_ours(1e-3), x, None, b)
    ones = torch.ones(4, dtype=torch.float64)  # gamma = 1, not a parameter
    torchs = _second_order_quantities(lambda *a: F.batch_norm(a[0], None, None, ones, a[2], True, 0.0, 1e-3), x,
                                      None, b)
    for a, b_ in zip(ours, torchs):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_used_only_where_measured(monkeypatch):
    """Second-order steps on CPU for float images, and on every device without gamma when beta is differentiated;
    first-order steps, other dtypes and shapes, CUDA and the switched-off module otherwise get F.batch_norm."""
    x = torch.randn(2, 3, 4, 4)
    w = torch.ones(3, requires_grad=True)
    assert not use_explicit_backward(x)  # outside a second-order step
    assert type(transductive_batch_norm(x, w, None, 1e-5).grad_fn).__name__ == "NativeBatchNormBackward0"
    with second_order_step():
        assert use_explicit_backward(x) and use_explicit_backward(x.double())
        with second_order_step(False):  # nested first-order step (MAML++'s annealing phase)
            assert not use_explicit_backward(x)
        assert not use_explicit_backward(x.bfloat16())  # autocast: torch's own
        assert not use_explicit_backward(x.flatten(2))  # not images
        if torch.cuda.is_available():
            assert not use_explicit_backward(x.cuda())
        monkeypatch.setattr(norm_derivatives, "EXPLICIT_BACKWARD_DEVICES", ())  # as on CUDA today
        assert not use_explicit_backward(x, w, None)
        beta = torch.zeros(3, requires_grad=True)
        assert use_explicit_backward(x, None, beta)  # without gamma torch's rule fails: on every device
        assert not use_explicit_backward(x, None, beta.detach())  # beta not differentiated: torch's rule works
    assert not use_explicit_backward(x, None, torch.zeros(3, requires_grad=True))  # first order: no double backward


def test_second_order_steps_of_the_fast_path_use_it(monkeypatch):
    """MAML's vectorized step differentiates this module's batch-norm backward when second order, and runs none
    of it when first order."""
    from maml_runner.algorithms import vectorized
    from maml_runner.data.base import TaskBatch
    from maml_runner.models import Conv4

    seen = []
    original = norm_derivatives._BatchNormBackward.backward
    monkeypatch.setattr(norm_derivatives._BatchNormBackward, "backward",
                        staticmethod(lambda *a: seen.append(1) or original(*a)))
    model = Conv4(3, image_size=8)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 1, 8, 8, generator=generator)
    labels = torch.arange(3).repeat(2, 1)
    tasks = TaskBatch(images, labels, images, labels)
    for first_order, expected in ((True, 0), (False, 4)):  # the 4 batch norms of the support pass
        seen.clear()
        losses, _ = vectorized.adapt_and_query_grouped(model, tasks, 0.1, 1, first_order, F.cross_entropy)
        losses.sum().backward()
        assert len(seen) == expected


@pytest.mark.slow
@pytest.mark.parametrize("shape,gamma,beta,eps", [CASES[0], CASES[1]])
def test_the_compiled_kernel_gives_the_eager_numbers(monkeypatch, shape, gamma, beta, eps):
    """hardware.compile=true with a second-order algorithm (norm_derivatives.compile_kernels): the double backward
    runs as a torch.compile'd kernel, with the eager numbers through an inner step (float64)."""
    calls = []
    x, w, b = _inputs(shape, gamma, beta, seed=5)
    eager = _second_order_quantities(_ours(eps), x, w, b)
    norm_derivatives.compile_kernels(True)
    try:
        compiled = norm_derivatives._compiled_kernel
        monkeypatch.setattr(norm_derivatives, "_compiled_kernel", lambda *a: calls.append(1) or compiled(*a))
        ours = _second_order_quantities(_ours(eps), x, w, b)
    finally:
        norm_derivatives.compile_kernels(False)
    assert norm_derivatives._compiled_kernel is None
    assert len(calls) == 1  # the inner step's batch norm, differentiated twice
    for a, b_ in zip(eager, ours):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_the_compiled_kernel_keeps_compiling_past_torchs_default_of_eight_shapes():
    """A run compiles one graph per layer and chunk shape (more across the runs of a sweep in one process); past
    torch.compile's default recompile limit (8) the kernel would silently fall back to eager."""
    from torch._dynamo.utils import counters
    norm_derivatives.compile_kernels(True)
    try:
        before = counters["stats"]["unique_graphs"]
        for size in range(2, 12):  # ten shapes
            x, gy, ggx = (torch.randn(2, 3, size, 2, dtype=torch.float64) for _ in range(3))
            c = torch.rand(3, dtype=torch.float64) + 0.5
            args = (gy, x, c, 0.1 * c, c, c, c, ggx, c, c, (True, True, True))
            for compiled, eager in zip(norm_derivatives._compiled_kernel(*args),
                                       norm_derivatives._double_backward_from_x(*args)):
                torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
        assert counters["stats"]["unique_graphs"] - before == 10
    finally:
        norm_derivatives.compile_kernels(False)
