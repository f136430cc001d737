"""Same seed and config -> identical numbers; another seed -> another training task stream, but the same
validation and test tasks (fixed by eval.seed), so algorithms and seeds are compared on the same tasks."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from maml_runner.io import read_csv
from maml_runner.train import build, run

TINY = ["train.iterations=20", "train.val_interval=10", "train.val_tasks=4", "train.meta_batch_size=2",
        "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1", "hardware.deterministic=true"]
TIMING_COLUMNS = {"train_seconds", "seconds_per_iteration", "peak_memory_mb", "elapsed_seconds"}


def numbers(run_dir, name):
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in read_csv(run_dir / name)]


def same_tasks(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ta, tb in zip(a, b) for x, y in zip(ta, tb))


def test_same_seed_gives_identical_results_and_another_seed_does_not(tmp_path):
    run(compose_config(TINY), tmp_path / "a")
    run(compose_config(TINY), tmp_path / "b")
    run(compose_config([*TINY, "seed=1"]), tmp_path / "c")
    for name in ("metrics.csv", "results.csv"):
        assert numbers(tmp_path / "a", name) == numbers(tmp_path / "b", name), name  # exact, as text
    assert numbers(tmp_path / "a", "metrics.csv") != numbers(tmp_path / "c", "metrics.csv")


def started(seed: int, tmp_path, *overrides):
    """A trainer as a run with this seed starts, and the first training tasks it draws."""
    trainer = build(compose_config([*TINY, f"seed={seed}", *overrides]), tmp_path)  # seeds the global streams
    return trainer, [trainer.sources["train"].sample() for _ in range(4)]


@pytest.fixture(params=["sinusoid", "omniglot"])
def dataset(request, tmp_path_factory) -> list[str]:
    if request.param == "sinusoid":
        return []
    from omniglot_fixture import make_fake_omniglot
    root = make_fake_omniglot(tmp_path_factory.mktemp("omniglot"))
    return ["dataset=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={root}/cache", "dataset.ways=3",
            "dataset.split=[6,3,3]", "model.hidden=8"]


def test_seeds_change_training_tasks_but_not_validation_or_test_tasks(dataset, tmp_path):
    (first, train_a), (second, train_b), (_, train_a_again) = (started(seed, tmp_path, *dataset) for seed in (0, 1, 0))
    assert not same_tasks(train_a, train_b) and same_tasks(train_a, train_a_again)

    eval_seed = int(first.cfg.eval.seed)
    tests = [t.sources["test"].fixed_tasks(8, eval_seed) for t in (first, second)]
    vals = [t.sources["validation"].fixed_tasks(4, eval_seed + 1) for t in (first, second)]
    assert same_tasks(*tests) and same_tasks(*vals)
    assert not same_tasks(tests[0][:4], vals[0]) and not same_tasks(tests[0][:4], train_a)

    other, _ = started(0, tmp_path, *dataset, "eval.seed=99")
    assert not same_tasks(tests[0], other.sources["test"].fixed_tasks(8, int(other.cfg.eval.seed)))
