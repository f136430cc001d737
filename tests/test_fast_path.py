"""The fast path (meta-batch sampling from the image tensor, vectorized inner loop) against the reference path
(learn2learn TaskDataset task by task, one learn2learn MAML clone per task): same tasks, same meta-gradients."""
from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from maml_runner.algorithms import vectorized
from maml_runner.algorithms.fomaml import FOMAML
from maml_runner.algorithms.maml import MAML
from maml_runner.algorithms.mamlpp import MAMLPlusPlus
from maml_runner.data.base import TaskBatch
from maml_runner.data.fast_episodes import CachedEpisodes, cached_episodes
from maml_runner.data.omniglot import OmniglotTasks, build_omniglot
from maml_runner.data.sinusoid import SinusoidTasks
from maml_runner.models import MLP, Conv4
from omniglot_fixture import make_fake_omniglot


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory):
    root = make_fake_omniglot(tmp_path_factory.mktemp("omniglot"), chars_per_alphabet=5)
    cfg = OmegaConf.create(dict(root=str(root), ways=3, shots=1, query_shots=2, image_size=28, split=[12, 4, 4],
                                split_seed=1, rotations=[0, 90, 180, 270], cache_dir=str(tmp_path_factory.mktemp("c")),
                                download=False))
    return build_omniglot(cfg)


# ---- sampling ----------------------------------------------------------------------------------------------------
def test_cached_episodes_sample_the_reference_tasks(omniglot):
    source = omniglot["train"]
    fast = cached_episodes(source)
    assert isinstance(fast, CachedEpisodes)
    random.seed(7)
    reference = [source.sample() for _ in range(6)]
    after_reference = random.getstate()
    random.seed(7)
    batch = fast.sample_batch(6)
    assert random.getstate() == after_reference  # the same random calls: later tasks stay the same too
    for i, task in enumerate(reference):
        for mine, theirs in zip(batch[i], task):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs)
    # Rotations really happen and differ between tasks (the fixture's characters are asymmetric).
    assert not torch.equal(batch.support_x[0], batch.support_x[1])


def test_cached_episodes_falls_back_and_forwards(omniglot):
    sinusoid = SinusoidTasks(5, 5)
    assert cached_episodes(sinusoid) is sinusoid  # no TaskDataset: sampled task by task
    fast = cached_episodes(omniglot["train"])
    assert fast.ways == 3 and fast.write_split is not None  # the rest is the wrapped source's


def test_trainer_wraps_only_the_training_source(omniglot, tmp_path):
    from conftest import compose_config
    from maml_runner.train import build
    root = make_fake_omniglot(tmp_path / "data", chars_per_alphabet=5)
    cfg = compose_config(["dataset=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={tmp_path / 'c'}",
                          "dataset.ways=3", "dataset.split=[12,4,4]", "model.hidden=4", "hardware=cpu",
                          "hardware.vectorize=off"])
    trainer = build(cfg, tmp_path / "run")
    assert isinstance(trainer.sources["train"], CachedEpisodes)
    assert type(trainer.sources["validation"]) is OmniglotTasks and type(trainer.sources["test"]) is OmniglotTasks
    assert trainer.algorithm.vectorize == "off"


# ---- meta-gradients ------------------------------------------------------------------------------------------------
def _algorithm(cls, model, task_type, inner_lr, steps, first_order, vectorize):
    cfg = OmegaConf.create(dict(name=cls.name, inner_lr=inner_lr, inner_steps=steps, outer_lr=0.0,
                                first_order=first_order))
    algorithm = cls(model, cfg, task_type, 10)
    algorithm.vectorize = vectorize
    algorithm.build_optimizer()  # Adam with lr 0: the step leaves parameters (and .grad) as they are
    return algorithm


def _meta_gradient(cls, model, tasks, task_type, inner_lr, steps, first_order, vectorize):
    algorithm = _algorithm(cls, model, task_type, inner_lr, steps, first_order, vectorize)
    assert algorithm.vectorized_for(tasks) == (vectorize == "on")
    stats = algorithm.train_step(tasks, iteration=0)
    return stats, [p.grad.clone() for p in model.parameters()]


def _relative(a, b) -> float:
    return float(sum((x - y).pow(2).sum() for x, y in zip(a, b)).sqrt() / sum(x.pow(2).sum() for x in a).sqrt())


@pytest.mark.parametrize("cls,first_order,steps", [(MAML, False, 1), (MAML, False, 2), (MAML, True, 2),
                                                   (FOMAML, False, 1)])
@pytest.mark.parametrize("images_per_chunk", [10_000, 12, 1])  # 4 tasks of 6 images: 1, 2 and 4 chunks
def test_vectorized_meta_gradient_equals_per_task_loop_conv4(omniglot, cls, first_order, steps, images_per_chunk,
                                                             monkeypatch):
    monkeypatch.setattr(vectorized, "CPU_IMAGES_PER_CHUNK", images_per_chunk)
    random.seed(3)
    tasks = cached_episodes(omniglot["train"]).sample_batch(4)
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    ref_stats, reference = _meta_gradient(cls, model, tasks, "classification", 0.4, steps, first_order, "off")
    fast_stats, fast = _meta_gradient(cls, model, tasks, "classification", 0.4, steps, first_order, "on")
    assert len(vectorized.task_chunks(tasks)) == {10_000: 1, 12: 2, 1: 4}[images_per_chunk]
    assert _relative(reference, fast) < 1e-10  # float64: the same computation up to rounding
    assert fast_stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-10)
    assert fast_stats["acc"] == pytest.approx(ref_stats["acc"])
    assert fast_stats["grad_norm"] == pytest.approx(ref_stats["grad_norm"], rel=1e-10)


def test_vectorized_meta_gradient_equals_per_task_loop_sinusoid_float32():
    random.seed(5)
    tasks = SinusoidTasks(5, 10).sample_batch(8)
    torch.manual_seed(0)
    model = MLP()
    _, reference = _meta_gradient(MAML, model, tasks, "regression", 0.01, 1, False, "off")
    _, fast = _meta_gradient(MAML, model, tasks, "regression", 0.01, 1, False, "on")
    assert _relative(reference, fast) < 1e-5


def _mamlpp_meta_gradient(make_model, tasks, task_type, inner_lr, steps, iteration, annealing, vectorize):
    """MAML++ on a fresh model (it replaces the batch norms): train-step stats and the gradients of every
    meta-parameter (weights, per-step BN weights, learned step rates)."""
    torch.manual_seed(0)
    cfg = OmegaConf.create(dict(name="mamlpp", inner_lr=inner_lr, inner_steps=steps, outer_lr=0.0, first_order=False,
                                derivative_order_annealing=annealing, first_order_fraction=0.5, msl_fraction=0.5))
    algorithm = MAMLPlusPlus(make_model(), cfg, task_type, 10)
    algorithm.vectorize = vectorize
    algorithm.build_optimizer()
    assert algorithm.vectorized_for(tasks) == (vectorize == "on")
    stats = algorithm.train_step(tasks, iteration)
    assert stats["finite"] == 1.0
    return stats, {n: p.grad.clone() for n, p in algorithm.named_parameters()}


@pytest.mark.parametrize("iteration,annealing,what", [
    (0, True, "first order (DA) + multi-step loss"), (0, False, "second order + multi-step loss"),
    (7, True, "second order, last step only")])
def test_vectorized_mamlpp_equals_per_task_loop_conv4(omniglot, iteration, annealing, what):
    random.seed(6)
    tasks = cached_episodes(omniglot["train"]).sample_batch(3)
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    make = lambda: Conv4(3, hidden=6).double()  # noqa: E731
    ref_stats, reference = _mamlpp_meta_gradient(make, tasks, "classification", 0.3, 2, iteration, annealing, "off")
    fast_stats, fast = _mamlpp_meta_gradient(make, tasks, "classification", 0.3, 2, iteration, annealing, "on")
    assert reference.keys() == fast.keys()
    assert any("step_rates" in n for n in fast) and any(".weight" in n and n.startswith("model.body.1") for n in fast)
    assert _relative(list(reference.values()), list(fast.values())) < 1e-10
    for name in reference:  # every meta-parameter, the learned rates and per-step BN weights included
        # (atol: conv biases before batch norm have a zero gradient, up to rounding)
        assert torch.allclose(fast[name], reference[name], rtol=1e-8, atol=1e-13), (what, name)
    assert fast_stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-10)
    assert fast_stats["acc"] == pytest.approx(ref_stats["acc"])


def test_vectorized_mamlpp_equals_per_task_loop_sinusoid_float32():
    random.seed(5)
    tasks = SinusoidTasks(5, 10).sample_batch(8)
    _, reference = _mamlpp_meta_gradient(MLP, tasks, "regression", 0.01, 3, 0, False, "off")
    _, fast = _mamlpp_meta_gradient(MLP, tasks, "regression", 0.01, 3, 0, False, "on")
    assert _relative(list(reference.values()), list(fast.values())) < 1e-5


def test_vmap_fallback_matches_and_batch_norm_stays_per_task(omniglot):
    """The generic vmap path (models the grouped forward does not know): same meta-gradient, and each task's
    batch norm sees only that task's samples."""
    random.seed(4)
    b = cached_episodes(omniglot["train"]).sample_batch(3)
    tasks = TaskBatch(b.support_x.double(), b.support_y, b.query_x.double(), b.query_y)
    torch.manual_seed(0)
    model = Conv4(3, hidden=4).double()
    loss_fn = torch.nn.functional.cross_entropy
    outputs = {}
    for name, fn in (("grouped", vectorized.adapt_and_query_grouped), ("vmap", vectorized.adapt_and_query_vmap)):
        model.zero_grad()
        losses, _ = fn(model, tasks, 0.4, 1, False, loss_fn)
        losses.mean().backward()
        outputs[name] = (losses.detach(), [p.grad.clone() for p in model.parameters()])
    assert torch.allclose(outputs["grouped"][0], outputs["vmap"][0], rtol=1e-10)
    assert _relative(outputs["grouped"][1], outputs["vmap"][1]) < 1e-10
    # Task 0's loss does not move when another task's images change (no statistics shared across tasks).
    changed = TaskBatch(tasks.support_x.clone(), tasks.support_y, tasks.query_x.clone(), tasks.query_y)
    changed.support_x[1] = changed.support_x[1] * 3 + 1
    changed.query_x[2] = 0.5
    losses, _ = vectorized.adapt_and_query_grouped(model, changed, 0.4, 1, False, loss_fn)
    assert losses[0].item() == pytest.approx(outputs["grouped"][0][0].item(), rel=1e-12)
    assert losses[1].item() != pytest.approx(outputs["grouped"][0][1].item(), rel=1e-6)


def test_vectorize_setting():
    images = TaskBatch(torch.zeros(2, 5, 1, 28, 28), torch.zeros(2, 5), torch.zeros(2, 5, 1, 28, 28), torch.zeros(2, 5))
    big = TaskBatch(torch.zeros(2, 100, 1, 28, 28), torch.zeros(2, 100), torch.zeros(2, 100, 1, 28, 28),
                    torch.zeros(2, 100))
    model = Conv4(5, hidden=4)
    assert vectorized.use_vectorized("on", model, big) and not vectorized.use_vectorized("off", model, images)
    assert vectorized.use_vectorized("auto", model, images)
    assert not vectorized.use_vectorized("auto", model, big)  # CPU, large tasks: the per-task loop (measured)
    running = Conv4(5, hidden=4, bn="running")  # running statistics are updated in place: never under vmap
    assert not vectorized.use_vectorized("on", running, images)
    assert "running statistics" in vectorized.supports_vectorization(running)
