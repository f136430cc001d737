"""Sinusoid MAML train step at 1 vs 2 torch intra-op threads, alternating in one process, same meta-batches.

Checks the `hardware.threads: 1` of `conf/dataset/sinusoid.yaml`: prints ms/iter per thread count and the ratio
(2 threads / 1 thread) for the vectorized and the per-task path.

    .venv/bin/python scripts/bench_threads.py      # ~15 s
"""
from __future__ import annotations

import random
import statistics
import sys
import time

import torch
from omegaconf import OmegaConf

from maml_runner.algorithms import build_algorithm
from maml_runner.data.sinusoid import SinusoidTasks
from maml_runner.models import MLP


def main() -> int:
    cfg = OmegaConf.create(dict(name="maml", inner_lr=0.01, inner_steps=1, outer_lr=1e-3, first_order=False))
    for vectorize in ("on", "off"):
        torch.manual_seed(0)
        source = SinusoidTasks(5, 10)
        algorithm = build_algorithm(MLP(), cfg, "regression", 100, vectorize=vectorize)
        times = {1: [], 2: []}
        for repeat in range(6):
            for threads in ((1, 2) if repeat % 2 else (2, 1)):
                torch.set_num_threads(threads)
                random.seed(repeat)
                batches = [source.sample_batch(25) for _ in range(50)]
                started = time.perf_counter()
                for batch in batches:
                    algorithm.train_step(batch, 0)
                times[threads].append((time.perf_counter() - started) / len(batches))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        print(f"vectorize={vectorize}: 1 thread {one * 1e3:.2f} ms/iter, 2 threads {two * 1e3:.2f} ms/iter, "
              f"ratio {two / one:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
