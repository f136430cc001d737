"""grouped_conv: the task-grouped convolution whose derivatives (any order) are convolutions, against torch's own."""
import pytest
import torch
import torch.nn.functional as F

from maml_runner import grouped_conv
from maml_runner.grouped_conv import grouped_conv2d, second_order_step, task_grouped_conv2d, use_explicit_backward

# (input side, input channels per group, groups, stride, padding, dilation, bias): odd and even sides, so that a
# strided convolution drops an edge row that the transposed convolution must restore (output_padding).
GEOMETRIES = [(7, 2, 3, 2, 1, 1, True), (6, 2, 2, 2, 1, 1, False), (5, 1, 2, 1, 0, 1, True),
              (8, 3, 1, 2, 0, 1, True), (9, 2, 2, 1, 2, 2, False)]


def _inputs(side, cin, groups, bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, groups * cin, side, side, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(groups * 3, cin, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(groups * 3, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize("side,cin,groups,stride,padding,dilation,bias", GEOMETRIES)
def test_first_and_second_derivatives_pass_finite_differences(side, cin, groups, stride, padding, dilation, bias):
    x, w, b = _inputs(side, cin, groups, bias)
    inputs = (x, w) + ((b,) if bias else ())

    def conv(x, w, b=None):
        out = grouped_conv2d(x, w, b, stride, padding, dilation, groups)
        assert type(out.grad_fn).__name__ == "_ConvBackward"  # this module's, not torch's
        return out

    with second_order_step():
        assert torch.autograd.gradcheck(conv, inputs)
        assert torch.autograd.gradgradcheck(conv, inputs)


def _second_order_quantities(conv, x, w, b):
    """What second-order MAML differentiates: the loss after one inner step on the filters, and its gradients
    with respect to the input and the filters before the step."""
    params = [w] + ([b] if b is not None else [])
    loss = (conv(x, w, b).tanh() ** 2).sum()
    gradients = torch.autograd.grad(loss, [x] + params, create_graph=True)
    stepped = [p - 0.1 * g for p, g in zip(params, gradients[1:])] + [None]
    outer = (conv(x + 0.1 * gradients[0], stepped[0], stepped[1]).sin()).sum()
    return [loss, *gradients, outer, *torch.autograd.grad(outer, [x] + params)]


@pytest.mark.parametrize("side,cin,groups,stride,padding,dilation,bias", GEOMETRIES)
def test_same_numbers_as_torchs_rules_through_an_inner_step(side, cin, groups, stride, padding, dilation, bias):
    x, w, b = _inputs(side, cin, groups, bias, seed=1)
    with second_order_step():
        ours = _second_order_quantities(lambda *a: grouped_conv2d(*a, stride, padding, dilation, groups), x, w, b)
    torchs = _second_order_quantities(lambda *a: F.conv2d(*a, stride, padding, dilation, groups), x, w, b)
    assert len(ours) == len(torchs) == (8 if bias else 6)
    for a, b_ in zip(ours, torchs):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_the_input_gradient_is_skipped_where_the_input_needs_none():
    """The first layer's input is images: no transposed convolution is run for it (and none is returned)."""
    x, w, b = _inputs(6, 1, 2, True)
    x = x.detach()
    with second_order_step():
        out = grouped_conv2d(x, w, b, 2, 1, 1, 2)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_ConvBackward"
    gw, = torch.autograd.grad(out.sum(), [w])
    torch.testing.assert_close(gw, torch.autograd.grad(F.conv2d(x, w, b, 2, 1, 1, 2).sum(), [w])[0])
    assert x.grad is None


def test_used_only_where_measured(monkeypatch):
    """Second-order steps on CPU with numeric padding; first-order steps, CUDA and the switched-off module get
    F.conv2d."""
    x = torch.zeros(1, 2, 4, 4)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    assert not use_explicit_backward(x, 1)  # outside a second-order step
    assert type(grouped_conv2d(x, w, None, 1, 1, 1, 2).grad_fn).__name__ == "ConvolutionBackward0"
    with second_order_step():
        assert use_explicit_backward(x, 1)
        with second_order_step(False):  # nested first-order step (MAML++'s annealing phase)
            assert not use_explicit_backward(x, 1)
        assert use_explicit_backward(x, 1)
        assert not use_explicit_backward(x, "same")  # string padding: torch's own convolution
        if torch.cuda.is_available():
            assert not use_explicit_backward(x.cuda(), 1)
        monkeypatch.setattr(grouped_conv, "EXPLICIT_BACKWARD_DEVICES", ())
        assert not use_explicit_backward(x, 1)
        assert type(grouped_conv2d(x, w, None, 1, 1, 1, 2).grad_fn).__name__ == "ConvolutionBackward0"
    assert not use_explicit_backward(x, 1)


def test_second_order_steps_of_the_fast_path_use_it(monkeypatch):
    """MAML's vectorized step takes this module's convolutions when second order (the support pass at the shared
    filters, the query pass at each task's adapted ones); when first order, only the shared support pass."""
    from maml_runner.algorithms import vectorized
    from maml_runner.data.base import TaskBatch
    from maml_runner.models import Conv4

    seen = {"_Conv": [], "_SharedConv": []}
    for name in seen:  # counted in the forward passes only (the backward passes call them too, with grad mode off)
        function = getattr(grouped_conv, name)
        monkeypatch.setattr(function, "apply", lambda *a, _f=function.apply, _s=seen[name]:
                            _s.append(torch.is_grad_enabled()) or _f(*a))
    model = Conv4(3, image_size=8)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 1, 8, 8, generator=generator)
    labels = torch.arange(3).repeat(2, 1)
    tasks = TaskBatch(images, labels, images, labels)
    for first_order, grouped in ((True, 0), (False, 4)):  # 4 convolutions in each pass
        for calls in seen.values():
            calls.clear()
        losses, _ = vectorized.adapt_and_query_grouped(model, tasks, 0.1, 1, first_order, F.cross_entropy)
        losses.sum().backward()
        assert sum(seen["_SharedConv"]) == 4 and sum(seen["_Conv"]) == grouped


# ---- the first inner step's shared filters ------------------------------------------------------------------------
TASKS = 3


def _shared_inputs(side, cin, bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, TASKS * cin, side, side, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(4, cin, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True) if bias else None
    return x, w, b


def _per_task(value):
    return None if value is None else value.expand(TASKS, *value.shape)


@pytest.mark.parametrize("side,cin,groups,stride,padding,dilation,bias", GEOMETRIES)
def test_shared_filters_pass_finite_differences(side, cin, groups, stride, padding, dilation, bias):
    """The filters as the vectorized step has them at inner step 0: one tensor expanded over the tasks."""
    x, w, b = _shared_inputs(side, cin, bias)
    inputs = (x, w) + ((b,) if bias else ())

    def conv(x, w, b=None):
        out = task_grouped_conv2d(x, _per_task(w), _per_task(b), stride, padding, dilation)
        assert type(out.grad_fn).__name__ == "_SharedConvBackward"
        return out

    with second_order_step():
        assert torch.autograd.gradcheck(conv, inputs)
        assert torch.autograd.gradgradcheck(conv, inputs)


@pytest.mark.parametrize("side,cin,groups,stride,padding,dilation,bias", GEOMETRIES)
def test_shared_filters_give_torchs_numbers_through_an_inner_step(side, cin, groups, stride, padding, dilation,
                                                                  bias):
    """Each task's inner gradient (per task, not summed), the adapted filters' query loss and its gradient in
    the shared filters and the images: the same as F.conv2d with groups = tasks on the expanded filters."""
    x, w, b = _shared_inputs(side, cin, bias, seed=1)

    def quantities(conv):
        per_task = [_per_task(w), _per_task(b)] if bias else [_per_task(w)]
        loss = (conv(x, *per_task).tanh() ** 2).sum()
        gradients = torch.autograd.grad(loss, [x] + per_task, create_graph=True)
        stepped = [p - 0.1 * g for p, g in zip(per_task, gradients[1:])] + [None]
        outer = conv(x + 0.1 * gradients[0], stepped[0], stepped[1]).sin().sum()
        return [loss, *gradients, outer, *torch.autograd.grad(outer, [x, w] + ([b] if bias else []))]

    with second_order_step():
        ours = quantities(lambda x, w, b=None: task_grouped_conv2d(x, w, b, stride, padding, dilation))
    torchs = quantities(lambda x, w, b=None: F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if b is None else
                                                      b.reshape(-1), stride, padding, dilation, TASKS))
    assert ours[2].shape == (TASKS, 4, cin, 3, 3) and not torch.allclose(ours[2][0], ours[2][1])  # per task
    for a, b_ in zip(ours, torchs):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_shared_filters_only_where_they_are_one_expanded_tensor():
    """Expanded views in a second-order step: filter gradients summed over tasks in the outer pass. Detached
    per-task copies (leaves, first-order steps): each task's own. Adapted filters: the grouped convolution."""
    from maml_runner.grouped_conv import shared_filters
    x, w, _ = _shared_inputs(6, 2, False)
    leaf = _per_task(w).detach().requires_grad_()
    with second_order_step():
        assert shared_filters(x, _per_task(w), None, 1) is True
        assert shared_filters(x, leaf, None, 1) is False
        assert shared_filters(x, _per_task(w) * 0.5, None, 1) is None  # adapted: no longer one tensor
        assert shared_filters(x, _per_task(w), None, "same") is None
        assert type(task_grouped_conv2d(x, _per_task(w), None, 1, 1, 1).grad_fn).__name__ == "_SharedConvBackward"
        assert type(task_grouped_conv2d(x, _per_task(w) * 0.5, None, 1, 1, 1).grad_fn).__name__ == "_ConvBackward"
    assert shared_filters(x, _per_task(w), None, 1) is None  # expanded outside a second-order step: F.conv2d
    assert type(task_grouped_conv2d(x, _per_task(w), None, 1, 1, 1).grad_fn).__name__ == "ConvolutionBackward0"
    assert shared_filters(x, leaf, None, 1) is False
    assert type(task_grouped_conv2d(x, leaf, None, 1, 1, 1).grad_fn).__name__ == "_SharedConvBackward"


@pytest.mark.parametrize("side,cin,groups,stride,padding,dilation,bias", GEOMETRIES)
def test_detached_shared_filters_give_each_tasks_own_gradients(side, cin, groups, stride, padding, dilation, bias):
    """A first-order inner step: per-task gradients at detached copies of the filters (leaves of stride 0) and
    the gradient in the images, as F.conv2d with groups = tasks gives them (float64)."""
    x, w, b = _shared_inputs(side, cin, bias, seed=4)
    leaves = [_per_task(w).detach().requires_grad_()] + ([_per_task(b).detach().requires_grad_()] if bias else [])
    weight = torch.randn(2, TASKS * 4, *F.conv2d(x[:, :cin], w, None, stride, padding, dilation).shape[2:],
                         dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def gradients(conv):
        out = conv(x, *leaves)
        return torch.autograd.grad((out.tanh() * weight).sum(), [x] + leaves)

    ours = gradients(lambda x, w, b=None: task_grouped_conv2d(x, w, b, stride, padding, dilation))
    torchs = gradients(lambda x, w, b=None: F.conv2d(x, w.reshape(-1, *w.shape[2:]), None if b is None else
                                                     b.reshape(-1), stride, padding, dilation, TASKS))
    assert not torch.allclose(ours[1][0], ours[1][1])  # each task's own
    for a, b_ in zip(ours, torchs):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
