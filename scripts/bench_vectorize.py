"""hardware.vectorize=off vs on for one algorithm's train step, in one process, alternating, same meta-batches.

Every meta-learner's per-task loop (`off`, the reference) against its fast path (`on`: the meta-batch's inner loops
at once, algorithms/vectorized.py): MAML, FOMAML, MAML++, ANIL, Meta-SGD, Reptile (SGD inner optimizer; with
`--reptile-adam` a fresh inner Adam). Both start from the same weights and draw the same tasks (fast sampling in
both: this times the inner loop only).
Printed per case: s/iter (median), ratio, and the relative difference of the first meta-gradient (all
meta-parameters, learned rates included; Reptile: its pseudo-gradient); last lines `SPEEDUP <case> <ratio>`.
Inner steps: `--steps`, else 1 (Finn et al.'s 5-way) and Reptile's own `inner_steps` (conf/algorithm/reptile.yaml).

    .venv/bin/python scripts/bench_vectorize.py                        # MAML++ 5w1s, 20w1s, sinusoid; ~20 s
    .venv/bin/python scripts/bench_vectorize.py --cases all_5w1s --threads 1   # every algorithm on 5w1s
    .venv/bin/python scripts/bench_vectorize.py --cases mamlpp_5w1s --steps 5 --meta-batch 8   # Antoniou's setting
    .venv/bin/python scripts/bench_vectorize.py --phase first          # derivative-order annealing's first phase
    .venv/bin/python scripts/bench_vectorize.py --cases reptile_5w1s --chunk-images 256 128 64   # chunk sizes
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

# bench_speed.py is this script's neighbour: Python puts the script's own directory first on sys.path.
from bench_speed import DATASETS, omniglot_sources, relative_difference
from maml_runner.algorithms import build_algorithm, vectorized
from maml_runner.data.fast_episodes import cached_episodes
from maml_runner.data.sinusoid import SinusoidTasks
from maml_runner.models import MLP, Conv4
from maml_runner.paths import CONF_DIR

REPO = Path(__file__).resolve().parents[1]

ALGORITHMS = ("mamlpp", "maml", "fomaml", "anil", "metasgd", "reptile")
ALL_CASES = [f"{a}_{d}" for a in ALGORITHMS for d in DATASETS]
GROUPS = {f"all_{d}": [f"{a}_{d}" for a in ALGORITHMS] for d in DATASETS}  # e.g. all_5w1s: every algorithm
TOTAL_ITERATIONS = 100  # the schedules' length; `--phase` picks an iteration in it


def build(case, args, root, notes, vectorize):
    algorithm_name, dataset = case.split("_", 1)
    kind, ways, shots, query, inner_lr = DATASETS[dataset]
    torch.manual_seed(0)  # same initial weights for both settings
    if kind == "omniglot":
        source, model = omniglot_sources(ways, shots, query, root, notes), Conv4(ways)
    else:
        source, model = SinusoidTasks(shots, query), MLP()
    algorithm_cfg = OmegaConf.load(CONF_DIR / "algorithm" / f"{algorithm_name}.yaml")
    if algorithm_name == "reptile":  # its own inner loop (5 SGD steps at 0.1 on support + query)
        algorithm_cfg.update(dict(inner_steps=args.steps or algorithm_cfg.inner_steps))
        if args.reptile_adam:  # Nichol et al.'s inner Adam (beta1 = 0, lr 1e-3), a fresh one per task
            algorithm_cfg.update(dict(inner_optimizer="adam", inner_lr=0.001, inner_betas=[0.0, 0.999]))
    else:
        algorithm_cfg.update(dict(inner_lr=inner_lr, inner_steps=args.steps or 1))
    algorithm = build_algorithm(model, algorithm_cfg, source.task_type, TOTAL_ITERATIONS, vectorize=vectorize)
    return cached_episodes(source), algorithm


def step(state, batch, iteration):
    source, algorithm = state
    tasks = source.sample_batch(batch)
    started = time.perf_counter()
    algorithm.train_step(tasks, iteration)
    elapsed = time.perf_counter() - started
    return elapsed, [p.grad.detach().clone() for p in algorithm.parameters() if p.grad is not None], tasks


def run_case(case, args, root, notes) -> float:
    """Per-task loop vs fast path; with --chunk-images, one fast-path setting per chunk size (same weights, same
    tasks, alternating in rotated order). Returns the ratio of the per-task loop to the fastest fast-path setting."""
    iteration = 0 if args.phase == "first" else TOTAL_ITERATIONS - 1
    default_rule = (vectorized.CPU_IMAGES_PER_CHUNK, vectorized.CPU_SECOND_ORDER_IMAGES_PER_CHUNK,
                    vectorized.CPU_FIRST_ORDER_CHUNK_FACTOR)
    chunk_sizes = args.chunk_images or [None]  # None: the runner's own rule (vectorized.images_per_chunk)
    settings = ["off"] + [f"on@{size}" if size else "on" for size in chunk_sizes]
    states = {name: build(case, args, root, notes, name.split("@")[0]) for name in settings}
    times = {name: [] for name in settings}
    difference = None
    try:
        for i in range(args.iterations + 1):  # i = 0 warms up (not timed)
            gradients = {}
            shift = i % len(settings)
            for name in settings[shift:] + settings[:shift]:  # each setting goes first equally often
                if "@" in name:  # exactly this many images per chunk, first or second order
                    size = int(name.split("@")[1])
                    vectorized.CPU_IMAGES_PER_CHUNK = vectorized.CPU_SECOND_ORDER_IMAGES_PER_CHUNK = size
                    vectorized.CPU_FIRST_ORDER_CHUNK_FACTOR = 1
                random.seed(2000 + i)  # every setting draws the same tasks
                elapsed, gradients[name], tasks = step(states[name], args.meta_batch, iteration)
                if i:
                    times[name].append(elapsed)
            if i == 0:
                difference = relative_difference(gradients["off"], gradients[settings[1]])
                fast_path = states[settings[1]][1].vectorized_for(tasks)
    finally:  # the module's chunk rule again, whatever happened
        (vectorized.CPU_IMAGES_PER_CHUNK, vectorized.CPU_SECOND_ORDER_IMAGES_PER_CHUNK,
         vectorized.CPU_FIRST_ORDER_CHUNK_FACTOR) = default_rule
    off = statistics.median(times["off"])
    on = {name: statistics.median(times[name]) for name in settings[1:]}
    best = min(on, key=on.get)
    if args.chunk_images:
        print(f"{case:16s} per-task loop {off:7.3f} s/iter | " + "  ".join(
            f"chunk {name.split('@')[1]} images {on[name]:7.3f} ({off / on[name]:4.2f}x)" for name in on), flush=True)
    print(f"{case:16s} per-task loop {off:7.3f} s/iter  vectorized {on[best]:7.3f} s/iter  "
          f"ratio {off / on[best]:5.2f}  "
          f"(vectorized: {fast_path}; first meta-gradient rel diff f32 {difference:.1e})", flush=True)
    return off / on[best]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["mamlpp_5w1s", "mamlpp_20w1s", "mamlpp_sinusoid"],
                        choices=ALL_CASES + list(GROUPS), help="cases, or all_<dataset> for every algorithm")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per setting and case")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None,
                        help="inner steps (default: 1, Finn et al.'s 5-way; Reptile: its config's inner_steps)")
    parser.add_argument("--phase", default="second", choices=("first", "second"),
                        help="MAML++ derivative-order annealing: time its first-order or its second-order phase")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--reptile-adam", action="store_true",
                        help="Reptile with a fresh inner Adam (beta1 0, lr 1e-3) instead of its default SGD")
    parser.add_argument("--chunk-images", type=int, nargs="+", default=None,
                        help="time the fast path at each of these CPU chunk sizes (images per chunk, first or second "
                             "order; default: the runner's rule, vectorized.images_per_chunk); SPEEDUP is then the "
                             "fastest one's")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    args = parser.parse_args(argv)
    args.cases = [case for name in args.cases for case in GROUPS.get(name, [name])]
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"CPU, {os.cpu_count()} cores | torch {torch.__version__} | threads {torch.get_num_threads()} | load "
          f"average {load:.2f} | meta-batch {args.meta_batch}, {args.steps or 'default'} inner step(s), "
          f"{args.phase}-order phase, {args.iterations} timed iterations per setting (median)", flush=True)
    notes: list = []
    ratios = {case: run_case(case, args, Path(args.root), notes) for case in args.cases}
    for note in notes:  # e.g. no Omniglot under --root: synthetic images
        print(note)
    for case, ratio in ratios.items():
        print(f"SPEEDUP {case} {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
