"""Each algorithm's meta-step does what its paper says, checked on tiny networks with exact arithmetic."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_config
from maml_runner.algorithms import available_algorithms, build_algorithm
from maml_runner.data import build_sources
from maml_runner.data.base import Task, TaskBatch
from maml_runner.models import build_model

ALGORITHMS = available_algorithms()  # conf/algorithm/*.yaml


def make(algorithm: str, *overrides: str, iterations: int = 100, dtype=torch.float32):
    # conv4's hidden is one width, the MLP's a list: the typed config (schema.py) takes whichever the model has
    small = [] if any(o.startswith("model.hidden=") for o in overrides) else ["model.hidden=[8,8]"]
    cfg = compose_config([f"algorithm={algorithm}", *small, f"train.iterations={iterations}", *overrides])
    torch.manual_seed(0)
    sources = build_sources(cfg.dataset)
    model = build_model(cfg.model, cfg.dataset).to(dtype)
    algo = build_algorithm(model, cfg.algorithm, sources["train"].task_type, iterations,
                           train_source=sources["train"]).to(dtype)
    return algo, sources


def sinusoid_task(seed: int, dtype=torch.float64) -> Task:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(10, 1, generator=g, dtype=dtype) * 10 - 5
    amplitude, phase = 0.5 + 4 * torch.rand(1, generator=g).item(), 3 * torch.rand(1, generator=g).item()
    y = amplitude * torch.sin(x - phase)
    return Task(x[:5], y[:5], x[5:], y[5:])


def meta_gradient(algo, task, iteration=0) -> torch.Tensor:
    algo.zero_grad(set_to_none=True)
    loss, _ = algo.query_loss(task, iteration)
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in algo.model.parameters()])


def query_loss_after_one_step(model, params, task, lr):
    """L_query(theta - lr * grad L_support(theta)) written out with torch.func (the textbook MAML objective)."""
    support = F.mse_loss(torch.func.functional_call(model, params, (task.support_x,)), task.support_y)
    grads = torch.autograd.grad(support, list(params.values()), create_graph=True)
    adapted = {n: p - lr * g for (n, p), g in zip(params.items(), grads)}
    return F.mse_loss(torch.func.functional_call(model, adapted, (task.query_x,)), task.query_y)


def test_maml_meta_gradient_matches_finite_differences():
    algo, _ = make("maml", "algorithm.inner_lr=0.01", dtype=torch.float64)
    task = sinusoid_task(1)
    analytic = meta_gradient(algo, task)
    model = copy.deepcopy(algo.model)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def objective(vector):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = math.prod(shape)
            params[name] = vector[offset:offset + size].view(shape).clone().requires_grad_(True)
            offset += size
        return query_loss_after_one_step(model, params, task, 0.01).item()

    eps = 1e-6
    numeric = torch.zeros_like(flat)
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = eps
        numeric[i] = (objective(flat + step) - objective(flat - step)) / (2 * eps)
    relative = (analytic - numeric).norm() / numeric.norm()
    assert relative < 1e-3, f"relative error {relative:.2e}"
    # The second-order term matters here: the first-order gradient is measurably different.
    first_order, _ = make("fomaml", "algorithm.inner_lr=0.01", dtype=torch.float64)
    assert (meta_gradient(first_order, task) - numeric).norm() / numeric.norm() > 1e-3


def test_fomaml_meta_gradient_is_the_query_gradient_at_the_adapted_parameters():
    algo, _ = make("fomaml", "algorithm.inner_lr=0.05", dtype=torch.float64)
    task = sinusoid_task(2)
    model = copy.deepcopy(algo.model)
    support = F.mse_loss(model(task.support_x), task.support_y)
    grads = torch.autograd.grad(support, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= 0.05 * g
    query = F.mse_loss(model(task.query_x), task.query_y)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(query, list(model.parameters()))])
    torch.testing.assert_close(meta_gradient(algo, task), expected, rtol=1e-10, atol=1e-12)


def test_maml_first_order_switch_equals_fomaml():
    task = sinusoid_task(3)
    maml_fo, _ = make("maml", "algorithm.first_order=true", dtype=torch.float64)
    fomaml, _ = make("fomaml", dtype=torch.float64)
    torch.testing.assert_close(meta_gradient(maml_fo, task), meta_gradient(fomaml, task))


def test_anil_inner_loop_adapts_only_the_head_and_outer_loop_learns_the_body():
    algo, _ = make("anil", "algorithm.inner_lr=0.1", dtype=torch.float64)
    task = sinusoid_task(4)
    adapted = algo.adapt(task, 2, iteration=0)
    assert adapted.body is algo.model.body  # the very same (unadapted) body
    assert not torch.equal(adapted.head.weight, algo.model.head.weight)
    body_before = [p.detach().clone() for p in algo.model.body.parameters()]
    gradient = meta_gradient(algo, task)
    body_size = sum(p.numel() for p in algo.model.body.parameters())
    assert gradient[:body_size].abs().max() > 0  # the meta-gradient reaches the body
    assert all(torch.equal(a, b) for a, b in zip(body_before, algo.model.body.parameters()))


def test_reptile_update_is_meta_step_size_times_mean_adapted_minus_initial():
    algo, _ = make("reptile", "algorithm.inner_lr=0.02", "algorithm.inner_steps=3", "algorithm.meta_step_size=0.5",
                   iterations=10, dtype=torch.float64)
    tasks = [sinusoid_task(5), sinusoid_task(6)]
    initial = [p.detach().clone() for p in algo.model.parameters()]
    adapted = []
    for task in tasks:  # theta' by hand: 3 full-batch SGD steps on the task's support + query points
        model = copy.deepcopy(algo.model)
        x, y = torch.cat([task.support_x, task.query_x]), torch.cat([task.support_y, task.query_y])
        for _ in range(3):
            grads = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= 0.02 * g
        adapted.append([p.detach() for p in model.parameters()])
    algo.train_step(TaskBatch.stack(tasks), iteration=0)
    for theta, after, a, b in zip(initial, algo.model.parameters(), *adapted):
        torch.testing.assert_close(after.detach(), theta + 0.5 * ((a + b) / 2 - theta))
    # The meta step size anneals linearly to 0: after 1 of 10 iterations it is 0.5 * 0.9.
    assert algo.optimizer.param_groups[0]["lr"] == pytest.approx(0.45)


def test_reptile_with_one_inner_step_warns_that_it_is_joint_training(caplog):
    with caplog.at_level(logging.WARNING, logger="maml_runner.algorithms.reptile"):
        make("reptile", "algorithm.inner_steps=1")
        assert [r.getMessage() for r in caplog.records if "joint training" in r.getMessage()]
        caplog.clear()
        make("reptile", "algorithm.inner_steps=2")
        assert not caplog.records


def test_metasgd_learns_its_inner_rates():
    algo, _ = make("metasgd", "algorithm.inner_lr=0.01")
    before = [lr.detach().clone() for lr in algo.meta_sgd.lrs]
    algo.train_step(TaskBatch.stack([sinusoid_task(7, torch.float32)]), iteration=0)
    assert all(lr.grad is not None and lr.grad.abs().max() > 0 for lr in algo.meta_sgd.lrs)
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.meta_sgd.lrs))
    assert set(algo.extra_scalars()) == {"inner_lr_mean", "inner_lr_min", "inner_lr_max"}


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_learned_inner_rates_take_adam_steps_of_rate_outer_lr(name):
    # Adam's first step moves every parameter with a nonzero gradient by its group's lr (|m / sqrt(v)| = 1).
    second_order = ["algorithm.derivative_order_annealing=false"] if name == "mamlpp" else []
    algo, _ = make(name, "algorithm.inner_lr=0.01", "algorithm.inner_steps=2", "algorithm.rate_outer_lr=1e-5",
                   "algorithm.outer_lr=1e-3", *second_order)
    rates = algo.learned_rate_parameters()
    rate_ids = {id(p) for p in rates}
    weights = [p for p in algo.parameters() if id(p) not in rate_ids]
    before = [p.detach().clone() for p in rates + weights]
    algo.train_step(TaskBatch.stack([sinusoid_task(7, torch.float32)]), iteration=0)
    moved = [(p.detach() - b).abs().max().item() for p, b in zip(rates + weights, before)]
    assert max(moved[:len(rates)]) == pytest.approx(1e-5, rel=1e-2)
    assert max(moved[len(rates):]) == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.parametrize("name", ["metasgd", "mamlpp"])
def test_learned_inner_rates_step_is_outer_lr_times_inner_lr_by_default(name):
    algo, _ = make(name, "algorithm.inner_lr=0.01", "algorithm.outer_lr=1e-3")
    weights, rates = algo.optimizer.param_groups
    assert weights["lr"] == pytest.approx(1e-3) and rates["lr"] == pytest.approx(1e-5)
    assert {id(p) for p in rates["params"]} == {id(p) for p in algo.learned_rate_parameters()}


def test_mamlpp_learned_step_rates_receive_gradients_per_step():
    algo, _ = make("mamlpp", "algorithm.inner_steps=3", "algorithm.inner_lr=0.01", dtype=torch.float64)
    task = sinusoid_task(8)
    meta_gradient(algo, task, iteration=90)  # second order, past MSL: only the last step's loss
    for rates in algo.step_rates.values():
        assert rates.grad is not None and (rates.grad.abs() > 0).all(), "every step's rate gets a gradient"


def test_mamlpp_derivative_order_switches_at_the_configured_iteration():
    algo, _ = make("mamlpp", "algorithm.derivative_order_annealing=true", "algorithm.first_order_fraction=0.3",
                   "algorithm.multi_step_loss=false",
                   iterations=100, dtype=torch.float64)
    assert algo.first_order_at(29) and not algo.first_order_at(30)
    task = sinusoid_task(9)
    first, second = meta_gradient(algo, task, iteration=29), meta_gradient(algo, task, iteration=30)
    assert (first - second).norm() / second.norm() > 1e-4  # the second-order term is really added at 30


def test_mamlpp_multi_step_loss_weights_anneal_to_the_last_step():
    algo, _ = make("mamlpp", "algorithm.inner_steps=5", "algorithm.msl_fraction=0.2", iterations=100)
    start = algo.step_weights(0)
    assert start == pytest.approx([0.2] * 5) and sum(start) == pytest.approx(1.0)
    middle = algo.step_weights(10)
    assert middle[0] < 0.2 < middle[-1] and sum(middle) == pytest.approx(1.0)
    assert algo.step_weights(19) == pytest.approx([0.01] * 4 + [0.96])
    assert algo.step_weights(20) is None  # afterwards only the final step's loss
    late, _ = make("mamlpp", "algorithm.inner_steps=5", "algorithm.msl_fraction=1.0", iterations=100)
    assert late.step_weights(99) == pytest.approx([0.03 / 5] * 4 + [1 - 4 * 0.03 / 5])  # the 0.03/K floor


def test_mamlpp_per_step_batch_norm_is_outer_loop_only(tmp_path):
    from omniglot_fixture import make_fake_omniglot
    root = make_fake_omniglot(tmp_path / "omniglot")
    algo, sources = make("mamlpp", "dataset=omniglot_5w1s", f"dataset.root={root}", "dataset.split=[6,3,3]", "dataset.ways=3",
                         "model.hidden=8", "algorithm.inner_steps=2")
    norms = algo.batch_norms
    assert len(norms) == 4 and norms[0].weight.shape == (2, 8)
    assert not any("weight" in n and n.startswith("body.1.") for n in algo.adapted)
    task = sources["train"].sample()
    meta_gradient(algo, task, iteration=99)
    # Each step's batch-norm weights are used (and learned) separately.
    assert (norms[0].weight.grad.abs().sum(dim=1) > 0).all()
    assert torch.equal(norms[0].running_mean, torch.zeros(2, 8))  # transductive: statistics never kept or read
    # model.bn=running: each step keeps its own running statistics (BNRS), used at evaluation.
    algo, sources = make("mamlpp", "dataset=omniglot_5w1s", f"dataset.root={root}", "dataset.split=[6,3,3]",
                         "dataset.ways=3", "model.hidden=8", "algorithm.inner_steps=2", "model.bn=running")
    norms = algo.batch_norms
    meta_gradient(algo, sources["train"].sample(), iteration=99)
    assert not torch.equal(norms[0].running_mean[0], norms[0].running_mean[1])
    algo.eval()
    assert algo.evaluate_task(sources["test"].sample(), 2)[0] > 0


def test_pretrain_pools_global_classes_and_fine_tunes_a_new_head(tmp_path):
    from omniglot_fixture import make_fake_omniglot
    root = make_fake_omniglot(tmp_path / "omniglot")
    algo, sources = make("pretrain", "dataset=omniglot_5w1s", f"dataset.root={root}", "dataset.split=[6,3,3]", "dataset.ways=3",
                         "model.hidden=8")
    train = sources["train"]
    assert algo.classifier.out_features == train.num_pooled_classes == 6 * 4
    x, y = train.pooled_batch(4)
    assert x.shape == (4 * 3 * 2, 1, 28, 28) and 0 <= int(y.min()) and int(y.max()) < 24
    body_before = [p.detach().clone() for p in algo.model.body.parameters()]
    head_before = algo.model.head.weight.detach().clone()
    batch = algo.next_batch(train, 4)
    algo.train_step(batch, iteration=0)
    assert any(not torch.equal(a, b) for a, b in zip(body_before, algo.model.body.parameters()))
    assert torch.equal(head_before, algo.model.head.weight)  # the task head is not what pre-training trains
    task = sources["test"].sample()
    adapted = algo.adapt(task, 1)
    assert adapted.head.weight.abs().sum() > 0 and torch.equal(head_before, algo.model.head.weight)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_takes_a_finite_step_on_sinusoid(name):
    algo, sources = make(name, "algorithm.inner_lr=0.01", "algorithm.inner_steps=2")
    before = [p.detach().clone() for p in algo.model.parameters()]
    batch = algo.next_batch(sources["train"], 3)
    stats = algo.train_step(batch, iteration=0)
    assert stats["finite"] == 1.0 and math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))
    loss, _ = algo.evaluate_task(sources["test"].sample(), 3)
    assert math.isfinite(loss)


@pytest.fixture(scope="module")
def fake_omniglot(tmp_path_factory):
    from omniglot_fixture import make_fake_omniglot
    return make_fake_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.mark.parametrize("model", ["conv4", "mlp"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_takes_a_finite_step_on_omniglot(name, model, fake_omniglot):
    algo, sources = make(name, "dataset=omniglot_5w1s", f"dataset.root={fake_omniglot}", "dataset.split=[6,3,3]",
                         "dataset.ways=3", f"model={model}", f"model.hidden={8 if model == 'conv4' else [16]}",
                         "algorithm.inner_steps=2")
    before = [p.detach().clone() for p in algo.model.parameters()]
    stats = algo.train_step(algo.next_batch(sources["train"], 2), iteration=0)
    assert stats["finite"] == 1.0 and 0.0 <= stats["acc"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(before, algo.model.parameters()))
    loss, acc = algo.evaluate_task(sources["test"].sample(), 3)
    assert math.isfinite(loss) and 0.0 <= acc <= 1.0


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_runs_end_to_end_on_omniglot(name, fake_omniglot, tmp_path):
    """Through `train.run` (the CLI's path: fast sampler, checkpoints, test) on the tiny Omniglot."""
    from maml_runner.train import run
    cfg = compose_config([f"algorithm={name}", "dataset=omniglot_5w1s", f"dataset.root={fake_omniglot}",
                          "dataset.split=[6,3,3]", "dataset.ways=3", "model.hidden=8", "algorithm.inner_steps=2",
                          "train.iterations=4", "train.val_interval=2", "train.val_tasks=3", "train.meta_batch_size=2",
                          "eval.num_tasks=5", "hardware=cpu", "hardware.threads=1"])
    row = run(cfg, tmp_path / "run")
    assert row["algorithm.name"] == name and row["n_tasks"] == 5 and 0.0 <= row["mean"] <= 1.0
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()
