"""The runner on CUDA (skipped without a CUDA device; scripts/gpu_check.sh runs these with `-k cuda`).

- The fast path's MAML / FOMAML meta-step on CUDA gives the CPU's meta-gradient and updated weights (float64, so
  the only difference is rounding in different kernels), also without batch-norm gamma (model.bn_scale=false).
- A short `maml-run` on Omniglot-shaped fixture data with hardware=cuda trains, validates, tests and records the
  device it ran on.
"""
from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from maml_runner.algorithms import build_algorithm
from maml_runner.data.base import TaskBatch
from maml_runner.models import Conv4
from omniglot_fixture import make_fake_omniglot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _tasks(num_tasks: int, ways: int, seed: int) -> TaskBatch:
    generator = torch.Generator().manual_seed(seed)
    images = lambda: torch.rand(num_tasks, ways, 1, 28, 28, generator=generator, dtype=torch.float64)  # noqa: E731
    labels = torch.arange(ways).repeat(num_tasks, 1)
    return TaskBatch(images(), labels, images(), labels.clone())


def _relative_difference(a, b) -> float:
    num = sum(float((x.cpu() - y.cpu()).pow(2).sum()) for x, y in zip(a, b))
    return (num / sum(float(x.cpu().pow(2).sum()) for x in a)) ** 0.5


@needs_cuda
@pytest.mark.parametrize("name,bn_scale", [("maml", True), ("fomaml", True), ("maml", False)])
def test_fast_path_meta_step_on_cuda_equals_cpu(name, bn_scale):
    """bn_scale=False: without gamma, torch's own batch-norm double backward fails when beta is adapted; on CUDA
    too the step takes norm_derivatives' then."""
    torch.manual_seed(0)
    model = Conv4(5, bn_scale=bn_scale).double()
    cfg = OmegaConf.create(dict(name=name, inner_lr=0.4, inner_steps=1, outer_lr=0.001,
                                first_order=name == "fomaml"))
    on_cpu = build_algorithm(copy.deepcopy(model), cfg, "classification", 100, vectorize="on")
    on_cuda = build_algorithm(copy.deepcopy(model), cfg, "classification", 100, vectorize="on").to("cuda")
    tasks = _tasks(num_tasks=4, ways=5, seed=1)
    cuda_tasks = tasks.to(torch.device("cuda"))
    assert on_cuda.vectorized_for(cuda_tasks)
    on_cpu.train_step(tasks, iteration=0)
    on_cuda.train_step(cuda_tasks, iteration=0)
    cpu_grads = [p.grad for p in on_cpu.model.parameters()]
    cuda_grads = [p.grad for p in on_cuda.model.parameters()]
    assert all(g.is_cuda for g in cuda_grads)
    assert _relative_difference(cpu_grads, cuda_grads) < 1e-9
    # Adam took the same step on both devices.
    assert _relative_difference(list(on_cpu.model.parameters()), list(on_cuda.model.parameters())) < 1e-9
    assert _relative_difference(list(model.parameters()), list(on_cuda.model.parameters())) > 1e-6  # it moved


@needs_cuda
def test_short_maml_run_on_cuda(tmp_path):
    root = make_fake_omniglot(tmp_path / "omniglot", chars_per_alphabet=10)  # 40 characters
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "maml_runner.cli", "dataset=omniglot_5w1s", "model=conv4",
               f"dataset.root={root}", "dataset.split=[20,10,10]", "hardware=cuda", "train.iterations=20",
               "train.val_interval=10", "train.val_tasks=4", "eval.num_tasks=8", "report.enabled=false",
               f"hydra.run.dir={run_dir}"]
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"TQDM_DISABLE": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(run_dir / "results.csv") as handle:
        row = next(csv.DictReader(handle))
    assert row["device"].startswith("cuda")
    assert int(row["iterations_done"]) == 20 and int(row["n_tasks"]) == 8
    assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and float(row["seconds_per_iteration"]) > 0
