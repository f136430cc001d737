"""s/iter of Finn et al. 2017's miniImageNet protocol on this CPU: the per-task loop (hardware.vectorize=off) vs the
grouped fast path (on), in one process, alternating, on the same meta-batches from the same weights.

The data is a generated miniImageNet in learn2learn's pickle layout (random 84x84 RGB images: the time does not
depend on the pixels), read through the runner's own loader. Each case composes `experiment=finn2017_<algorithm>_
miniimagenet_5w1s` (Conv4 with 32 filters and max-pooling, 5 inner steps, summed loss, element-wise clip) and
overrides only the meta-batch and the query images per class. Printed per case: the median s/iter of the train
step for both paths, their ratio, what `hardware.vectorize=auto` would pick today, the relative difference of the
first meta-gradients (float32 on the whole batch / float64 on its first two tasks), and the median time to sample one
meta-batch.

    .venv/bin/python scripts/bench_miniimagenet.py --threads 1                          # meta-batch 4 and 32
    .venv/bin/python scripts/bench_miniimagenet.py --threads 1 --meta-batch 4 --query 1 3 7 15   # threshold sweep
"""
from __future__ import annotations

import argparse
import os
import pickle
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from maml_runner.algorithms import build_algorithm
from maml_runner.algorithms.vectorized import use_vectorized
from maml_runner.data import build_sources
from maml_runner.models import build_model
from maml_runner.paths import CONF_DIR

SPLITS = {"train": 16, "validation": 5, "test": 5}  # classes per split of the generated data


def make_random_miniimagenet(root: Path, per_class: int) -> Path:
    rng = np.random.RandomState(0)
    for split, classes in SPLITS.items():
        images = rng.randint(0, 256, size=(classes * per_class, 84, 84, 3), dtype=np.uint8)
        class_dict = {f"{split}_{c:02d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(classes)}
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as handle:
            pickle.dump({"image_data": images, "class_dict": class_dict}, handle)
    return root


def config(algorithm: str, root: Path, meta_batch: int, query: int):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose(config_name="config", overrides=[
            f"experiment=finn2017_{algorithm}_miniimagenet_5w1s", f"dataset.root={root}",
            f"train.meta_batch_size={meta_batch}", f"dataset.query_shots={query}", "hardware=cpu"])


def build(cfg, source, vectorize: str):
    torch.manual_seed(0)  # the same initial weights for both paths
    model = build_model(cfg.model, cfg.dataset)
    algorithm = build_algorithm(model, cfg.algorithm, source.task_type, int(cfg.train.iterations),
                                train_source=source, vectorize=vectorize)
    algorithm.grad_clip_value = cfg.train.get("grad_clip_value")
    return algorithm


def relative_difference(a, b) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    return (num / sum(float(x.pow(2).sum()) for x in a)) ** 0.5


def float64_difference(cfg, source, tasks) -> float:
    """The same comparison in float64 on the batch's first two tasks: float32 rounding apart, the paths agree."""
    tasks = tasks.slice(0, 2)
    tasks = type(tasks)(tasks.support_x.double(), tasks.support_y, tasks.query_x.double(), tasks.query_y)
    gradients = []
    for name in ("off", "on"):
        algorithm = build(cfg, source, name).double()
        algorithm.train_step(tasks, 0)
        gradients.append([p.grad.detach().clone() for p in algorithm.parameters() if p.grad is not None])
    return relative_difference(*gradients)


def run_case(algorithm_name: str, root: Path, meta_batch: int, query: int, iterations: int) -> dict:
    cfg = config(algorithm_name, root, meta_batch, query)
    source = build_sources(cfg.dataset)["train"]
    algorithms = {name: build(cfg, source, name) for name in ("off", "on")}
    times, sampling = {"off": [], "on": []}, []
    difference = difference64 = auto = None
    for i in range(iterations + 1):  # i = 0 warms up (not timed)
        random.seed(1000 + i)
        started = time.perf_counter()
        tasks = source.sample_batch(meta_batch)
        sampling.append(time.perf_counter() - started)
        gradients = {}
        for name in (("off", "on") if i % 2 == 0 else ("on", "off")):
            started = time.perf_counter()
            algorithms[name].train_step(tasks, i)
            if i:
                times[name].append(time.perf_counter() - started)
            gradients[name] = [p.grad.detach().clone() for p in algorithms[name].parameters() if p.grad is not None]
        if i == 0:
            difference = relative_difference(gradients["off"], gradients["on"])
            auto = use_vectorized("auto", algorithms["on"].model, tasks)
            difference64 = float64_difference(cfg, source, tasks)
    off, on = statistics.median(times["off"]), statistics.median(times["on"])
    row = dict(case=f"{algorithm_name} 5w1s", meta_batch=meta_batch, images=5 * (1 + query), off=off, on=on,
               ratio=off / on, auto="fast path" if auto else "per-task loop", diff=difference,
               sample=statistics.median(sampling[1:] or sampling))
    print(f"| {row['case']} | {meta_batch} | {row['images']} | {torch.get_num_threads()} | {off:.3f} | {on:.3f} | "
          f"**{row['ratio']:.2f}** | {row['auto']} | {difference:.1e} / {difference64:.1e} | "
          f"{1000 * row['sample']:.1f} |", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["maml", "fomaml"], choices=["maml", "fomaml"])
    parser.add_argument("--meta-batch", nargs="+", type=int, default=[4, 32])
    parser.add_argument("--query", nargs="+", type=int, default=[15],
                        help="query images per class in training (Finn: 15); several values sweep the task size")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per path and case (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU, {os.cpu_count()} cores | torch {torch.__version__} | threads {torch.get_num_threads()} | load average "
          f"{load:.2f} | {args.iterations} timed iterations per path (median)", flush=True)
    print("| case | meta-batch | images per task | threads | per-task loop s/iter | fast path s/iter | ratio | "
          "vectorize=auto picks | grad diff f32 / f64 | sampling ms |", flush=True)
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = make_random_miniimagenet(Path(folder), per_class=max(args.query) + 1)
        for algorithm in args.algorithms:
            for meta_batch in args.meta_batch:
                for query in args.query:
                    run_case(algorithm, root, meta_batch, query, args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
