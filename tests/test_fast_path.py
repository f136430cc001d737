"""The fast path (meta-batch sampling from the image tensor, vectorized inner loop) against the reference path
(learn2learn TaskDataset task by task, one learn2learn MAML clone per task): same tasks, same meta-gradients."""
from __future__ import annotations

import random

import pytest
import torch
from omegaconf import OmegaConf

from maml_runner import grouped_conv, norm_derivatives
from maml_runner.algorithms import vectorized
from maml_runner.algorithms.anil import ANIL
from maml_runner.algorithms.fomaml import FOMAML
from maml_runner.algorithms.maml import MAML
from maml_runner.algorithms.mamlpp import MAMLPlusPlus
from maml_runner.algorithms.metasgd import MetaSGD
from maml_runner.algorithms.reptile import Reptile
from maml_runner.data.base import TaskBatch
from maml_runner.data.fast_episodes import CachedEpisodes, cached_episodes
from maml_runner.data.omniglot import OmniglotTasks, build_omniglot
from maml_runner.data.sinusoid import SinusoidTasks
from maml_runner.models import MLP, Conv4, build_model
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


def _chunk_images(monkeypatch, images: int) -> None:
    """Chunks of exactly `images` images for first- and second-order steps alike."""
    monkeypatch.setattr(vectorized, "CPU_IMAGES_PER_CHUNK", images)
    monkeypatch.setattr(vectorized, "CPU_SECOND_ORDER_IMAGES_PER_CHUNK", images)
    monkeypatch.setattr(vectorized, "CPU_FIRST_ORDER_CHUNK_FACTOR", 1)


def test_chunk_size_rule_doubles_first_order_chunks_only_with_several_threads(omniglot):
    """vectorized.images_per_chunk: second-order steps use CPU_SECOND_ORDER_IMAGES_PER_CHUNK, first-order steps
    CPU_IMAGES_PER_CHUNK at one thread and twice that with several intra-op threads; task_chunks splits by it."""
    threads = torch.get_num_threads()
    random.seed(3)
    tasks = cached_episodes(omniglot["train"]).sample_batch(32)  # 32 tasks of 9 images: 288
    images = 32 * (tasks.support_x.shape[1] + tasks.query_x.shape[1])
    try:
        torch.set_num_threads(2)
        assert vectorized.images_per_chunk(True) == vectorized.CPU_SECOND_ORDER_IMAGES_PER_CHUNK == 160
        assert vectorized.images_per_chunk(False) == 2 * vectorized.CPU_IMAGES_PER_CHUNK == 256
        for second_order in (True, False):
            chunks = vectorized.task_chunks(tasks, second_order)
            expected = -(-images // vectorized.images_per_chunk(second_order))
            assert len(chunks) == expected and sum(len(c) for c in chunks) == 32
        torch.set_num_threads(1)
        assert vectorized.images_per_chunk(False) == vectorized.CPU_IMAGES_PER_CHUNK == 128
        assert vectorized.images_per_chunk(True) == 160
    finally:
        torch.set_num_threads(threads)


def _relative(a, b) -> float:
    return float(sum((x - y).pow(2).sum() for x, y in zip(a, b)).sqrt() / sum(x.pow(2).sum() for x in a).sqrt())


@pytest.mark.parametrize("cls,first_order,steps", [(MAML, False, 1), (MAML, False, 2), (MAML, True, 2),
                                                   (FOMAML, False, 1)])
@pytest.mark.parametrize("images_per_chunk", [10_000, 12, 1])  # 4 tasks of 6 images: 1, 2 and 4 chunks
def test_vectorized_meta_gradient_equals_per_task_loop_conv4(omniglot, cls, first_order, steps, images_per_chunk,
                                                             monkeypatch):
    _chunk_images(monkeypatch, images_per_chunk)
    random.seed(3)
    tasks = cached_episodes(omniglot["train"]).sample_batch(4)
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    torch.manual_seed(0)
    model = Conv4(3, hidden=8).double()
    ref_stats, reference = _meta_gradient(cls, model, tasks, "classification", 0.4, steps, first_order, "off")
    fast_stats, fast = _meta_gradient(cls, model, tasks, "classification", 0.4, steps, first_order, "on")
    assert len(vectorized.task_chunks(tasks, second_order=True)) == {10_000: 1, 12: 2, 1: 4}[images_per_chunk]
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
    def task(images_per_task, size, channels=1):
        half = images_per_task // 2
        return TaskBatch(torch.zeros(2, half, channels, size, size), torch.zeros(2, half),
                         torch.zeros(2, images_per_task - half, channels, size, size), torch.zeros(2, half))
    # auto on CPU counts pixels: 60 Omniglot images (about the measured break-even: 5w5s's 50 in) in, 61 out; 10
    # miniImageNet images (84x84: 9x the pixels of 28x28) out, as measured (docs/benchmarks.md)
    assert vectorized.use_vectorized("auto", model, task(50, 28))
    assert vectorized.use_vectorized("auto", model, task(60, 28))
    assert not vectorized.use_vectorized("auto", model, task(61, 28))
    assert not vectorized.use_vectorized("auto", model, task(10, 84, 3))
    assert vectorized.use_vectorized("on", model, task(10, 84, 3))
    running = Conv4(5, hidden=4, bn="running")  # running statistics are updated in place: never under vmap
    assert not vectorized.use_vectorized("on", running, images)
    assert "running statistics" in vectorized.supports_vectorization(running)


# ---- Meta-SGD, ANIL, Reptile: their fast paths against their own per-task loops ------------------------------------
def _double(tasks: TaskBatch) -> TaskBatch:
    return TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)


def _train_step(cls, model, tasks, task_type, vectorize, iteration=0, **cfg):
    """One train step of `cls` (outer step size 0: parameters stay): stats and the gradient of every
    meta-parameter by name (Meta-SGD's learned rates included; Reptile's .grad is its pseudo-gradient)."""
    cfg = OmegaConf.create({"name": cls.name, "outer_lr": 0.0, "meta_step_size": 0.0, "first_order": False, **cfg})
    algorithm = cls(model, cfg, task_type, 10)
    algorithm.vectorize = vectorize
    algorithm.build_optimizer()
    assert algorithm.vectorized_for(tasks) == (vectorize == "on")  # hardware.vectorize=off: the per-task loop
    stats = algorithm.train_step(tasks, iteration)
    assert stats["finite"] == 1.0
    return stats, {n: p.grad.clone() for n, p in algorithm.named_parameters() if p.grad is not None}


def _assert_same_step(cls, make_model, tasks, task_type, **cfg):
    torch.manual_seed(0)
    model = make_model()
    ref_stats, reference = _train_step(cls, model, tasks, task_type, "off", **cfg)
    fast_stats, fast = _train_step(cls, model, tasks, task_type, "on", **cfg)
    assert reference.keys() == fast.keys() and len(fast) > 0
    assert _relative(list(reference.values()), list(fast.values())) < 1e-10  # float64: same up to rounding
    for name in reference:  # (atol: conv biases before batch norm have a zero gradient, up to rounding)
        assert torch.allclose(fast[name], reference[name], rtol=1e-8, atol=1e-13), name
    assert fast_stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-10)
    if task_type == "classification":
        assert fast_stats["acc"] == pytest.approx(ref_stats["acc"])
    return reference


@pytest.mark.parametrize("cls,first_order,steps", [(MetaSGD, False, 1), (MetaSGD, False, 2), (MetaSGD, True, 2),
                                                   (ANIL, False, 1), (ANIL, False, 3), (ANIL, True, 2)])
@pytest.mark.parametrize("images_per_chunk", [10_000, 12])  # 4 tasks of 6 images: 1 and 2 chunks
def test_metasgd_and_anil_fast_path_equal_per_task_loop_conv4(omniglot, cls, first_order, steps, images_per_chunk,
                                                              monkeypatch):
    _chunk_images(monkeypatch, images_per_chunk)
    random.seed(3)
    tasks = _double(cached_episodes(omniglot["train"]).sample_batch(4))
    reference = _assert_same_step(cls, lambda: Conv4(3, hidden=8).double(), tasks, "classification",
                                  inner_lr=0.4, inner_steps=steps, first_order=first_order)
    if cls is MetaSGD:  # the learned per-parameter rates get their meta-gradient on the fast path too
        assert sum(n.startswith("meta_sgd.lrs.") for n in reference) == len(list(Conv4(3, hidden=8).parameters()))
    else:  # ANIL: the body is learned in the outer loop, through the features the head was adapted on
        assert reference["model.body.0.weight"].abs().sum() > 0


@pytest.mark.parametrize("steps,images_per_chunk", [(1, 10_000), (3, 10_000), (3, 18)])
def test_reptile_fast_path_equals_per_task_loop_conv4(omniglot, steps, images_per_chunk, monkeypatch):
    _chunk_images(monkeypatch, images_per_chunk)
    random.seed(8)
    tasks = _double(cached_episodes(omniglot["train"]).sample_batch(4))
    reference = _assert_same_step(Reptile, lambda: Conv4(3, hidden=8).double(), tasks, "classification",
                                  inner_lr=0.1, inner_steps=steps)
    assert all(g.abs().sum() > 0 for n, g in reference.items() if n.endswith("weight"))  # theta moved
    # A persistent inner optimizer keeps the per-task loop (its state is sequential across tasks).
    for optimizer, state in (("adam", "persistent"), ("sgd", "persistent")):
        cfg = OmegaConf.create(dict(name="reptile", inner_lr=0.1, inner_steps=2, meta_step_size=0.0,
                                    inner_optimizer=optimizer, inner_optimizer_state=state))
        kept = Reptile(Conv4(3, hidden=8).double(), cfg, "classification", 10)
        kept.vectorize = "on"
        assert not kept.vectorized_for(tasks), (optimizer, state)


@pytest.mark.parametrize("optimizer,batch,images_per_chunk", [("adam", None, 10_000), ("adam", None, 18),
                                                              ("sgd", 3, 10_000), ("adam", 4, 18)])
def test_reptile_fast_path_with_fresh_adam_and_mini_batches_equals_per_task_loop(omniglot, optimizer, batch,
                                                                                   images_per_chunk, monkeypatch):
    """A fresh inner Adam (beta1 = 0 as Nichol et al., and 0.9) and supervised-reptile's mini-batches on the fast
    path: float64 pseudo-gradients equal the per-task loop's (torch.optim.Adam per task, the same mini-batches drawn
    from the global RNG in the same order, which is left in the same state)."""
    _chunk_images(monkeypatch, images_per_chunk)
    random.seed(9)
    tasks = _double(cached_episodes(omniglot["train"]).sample_batch(4))
    for betas in ([0.0, 0.999], [0.9, 0.999]):
        cfg = dict(inner_lr=0.01, inner_steps=3, inner_optimizer=optimizer, inner_betas=betas,
                   inner_batch_size=batch)
        torch.manual_seed(0)
        model = Conv4(3, hidden=8).double()
        results = []
        for vectorize in ("off", "on"):
            torch.manual_seed(1)  # the mini-batches' draws
            results.append(_train_step(Reptile, model, tasks, "classification", vectorize, **cfg))
            results[-1] += (torch.get_rng_state(),)
        (ref_stats, reference, ref_rng), (fast_stats, fast, fast_rng) = results
        assert torch.equal(ref_rng, fast_rng)
        assert reference.keys() == fast.keys()
        # Conv biases before batch norm have a zero gradient up to rounding, which Adam's g / sqrt(v) scales up to
        # steps of size lr in either direction: there both paths only move by amounts of the rounding's order.
        biases = {f"model.body.{i}.bias" for i in Conv4(3, hidden=8)._conv_indices}
        for name in biases:
            assert reference[name].abs().max() < 1e-8 and fast[name].abs().max() < 1e-8, name
        kept = [name for name in reference if name not in biases]
        assert _relative([reference[n] for n in kept], [fast[n] for n in kept]) < 1e-10, betas
        assert fast_stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-10)
        assert all(g.abs().sum() > 0 for n, g in reference.items() if n.endswith("weight"))  # theta moved


@pytest.mark.parametrize("cls", [MAML, MetaSGD, ANIL, Reptile, MAMLPlusPlus])
def test_fast_path_on_three_channel_max_pool_network(cls):
    """miniImageNet's network (3 input channels, max-pooling, flattened features) on small RGB images."""
    g = torch.Generator().manual_seed(2)
    ways, tasks_count = 3, 3
    tasks = TaskBatch(torch.rand(tasks_count, ways, 3, 20, 20, generator=g, dtype=torch.float64),
                      torch.arange(ways).repeat(tasks_count, 1),
                      torch.rand(tasks_count, 2 * ways, 3, 20, 20, generator=g, dtype=torch.float64),
                      torch.arange(ways).repeat(2).repeat(tasks_count, 1))
    make = lambda: Conv4(ways, in_channels=3, hidden=4, image_size=20, pooling="max").double()  # noqa: E731
    assert make().head.in_features == 4 * 1 * 1  # 20 -> 10 -> 5 -> 2 -> 1
    _assert_same_step(cls, make, tasks, "classification", inner_lr=0.3, inner_steps=2)


@pytest.mark.parametrize("cls", [MAML, MetaSGD, ANIL, Reptile, MAMLPlusPlus])
def test_fast_path_with_flattened_head_features(omniglot, cls):
    """model.head_features=flatten on the stride-2 network (supervised-reptile's head: the 2x2 feature map
    flattened, not averaged): the task-grouped step equals the per-task loop in float64."""
    random.seed(11)
    tasks = _double(cached_episodes(omniglot["train"]).sample_batch(3))
    make = lambda: Conv4(3, hidden=6, padding="tf_same", head_features="flatten").double()  # noqa: E731
    assert make().head.in_features == 6 * 2 * 2  # 28 -> 14 -> 7 -> 4 -> 2
    _assert_same_step(cls, make, tasks, "classification", inner_lr=0.3, inner_steps=2)


@pytest.mark.parametrize("cls", [MetaSGD, ANIL, Reptile])
def test_fast_path_equals_per_task_loop_sinusoid(cls):
    random.seed(5)
    tasks = SinusoidTasks(5, 10).sample_batch(6)
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y.double(), tasks.query_x.double(),
                      tasks.query_y.double())
    _assert_same_step(cls, lambda: MLP().double(), tasks, "regression", inner_lr=0.01, inner_steps=2)


class _NoGroupedForward(torch.nn.Module):
    """A model without a task-grouped forward (not a models.TaskGrouped): the vmap path runs it."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.Tanh())
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x):
        return self.head(self.body(x))


def test_metasgd_per_parameter_rates_under_vmap():
    random.seed(6)
    tasks = SinusoidTasks(5, 10).sample_batch(4)
    tasks = TaskBatch(*(t.double() for t in (tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)))
    assert vectorized.grouped_model_reason(_NoGroupedForward()) is not None
    _assert_same_step(MetaSGD, lambda: _NoGroupedForward().double(), tasks, "regression", inner_lr=0.05,
                      inner_steps=2)
    # ANIL and Reptile need the grouped forward: the per-task loop runs such a model.
    for cls in (ANIL, Reptile):
        algorithm = cls(_NoGroupedForward(), OmegaConf.create(dict(name=cls.name, inner_lr=0.1, inner_steps=2,
                                                                   outer_lr=0.0, meta_step_size=0.0)),
                        "regression", 10)
        algorithm.vectorize = "on"
        assert not algorithm.vectorized_for(tasks)


@pytest.mark.parametrize("make,shape", [
    (lambda: Conv4(4, hidden=5), (1, 28, 28)),
    (lambda: Conv4(4, hidden=5, padding="tf_same", bn_scale=False, bn_eps=1e-3), (1, 28, 28)),
    (lambda: Conv4(4, hidden=5, bn="none", activation="leaky_relu"), (1, 28, 28)),
    (lambda: Conv4(4, in_channels=3, hidden=5, image_size=20, pooling="max"), (3, 20, 20)),  # miniImageNet's kind
    (lambda: Conv4(4, hidden=5, padding="tf_same", head_features="flatten"), (1, 28, 28)),  # supervised-reptile
    (lambda: Conv4(4, hidden=5, layers=3, image_size=20, head_features="flatten"), (1, 20, 20)),  # 5 * 3 * 3
    (lambda: Conv4(4, in_channels=3, hidden=5, image_size=20, pooling="max", head_features="mean"), (3, 20, 20)),
    (lambda: MLP(hidden=(7, 6)), (1,)),
    (lambda: build_model(OmegaConf.create(dict(name="mlp", hidden=[6])),
                         OmegaConf.create(dict(kind="omniglot", ways=4, image_size=8))), (1, 8, 8)),  # _FlatMLP
])
def test_model_grouped_forward_is_each_tasks_own_forward(make, shape):
    """models.TaskGrouped: task t's slice of `grouped_forward` is `model(x[t])` with task t's parameters, whether
    the parameters are per-task copies or shared (ANIL's body)."""
    torch.manual_seed(0)
    model = make().double()
    tasks, n = 3, 6
    x = torch.rand(tasks, n, *shape, dtype=torch.float64)
    per_task = {name: torch.stack([p + 0.05 * t for t in range(tasks)]) for name, p in model.named_parameters()}
    grouped = model.grouped_forward(x, per_task)
    for t in range(tasks):
        own = {name: p[t] for name, p in per_task.items()}
        assert torch.allclose(grouped[t], torch.func.functional_call(model, own, (x[t],)), rtol=1e-12, atol=1e-12)
    shared = model.grouped_body(x, dict(model.named_parameters()))
    assert torch.allclose(shared, torch.stack([model.body(x[t]) for t in range(tasks)]), rtol=1e-12, atol=1e-12)


# ---- hardware.compile ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("cls", [FOMAML])  # Reptile's fast path calls the same compiled forward (bench_formulations)
def test_compiled_fast_path_gives_the_uncompiled_meta_gradient(omniglot, cls):
    """hardware.compile=true (hardware.compile_fast_path): torch.compile of the grouped forward, first-order
    algorithms only; in float64 the meta-gradient (Reptile: its pseudo-gradient) equals the uncompiled one."""
    from maml_runner.hardware import compile_fast_path
    random.seed(4)
    tasks = _double(cached_episodes(omniglot["train"]).sample_batch(3))
    gradients = []
    for compiled in (False, True):
        torch.manual_seed(0)
        cfg = OmegaConf.create({"name": cls.name, "inner_lr": 0.1, "inner_steps": 2, "outer_lr": 0.0,
                                "meta_step_size": 0.0, "first_order": True})
        algorithm = cls(Conv4(3, hidden=4).double(), cfg, "classification", 10)
        algorithm.vectorize = "on"
        algorithm.build_optimizer()
        if compiled:
            compile_fast_path(algorithm)
            assert algorithm.model.grouped_forward is not Conv4.grouped_forward.__get__(algorithm.model)
        algorithm.train_step(tasks, 0)
        gradients.append({n: p.grad.clone() for n, p in algorithm.named_parameters() if p.grad is not None})
        if compiled:  # compiling leaves the parameters, and so checkpoints, as they are
            assert set(algorithm.model.state_dict()) == set(Conv4(3, hidden=4).state_dict())
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 0
    assert _relative(list(gradients[0].values()), list(gradients[1].values())) < 1e-10


def test_compile_with_second_order_algorithms_compiles_batch_norms_double_backward():
    """Second-order algorithms cannot be compiled whole: hardware.compile=true compiles batch norm's double backward
    instead (norm_derivatives.compile_kernels), and refuses models without transductive batch norm."""
    from maml_runner.errors import UserError
    from maml_runner.hardware import compile_fast_path
    cfg = OmegaConf.create({"name": "maml", "inner_lr": 0.1, "inner_steps": 1, "outer_lr": 0.001,
                            "first_order": False})
    without_batch_norm = MAML(MLP(), cfg, "regression", 10)
    with pytest.raises(UserError, match=r"^hardware.compile=true with a second-order algorithm \(algorithm=maml\) "
                                        r"compiles transductive batch norm's double backward, which MLP does not "
                                        r"have \(model.bn=transductive\); use hardware.compile=false$"):
        compile_fast_path(without_batch_norm)
    with pytest.raises(UserError, match="which Conv4 does not have"):
        compile_fast_path(MAML(Conv4(3, bn="running"), cfg, "classification", 10))
    assert norm_derivatives._compiled_kernel is None
    try:
        second_order = MAML(Conv4(3), cfg, "classification", 10)
        compile_fast_path(second_order)
        assert norm_derivatives._compiled_kernel is not None
        assert "grouped_forward" not in vars(second_order.model)  # the forward itself stays eager
    finally:
        norm_derivatives.compile_kernels(False)
    first_order = MAML(MLP(), OmegaConf.merge(cfg, {"first_order": True}), "regression", 10)
    torch._dynamo.config.recompile_limit = 8  # torch's default
    compile_fast_path(first_order)  # first_order=true never differentiates twice: its whole forward is compiled
    assert "grouped_forward" in vars(first_order.model) and norm_derivatives._compiled_kernel is None
    # one graph per shape and inner step: past torch's default of 8 the forward would silently run eagerly
    assert torch._dynamo.config.recompile_limit == norm_derivatives.RECOMPILE_LIMIT


# ---- grouped_conv's convolution derivatives in the per-task loops ---------------------------------------------------
@pytest.mark.parametrize("name,first_order", [("maml", False), ("maml", True), ("metasgd", False), ("mamlpp", False)])
def test_per_task_loops_take_grouped_conv_in_second_order_steps_with_torchs_numbers(omniglot, name, first_order,
                                                                                     monkeypatch):
    """The per-task loops (hardware.vectorize=off; what 20w5s runs on CPU) adapt through models.Conv2d and
    models.BatchNorm2d (PerStepBatchNorm for MAML++), which take grouped_conv's and norm_derivatives' derivatives
    inside a second-order step: same float64 meta-gradient as torch's own rules."""
    random.seed(3)
    tasks = cached_episodes(omniglot["train"]).sample_batch(3)
    tasks = TaskBatch(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    forwards, norm_double_backwards = [], []
    original = grouped_conv._Conv.apply
    monkeypatch.setattr(grouped_conv._Conv, "apply",
                        lambda *a: forwards.append(torch.is_grad_enabled()) or original(*a))
    original_norm = norm_derivatives._BatchNormBackward.backward
    monkeypatch.setattr(norm_derivatives._BatchNormBackward, "backward",
                        staticmethod(lambda *a: norm_double_backwards.append(1) or original_norm(*a)))

    def meta_gradient(devices):
        monkeypatch.setattr(grouped_conv, "EXPLICIT_BACKWARD_DEVICES", devices)
        monkeypatch.setattr(norm_derivatives, "EXPLICIT_BACKWARD_DEVICES", devices)
        if name == "mamlpp":
            return list(_mamlpp_meta_gradient(lambda: Conv4(3, hidden=8).double(), tasks, "classification", 0.3, 2,
                                              7, False, "off")[1].values())
        torch.manual_seed(0)
        model = Conv4(3, hidden=8).double()
        cls = {"maml": MAML, "metasgd": MetaSGD}[name]
        return _meta_gradient(cls, model, tasks, "classification", 0.3, 2, first_order, "off")[1]

    torchs = meta_gradient(())
    assert not forwards and not norm_double_backwards  # switched off: torch's rules throughout
    ours = meta_gradient(("cpu",))
    assert (sum(forwards) > 0) == (not first_order)  # 4 convolutions x 2 steps x 3 tasks when second order
    assert (len(norm_double_backwards) > 0) == (not first_order)
    assert _relative(torchs, ours) < 1e-10


def test_compile_without_a_cpu_compiler_is_one_line_before_training():
    """torch.compile on CPU builds C++ on first use; without a compiler hardware.compile=true stops at once."""
    from torch._inductor import config as inductor_config
    from maml_runner.errors import UserError
    from maml_runner.hardware import compile_fast_path
    cfg = OmegaConf.create({"name": "fomaml", "inner_lr": 0.1, "inner_steps": 1, "outer_lr": 0.001,
                            "first_order": True})
    algorithm = FOMAML(Conv4(3), cfg, "classification", 10)
    default = inductor_config.cpp.cxx
    # inductor's own patch (pytest's monkeypatch deletes the key of torch's config module on undo)
    with inductor_config.patch({"cpp.cxx": ("no-such-compiler++",)}), \
            pytest.raises(UserError, match=r"^hardware.compile=true needs a C\+\+ compiler on CPU \(No working C\+\+ "
                                           r"compiler found in .*no-such-compiler.*; set CXX or install g\+\+\); "
                                           r"use hardware.compile=false$"):
        compile_fast_path(algorithm)
    assert "grouped_forward" not in vars(algorithm.model)
    assert inductor_config.cpp.cxx == default
