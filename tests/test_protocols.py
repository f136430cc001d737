"""The switches that make a paper preset run what the paper's released code ran (docs/protocols.md): each changes
what it should, on both training paths, and the presets compose to the released-code values."""
from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import compose_config
from maml_runner.algorithms import build_algorithm
from maml_runner.algorithms.base import sum_over_shots_loss
from maml_runner.checkpoint import load_checkpoint, save_checkpoint
from maml_runner.config import validate
from maml_runner.data.base import TaskBatch
from maml_runner.data.fast_episodes import cached_episodes
from maml_runner.data.omniglot import build_omniglot, load_omniglot
from maml_runner.errors import UserError
from maml_runner.models import Conv4, TFSamePad2d, outer_loop_only
from omniglot_fixture import make_fake_omniglot

FINN = dict(bn_scale=False, bn_eps=1e-3, bn_adapted=False, padding="tf_same", init="xavier", head_init="normal")


class _Source:
    """What build_algorithm reads from a training source."""

    def __init__(self, shots):
        self.shots = shots


def _maml(model, reduction="mean", shots=1, inner_lr=0.4, steps=1, first_order=False, vectorize="off",
          name="maml"):
    cfg = OmegaConf.create(dict(name=name, inner_lr=inner_lr, inner_steps=steps, outer_lr=0.0,
                                first_order=first_order, loss_reduction=reduction))
    return build_algorithm(model, cfg, "classification", 10, train_source=_Source(shots), vectorize=vectorize)


def _tasks(count=3, ways=5, shots=2, query=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = lambda k: torch.arange(ways).repeat_interleave(k).repeat(count, 1)  # noqa: E731
    return TaskBatch(torch.rand(count, ways * shots, 1, 28, 28, generator=g, dtype=dtype), labels(shots),
                     torch.rand(count, ways * query, 1, 28, 28, generator=g, dtype=dtype), labels(query))


# ---- inner-loss scale ----------------------------------------------------------------------------------------------
def test_sum_over_shots_is_finn_xent_and_scales_the_gradient_by_ways():
    ways, shots = 5, 2
    logits = torch.randn(ways * shots, ways, dtype=torch.float64, requires_grad=True)
    targets = torch.arange(ways).repeat_interleave(shots)
    finn = (F.cross_entropy(logits, targets, reduction="none") / shots).sum()  # xent summed by tf.gradients
    assert sum_over_shots_loss(shots)(logits, targets).item() == pytest.approx(finn.item(), rel=1e-12)
    (g_sum,) = torch.autograd.grad(sum_over_shots_loss(shots)(logits, targets), logits)
    (g_mean,) = torch.autograd.grad(F.cross_entropy(logits, targets), logits)
    assert torch.allclose(g_sum, ways * g_mean, rtol=1e-12, atol=0)


def test_sum_over_shots_inner_step_equals_mean_with_ways_times_the_rate():
    ways, shots, alpha = 5, 2, 0.1
    task = _tasks(1, ways, shots)[0]
    torch.manual_seed(0)
    model = Conv4(ways, hidden=6).double()
    summed = _maml(copy.deepcopy(model), "sum_over_shots", shots, inner_lr=alpha).adapt(task, 1)
    mean = _maml(copy.deepcopy(model), "mean", shots, inner_lr=alpha * ways).adapt(task, 1)
    for a, b in zip(summed.parameters(), mean.parameters()):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    plain = _maml(copy.deepcopy(model), "mean", shots, inner_lr=alpha).adapt(task, 1)
    assert not all(torch.allclose(a, b) for a, b in zip(summed.parameters(), plain.parameters()))


def test_reported_losses_stay_means_under_sum_over_shots():
    ways, shots = 5, 2
    task = _tasks(1, ways, shots)[0]
    torch.manual_seed(0)
    model = Conv4(ways, hidden=6).double()
    algorithm = _maml(model, "sum_over_shots", shots)
    loss, _ = algorithm.evaluate_task(task, 0)
    assert loss == pytest.approx(F.cross_entropy(model(task.query_x), task.query_y).item(), rel=1e-10)


def test_sum_over_shots_is_refused_for_regression():
    cfg = compose_config(["algorithm.loss_reduction=sum_over_shots"])
    from maml_runner.models import build_model
    with pytest.raises(UserError, match=r"algorithm.loss_reduction=sum_over_shots applies to classification"):
        build_algorithm(build_model(cfg.model, cfg.dataset), cfg.algorithm, "regression", 10)


# ---- batch norm, padding, initialisation ------------------------------------------------------------------------------
def test_finn_batch_norm_has_no_gamma_eps_1e3_and_beta_only_in_the_outer_loop():
    torch.manual_seed(0)
    model = Conv4(5, hidden=6, **FINN).double()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 4 and all(m.weight is None and m.bias is not None and m.eps == 1e-3 for m in norms)
    frozen = outer_loop_only(model)
    assert frozen == {n for n, _ in model.named_parameters() if n.endswith(".bias") and
                      isinstance(model.get_submodule(n.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)}
    algorithm = _maml(model, "sum_over_shots", 2, steps=2)
    task = _tasks(1)[0]
    adapted = dict(algorithm.adapt(task, 2, iteration=0).module.named_parameters())
    before = dict(model.named_parameters())
    for name in before:
        if name in frozen:
            assert torch.equal(adapted[name], before[name]), name  # beta stays
        elif name.endswith("weight") or name.startswith("head"):  # (a conv bias before BN has zero gradient)
            assert not torch.equal(adapted[name], before[name]), name
    algorithm.train_step(TaskBatch(*(t.unsqueeze(0) for t in task)), 0)
    assert all(before[n].grad is not None and before[n].grad.abs().sum() > 0 for n in frozen)  # outer gradient


def test_bn_adapted_false_is_refused_by_algorithms_that_adapt_everything():
    cfg = compose_config(["dataset=omniglot_5w1s", "algorithm=metasgd", "model.bn_adapted=false"])
    from maml_runner.models import build_model
    with pytest.raises(UserError, match=r"model.bn_adapted=false is supported by maml, fomaml, anil and mamlpp; "
                                        r"algorithm=metasgd adapts every parameter"):
        build_algorithm(build_model(cfg.model, cfg.dataset), cfg.algorithm, "classification", 10)


@pytest.mark.parametrize("first_order,steps", [(False, 1), (False, 2), (True, 2)])
def test_finn_model_vectorized_meta_gradient_equals_per_task_loop(first_order, steps):
    tasks = _tasks(3, ways=5, shots=1, query=1)
    torch.manual_seed(0)
    model = Conv4(5, hidden=6, **FINN).double()
    grads = {}
    for vectorize in ("off", "on"):
        net = copy.deepcopy(model)
        algorithm = _maml(net, "sum_over_shots", 1, steps=steps, first_order=first_order, vectorize=vectorize)
        assert algorithm.vectorized_for(tasks) == (vectorize == "on")
        algorithm.train_step(tasks, 0)  # Adam with lr 0 leaves the parameters; .grad holds the meta-gradient
        grads[vectorize] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert float((grads["on"] - grads["off"]).norm() / grads["off"].norm()) < 1e-10


@pytest.mark.parametrize("size,expected", [(28, (0, 1)), (14, (0, 1)), (7, (1, 1)), (4, (0, 1)), (5, (1, 1))])
def test_tf_same_padding_amounts(size, expected):
    assert TFSamePad2d(3, 2).amounts(size) == expected
    assert TFSamePad2d(3, 1).amounts(size) == (1, 1)  # stride 1: symmetric, as PyTorch's padding=1


def test_tf_same_padding_drops_the_top_left_pad():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    weight = torch.rand(3, 1, 3, 3, dtype=torch.float64)
    same = F.conv2d(TFSamePad2d(3, 2)(x), weight, stride=2)
    # TensorFlow 'SAME', stride 2, 28 -> 14: output (i, j) sees rows/cols 2i..2i+2 of the input, zero past the end.
    padded = F.pad(x, (0, 1, 0, 1))
    i, j = 3, 5
    assert same.shape[-2:] == (14, 14)
    assert same[0, 1, i, j].item() == pytest.approx((padded[0, 0, 2 * i:2 * i + 3, 2 * j:2 * j + 3] * weight[1, 0]).sum().item())
    assert not torch.allclose(same, F.conv2d(x, weight, stride=2, padding=1))  # PyTorch's symmetric padding differs
    assert Conv4(5, padding="tf_same")(torch.rand(3, 1, 28, 28)).shape == (3, 5)


def test_xavier_init_and_normal_head():
    torch.manual_seed(0)
    model = Conv4(20, hidden=64, init="xavier", head_init="normal")
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound  # Glorot uniform
        assert torch.count_nonzero(conv.bias) == 0
    assert model.head.weight.std().item() == pytest.approx(1.0, abs=0.1)  # N(0, 1): 1,280 draws
    assert torch.count_nonzero(model.head.bias) == 0
    default = Conv4(20, hidden=64)
    assert default.head.weight.abs().max() <= 1 / math.sqrt(64)  # PyTorch's default bound, far from N(0, 1)


# ---- images ------------------------------------------------------------------------------------------------------------
def test_binary_nearest_images_are_binary_and_lanczos_ones_are_not(tmp_path):
    root = make_fake_omniglot(tmp_path / "data")
    binary = load_omniglot(root, 28, cache_dir=tmp_path / "cache", resize="binary_nearest").images
    gray = load_omniglot(root, 28, cache_dir=tmp_path / "cache", resize="lanczos").images
    assert set(binary.unique().tolist()) == {0, 255}  # ink 255 -> 1.0 after scaling, as cbfinn/maml's 1 - x/255
    assert len(gray.unique()) > 10
    assert binary.float().mean() < 128  # ink (the bars) is the minority: ink = 1, background = 0
    assert (binary.float() / 255 - gray.float() / 255).abs().mean() < 0.1  # the same drawings
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # one cache per resize mode


@pytest.mark.parametrize("experiment", ["nichol2018_reptile_5w1s", "antoniou2019_mamlpp_5w1s"])
def test_ink_zero_keeps_the_pngs_polarity_as_reptile_and_mamlpp_load_them(tmp_path, experiment):
    ink0 = _fixture_sources(experiment, tmp_path)  # the preset: dataset.ink=0
    ink1 = _fixture_sources(experiment, tmp_path, "dataset.ink=1")
    for split in ("train", "test"):
        dark, bright = ink0[split].images.images, ink1[split].images.images
        assert torch.equal(dark, 1 - bright)
        assert set(dark.unique().tolist()) == {0.0, 1.0} and dark.mean() > 0.5  # binary; background 1, ink 0
    random.seed(3)
    task = cached_episodes(ink0["train"]).sample_batch(2)  # the fast sampler serves the same images
    assert task.support_x.mean() > 0.5


@pytest.mark.parametrize("value,shown", [(2, "2"), ("white", "'white'"), (True, "true")])
def test_bad_ink_is_one_line_error(tmp_path, value, shown):
    dataset = OmegaConf.create(OmegaConf.to_container(compose_config(["dataset=omniglot_5w1s"]).dataset))
    dataset.ink = value  # untyped: the loader's own check (the composed config's schema refuses these earlier)
    with pytest.raises(UserError) as error:
        build_omniglot(dataset)
    assert str(error.value) == (f"dataset.ink={shown} is invalid: expected 1 (ink 1 on a background of 0, "
                                f"cbfinn/maml) or 0 (ink 0 on a background of 1, supervised-reptile and MAML++)")


def test_rotations_as_classes_makes_each_training_rotation_a_class(tmp_path):
    plain = _fixture_sources("nichol2018_reptile_5w1s", tmp_path, "dataset.rotations_as_classes=false")
    sources = _fixture_sources("nichol2018_reptile_5w1s", tmp_path)  # the preset: true
    train, before = sources["train"], plain["train"]
    assert train.num_classes == 4 * before.num_classes and train.quarter_turns == [0]
    assert train.num_pooled_classes == before.num_pooled_classes  # the pretrain baseline's classes are unchanged
    images, labels = train.images.images, torch.tensor(train.images.labels)
    drawing = before.images.images[0]
    character = before.images.labels[0]
    for i in range(4):  # class character*4 + i holds the drawings turned i quarter turns
        turned = images[labels == character * 4 + i]
        assert turned.shape[0] == 20 and any(torch.equal(x, torch.rot90(drawing, i, dims=(-2, -1))) for x in turned)
    assert sources["test"].num_classes == plain["test"].num_classes  # test classes are characters, unrotated
    random.seed(0)
    tasks = cached_episodes(train).sample_batch(4)  # the fast sampler draws from the enlarged class set
    assert tasks.support_x.shape == (4, 3, 1, 28, 28)


def test_bad_rotations_as_classes_is_one_line_error(tmp_path):
    root = make_fake_omniglot(tmp_path / "data")
    dataset = OmegaConf.create(OmegaConf.to_container(compose_config(
        ["experiment=nichol2018_reptile_5w1s", f"dataset.root={root}", f"dataset.cache_dir={tmp_path}"]).dataset))
    dataset.rotations_as_classes = "maybe"  # untyped: the loader's own check (the schema refuses it earlier)
    with pytest.raises(UserError, match=r"^dataset.rotations_as_classes='maybe' is invalid: expected true or false$"):
        build_omniglot(dataset)


# ---- presets -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", ["5w1s", "5w5s", "20w1s", "20w5s"])
@pytest.mark.parametrize("algorithm", ["maml", "fomaml"])
def test_finn2017_presets_compose_to_the_released_code(algorithm, setting):
    cfg = compose_config([f"experiment=finn2017_{algorithm}_{setting}"])
    validate(cfg)
    ways = int(setting.split("w")[0])
    assert cfg.algorithm.loss_reduction == "sum_over_shots"
    assert cfg.algorithm.inner_lr == {5: 0.4, 20: 0.1}[ways]  # the flag value, on the summed loss: alpha * N = 2.0
    assert (cfg.model.bn_scale, cfg.model.bn_eps, cfg.model.bn_adapted) == (False, 1e-3, False)
    assert (cfg.model.padding, cfg.model.pooling, cfg.model.init, cfg.model.head_init) == \
        ("tf_same", "stride", "xavier", "normal")
    assert cfg.dataset.image_resize == "binary_nearest" and cfg.eval.checkpoint == "last"
    assert cfg.dataset.query_shots == cfg.dataset.shots


def test_generic_presets_keep_the_runner_defaults():
    cfg = compose_config(["dataset=omniglot_5w1s"])
    assert cfg.algorithm.loss_reduction == "mean" and cfg.dataset.image_resize == "lanczos" and cfg.dataset.ink == 1
    assert (cfg.model.bn_scale, cfg.model.bn_adapted, cfg.model.padding, cfg.model.init) == \
        (True, True, "symmetric", "pytorch")
    assert cfg.eval.checkpoint == "best"


def test_mamlpp_default_has_no_derivative_order_annealing():
    cfg = compose_config(["algorithm=mamlpp"])
    assert cfg.algorithm.derivative_order_annealing is False
    from maml_runner.models import build_model
    algorithm = build_algorithm(build_model(cfg.model, cfg.dataset), cfg.algorithm, "regression", 100)
    assert not algorithm.first_order_at(0)  # second order from the first iteration (released configs: epoch -1)


@pytest.mark.parametrize("override,message", [
    ("model.padding=same", "model.padding='same' is invalid: expected one of symmetric, tf_same"),
    ("algorithm.loss_reduction=sum", "algorithm.loss_reduction='sum' is invalid: expected one of mean, sum_over_shots"),
    ("dataset.image_resize=bicubic", "dataset.image_resize='bicubic' is invalid: expected one of lanczos, "
                                     "binary_nearest"),
    ("model.bn_eps=0", "model.bn_eps=0 is invalid: expected a positive number (> 0)"),
])
def test_bad_switch_values_are_one_line_errors(override, message):
    cfg = compose_config(["dataset=omniglot_5w1s", override])
    with pytest.raises(UserError) as error:
        validate(cfg)
    assert str(error.value) == message


def test_faithful_preset_trains_end_to_end_on_the_fixture(tmp_path):
    from maml_runner.train import run
    root = make_fake_omniglot(tmp_path / "data")
    cfg = compose_config(["experiment=finn2017_maml_5w1s", f"dataset.root={root}", f"dataset.cache_dir={tmp_path}",
                          "dataset.ways=3", "dataset.split=[6,3,3]", "model.hidden=8", "train.iterations=6",
                          "train.val_interval=3", "train.val_tasks=4", "train.meta_batch_size=2",
                          "eval.num_tasks=5", "hardware=cpu"])
    row = run(cfg, tmp_path / "run")
    assert row["checkpoint"] == "last" and row["iterations_done"] == 6 and 0 <= row["mean"] <= 1


# ---- Reptile's inner optimizer ------------------------------------------------------------------------------------------
def _reptile(state: str, eval_optimizer: str = "sgd", optimizer: str = "adam", inner_batch_size=None,
             eval_inner_batch_size=None):
    cfg = OmegaConf.create(dict(name="reptile", inner_lr=0.001, inner_steps=3, outer_lr=0.001, first_order=True,
                                inner_optimizer=optimizer, inner_betas=[0.0, 0.999], meta_step_size=1.0,
                                eval_inner_lr=None, loss_reduction="mean", inner_optimizer_state=state,
                                eval_optimizer=eval_optimizer, inner_batch_size=inner_batch_size,
                                eval_inner_batch_size=eval_inner_batch_size))
    torch.manual_seed(0)
    return build_algorithm(Conv4(5, hidden=4).double(), cfg, "classification", 10, train_source=_Source(1))


def _adam_steps(algorithm) -> set[int]:
    return {int(v["step"]) for v in algorithm.inner_state["state"].values()}


def test_reptile_persistent_inner_adam_carries_over_across_tasks_and_iterations():
    tasks = _tasks(2, 5, 1, 1)
    persistent, fresh = _reptile("persistent"), _reptile("fresh")
    persistent.train_step(tasks, 0)
    assert _adam_steps(persistent) == {2 * 3}  # two tasks of three steps in one optimizer
    persistent.train_step(tasks, 1)
    assert _adam_steps(persistent) == {4 * 3}
    fresh.train_step(tasks, 0)
    assert fresh.inner_state is None  # switched off: every task gets a new Adam
    # The second task starts from the first task's moments, so the meta-step differs from fresh optimizers'.
    once = _reptile("persistent")
    once.train_step(tasks, 0)
    assert not all(torch.allclose(a, b) for a, b in zip(once.model.parameters(), fresh.model.parameters()))
    only_first = _reptile("persistent"), _reptile("fresh")
    only_first[1].vectorize = "off"  # the per-task loop both (a fresh Adam may take the fast path: other rounding)
    for algorithm in only_first:
        algorithm.train_step(tasks.slice(0, 1), 0)  # one task: nothing carried yet, the same step either way
    assert all(torch.equal(a, b) for a, b in zip(only_first[0].model.parameters(), only_first[1].model.parameters()))


def test_reptile_evaluation_with_the_inner_adam_starts_from_its_state_and_restores_it(tmp_path):
    tasks = _tasks(2, 5, 1, 1)
    algorithm = _reptile("persistent", eval_optimizer="inner")
    algorithm.train_step(tasks, 0)
    saved = copy.deepcopy(algorithm.inner_state)
    loss, _ = algorithm.evaluate_task(tasks[1], 5)
    assert all(torch.equal(saved["state"][i]["exp_avg_sq"], algorithm.inner_state["state"][i]["exp_avg_sq"])
               for i in saved["state"])  # evaluation leaves the training state as it was
    assert _adam_steps(algorithm) == {6}
    fresh_eval = _reptile("fresh", eval_optimizer="inner")
    fresh_eval.model.load_state_dict(algorithm.model.state_dict())
    assert fresh_eval.evaluate_task(tasks[1], 5)[0] != pytest.approx(loss, rel=1e-9)  # the state matters
    restored = _reptile("persistent", eval_optimizer="inner")
    save_checkpoint(tmp_path / "last.pt", {"algorithm": algorithm.checkpoint_state()})
    restored.load_checkpoint_state(load_checkpoint(tmp_path / "last.pt")["algorithm"])  # resume keeps the state
    assert restored.evaluate_task(tasks[1], 5)[0] == pytest.approx(loss, rel=1e-12)


@pytest.mark.parametrize("examples,size,steps", [(50, 10, 5), (5, 10, 3), (20, 10, 5)])
def test_reptile_mini_batches_are_reshuffled_passes_as_supervised_reptile(examples, size, steps):
    algorithm = _reptile("fresh", inner_batch_size=size)
    torch.manual_seed(1)
    batches = algorithm.mini_batches(examples, steps, training=True)
    assert [len(b) for b in batches] == [size] * steps
    order = torch.cat(batches).tolist()
    for start in range(0, len(order), examples):  # every full pass is a permutation of all the examples
        chunk = order[start:start + examples]
        assert len(set(chunk)) == len(chunk) and (len(chunk) < examples or sorted(chunk) == list(range(examples)))
    torch.manual_seed(1)
    assert all(torch.equal(a, b) for a, b in zip(batches, algorithm.mini_batches(examples, steps, True)))
    assert algorithm.mini_batches(examples, steps, training=False) is None  # eval_inner_batch_size=null: full batch


def test_reptile_inner_steps_train_on_their_mini_batch_only():
    algorithm = _reptile("fresh", optimizer="sgd", inner_batch_size=4)
    algorithm.cfg.inner_lr = 0.5
    task = _tasks(1, 5, 1, 1)[0]  # 10 examples (support + query)
    torch.manual_seed(2)
    learner = algorithm.adapt(task, 1, iteration=0)
    torch.manual_seed(2)
    rows = algorithm.mini_batches(10, 1, training=True)[0]
    x, y = torch.cat([task.support_x, task.query_x])[rows], torch.cat([task.support_y, task.query_y])[rows]
    manual = copy.deepcopy(algorithm.model)
    F.cross_entropy(manual(x), y).backward()
    for adapted, p in zip(learner.parameters(), manual.parameters()):
        assert torch.allclose(adapted, p - 0.5 * p.grad, rtol=0, atol=1e-12)


def test_reptile_evaluation_mini_batches_repeat_exactly():
    tasks = _tasks(2, 5, 2, 1)
    batched = _reptile("fresh", eval_inner_batch_size=3)
    full = _reptile("fresh")
    first = [batched.evaluate_task(t, 5) for t in tasks]
    torch.manual_seed(123)  # the global RNG does not enter evaluation: re-testing a checkpoint gives the same numbers
    assert [batched.evaluate_task(t, 5) for t in tasks] == first
    assert [full.evaluate_task(t, 5) for t in tasks] != first


def test_nichol2018_presets_set_the_released_mini_batches():
    for setting, (inner, evaluation) in {"5w1s": (10, 5), "20w1s": (20, 10)}.items():
        cfg = compose_config([f"experiment=nichol2018_reptile_{setting}"])
        validate(cfg)
        assert (cfg.algorithm.inner_batch_size, cfg.algorithm.eval_inner_batch_size) == (inner, evaluation)


def _fixture_sources(experiment: str, tmp_path, *overrides):
    """A preset's episode sources on a tiny generated Omniglot (3-way, 6/3/3 characters)."""
    root = make_fake_omniglot(tmp_path / "data")
    cfg = compose_config([f"experiment={experiment}", f"dataset.root={root}", "dataset.ways=3",
                          "dataset.split=[6,3,3]", f"dataset.cache_dir={tmp_path}", *overrides])
    return build_omniglot(cfg.dataset)


def test_eval_query_shots_sets_the_query_size_of_validation_and_test_tasks(tmp_path):
    sources = _fixture_sources("nichol2018_reptile_5w1s", tmp_path)
    random.seed(0)
    assert sources["train"].sample().query_x.shape[0] == 3 * 9
    assert sources["test"].sample().query_x.shape[0] == 3 * 1 and sources["validation"].query_shots == 1
    assert cached_episodes(sources["train"]).query_shots == 9


def test_nichol2018_presets_run_the_released_inner_optimizer():
    cfg = compose_config(["experiment=nichol2018_reptile_20w1s"])
    validate(cfg)
    assert (cfg.algorithm.inner_optimizer, cfg.algorithm.inner_optimizer_state, cfg.algorithm.eval_optimizer) == \
        ("adam", "persistent", "inner")
    assert cfg.dataset.eval_query_shots == 1 and cfg.model.bn_eps == 1e-3 and cfg.model.padding == "tf_same"


@pytest.mark.parametrize("setting", ["5w1s", "5w5s", "20w1s", "20w5s"])
def test_nichol2018_presets_split_test_the_last_model_and_flatten_the_head(setting):
    """run_omniglot.py: split_dataset(num_train=1200) with no validation set, the model as training left it, and
    OmniglotModel's tf.reshape of the 2x2x64 feature map into the dense layer; 10,000 test tasks."""
    cfg = compose_config([f"experiment=nichol2018_reptile_{setting}"])
    validate(cfg)
    assert list(cfg.dataset.split) == [1200, 0, 423] and cfg.eval.checkpoint == "last"
    assert cfg.eval.num_tasks == 10000  # evaluate(num_samples=--eval-samples), default 10,000
    assert cfg.model.head_features == "flatten" and cfg.model.pooling == "stride"
    from maml_runner.models import build_model
    model = build_model(cfg.model, cfg.dataset)
    assert model.head.in_features == 64 * 2 * 2 and model.head.out_features == int(setting.split("w")[0])
    assert not any(isinstance(m, torch.nn.AdaptiveAvgPool2d) for m in model.modules())


@pytest.mark.parametrize("kwargs,features", [
    (dict(), 8),                                                      # pooling=stride: its own spatial mean
    (dict(head_features="mean"), 8),
    (dict(head_features="flatten"), 8 * 2 * 2),                       # 28 -> 14 -> 7 -> 4 -> 2
    (dict(head_features="flatten", padding="tf_same"), 8 * 2 * 2),
    (dict(head_features="flatten", image_size=40), 8 * 3 * 3),        # 40 -> 20 -> 10 -> 5 -> 3
    (dict(head_features="flatten", layers=2), 8 * 7 * 7),             # 28 -> 14 -> 7
    (dict(pooling="max"), 8 * 1 * 1),                                 # pooling=max: its own flatten
    (dict(pooling="max", image_size=84, in_channels=3), 8 * 5 * 5),   # 84 -> 42 -> 21 -> 10 -> 5
    (dict(pooling="max", head_features="mean", image_size=84, in_channels=3), 8),
])
def test_head_features_size_the_head_from_the_last_feature_map(kwargs, features):
    """model.head_features: the head's inputs are the body's actual output (computed, for any size and depth)."""
    net = Conv4(5, hidden=8, **kwargs)
    size = kwargs.get("image_size", 28)
    body = net.body(torch.rand(2, kwargs.get("in_channels", 1), size, size))
    assert body.shape == (2, features) and net.head.in_features == features
    assert net(torch.rand(2, kwargs.get("in_channels", 1), size, size)).shape == (2, 5)


def test_head_features_default_keeps_each_pooling_s_own_network():
    """null (conf/model/conv4.yaml) builds the network every earlier config built: same modules, same parameters."""
    cfg = compose_config(["dataset=omniglot_5w1s"])
    assert cfg.model.head_features is None
    from maml_runner.models import build_model
    for pooling, own in (("stride", "mean"), ("max", "flatten")):
        cfg.model.pooling = pooling
        torch.manual_seed(0)
        default = build_model(cfg.model, cfg.dataset)
        torch.manual_seed(0)
        explicit = Conv4(5, pooling=pooling, head_features=own)
        assert [type(m) for m in default.body] == [type(m) for m in explicit.body]
        assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))


def test_bad_head_features_is_one_line_error():
    cfg = compose_config(["dataset=omniglot_5w1s", "model.head_features=max"])
    with pytest.raises(UserError) as error:
        validate(cfg)
    assert str(error.value) == ("model.head_features='max' is invalid: expected null (mean for pooling=stride, "
                                "flatten for pooling=max), mean or flatten")


# ---- MAML++'s network and preset ----------------------------------------------------------------------------------------
def test_max_pool_network_shapes_and_task_grouped_gradients():
    torch.manual_seed(0)
    net = Conv4(5, hidden=4, layers=2, pooling="max", activation="leaky_relu", init="xavier").double()
    assert net.head.in_features == 4 * 7 * 7  # 28 -> 14 -> 7 after two blocks: flattened, not averaged
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 2
    assert all(m.stride == (1, 1) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in net.modules()) == 2
    assert Conv4(5, pooling="max")(torch.rand(2, 1, 28, 28)).shape == (2, 5)  # 28 -> 14 -> 7 -> 3 -> 1
    tasks = _tasks(3, ways=5, shots=1, query=2)
    grads = {}
    for vectorize in ("off", "on"):
        model = copy.deepcopy(net)
        _maml(model, steps=2, vectorize=vectorize).train_step(tasks, 0)
        grads[vectorize] = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((grads["on"] - grads["off"]).norm() / grads["off"].norm()) < 1e-10


@pytest.mark.parametrize("setting", ["5w1s", "20w5s"])
def test_antoniou2019_presets_compose_to_the_released_configs(setting):
    cfg = compose_config([f"experiment=antoniou2019_mamlpp_{setting}"])
    validate(cfg)
    assert cfg.algorithm.derivative_order_annealing is False and cfg.algorithm.msl_fraction == 0.1
    assert (cfg.model.pooling, cfg.model.activation, cfg.model.init) == ("max", "leaky_relu", "xavier")
    assert cfg.dataset.query_shots == 1 and list(cfg.dataset.split) == [1150, 50, 423]
    assert list(cfg.dataset.eval_rotations) == [0] and cfg.train.meta_batch_size == 8


def test_eval_rotations_leave_test_classes_unrotated(tmp_path):
    sources = _fixture_sources("antoniou2019_mamlpp_5w1s", tmp_path)
    random.seed(1)
    for _ in range(5):
        task = sources["test"].sample()  # every drawing appears upright: equal to one of the stored images
        stored = sources["test"].images.images
        assert all(any(torch.equal(x, s) for s in stored) for x in task.support_x)
    assert sources["train"].quarter_turns == [0, 1, 2, 3] and sources["test"].quarter_turns == [0]
