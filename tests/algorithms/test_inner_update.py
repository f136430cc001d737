"""The one inner update (algorithms/inner_update.py): its three rate forms, and the per-task loops that use it give
learn2learn's numbers bit for bit (so runs and checkpoints from before keep their meaning)."""
from __future__ import annotations

import learn2learn as l2l
import torch
from omegaconf import OmegaConf

from maml_runner.algorithms.inner_update import inner_update, per_parameter_rates, per_step_rates, set_parameters
from maml_runner.algorithms.maml import MAML
from maml_runner.algorithms.metasgd import MetaSGD
from maml_runner.data.base import Task
from maml_runner.grouped_conv import second_order_step
from maml_runner.models import Conv4


def test_inner_update_rate_forms():
    params = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0]), "c": torch.tensor([5.0])}
    grads = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor([2.0]), "c": None}  # c: not adapted
    plain = inner_update(params, grads, 0.1)
    assert torch.allclose(plain["a"], torch.tensor([0.95, 2.1])) and torch.allclose(plain["b"], torch.tensor([2.8]))
    assert plain["c"] is params["c"]
    table = {"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([1.0, 0.5])}  # per layer, per step
    second = inner_update(params, grads, per_step_rates(table), step=1)
    assert torch.allclose(second["a"], torch.tensor([0.9, 2.2])) and torch.allclose(second["b"], torch.tensor([2.0]))
    beyond = inner_update(params, grads, per_step_rates(table), step=5)  # past the last step: the last rate
    assert torch.equal(beyond["b"], second["b"])
    per_parameter = per_parameter_rates(["a", "b"], [torch.tensor([1.0, 0.0]), torch.tensor([0.25])])
    moved = inner_update(params, grads, per_parameter)
    assert torch.allclose(moved["a"], torch.tensor([0.5, 2.0])) and torch.allclose(moved["b"], torch.tensor([2.5]))
    # Per-task copies [T, *shape] with a rate shaped like the parameter: broadcast over the task dimension.
    tasks = inner_update({"a": params["a"].expand(3, 2)}, {"a": grads["a"].expand(3, 2)}, per_parameter)
    assert torch.allclose(tasks["a"], moved["a"].expand(3, 2))


def _task():
    g = torch.Generator().manual_seed(0)
    return Task(torch.rand(5, 1, 28, 28, generator=g), torch.arange(5), torch.rand(5, 1, 28, 28, generator=g),
                torch.arange(5))


def test_maml_and_metasgd_per_task_loops_give_learn2learns_numbers():
    task = _task()
    for cls in (MAML, MetaSGD):
        torch.manual_seed(0)
        model = Conv4(5, hidden=8)
        cfg = OmegaConf.create(dict(name=cls.name, inner_lr=0.4, inner_steps=2, outer_lr=0.001, first_order=False))
        algorithm = cls(model, cfg, "classification", 10)
        mine = algorithm.adapt(task, 2, iteration=0)(task.query_x)
        torch.nn.functional.cross_entropy(mine, task.query_y).backward()
        mine_grads = [p.grad.clone() for p in algorithm.parameters()]
        algorithm.zero_grad()
        # learn2learn's own adapt on the same wrapper (what these algorithms ran before the shared update)
        learner = algorithm.maml.clone() if cls is MAML else algorithm.meta_sgd.clone()
        with second_order_step():  # the same convolution derivatives as the algorithms' own second-order loops
            for _ in range(2):
                learner.adapt(torch.nn.functional.cross_entropy(learner(task.support_x), task.support_y))
        theirs = learner(task.query_x)
        torch.nn.functional.cross_entropy(theirs, task.query_y).backward()
        assert torch.equal(mine, theirs), cls.name
        assert all(torch.equal(a, p.grad) for a, p in zip(mine_grads, algorithm.parameters())), cls.name


def test_set_parameters_replaces_by_name():
    model = l2l.algorithms.MAML(torch.nn.Sequential(torch.nn.Linear(2, 2)), lr=0.1).clone()
    new = {n: p * 2 for n, p in model.module.named_parameters()}
    set_parameters(model.module, new)
    assert all(got is new[n] for n, got in model.module.named_parameters())
    x = torch.ones(1, 2)
    assert torch.allclose(model(x), x @ new["0.weight"].T + new["0.bias"])
