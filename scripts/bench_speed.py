"""Reference loop and learn2learn's own pipeline (the peer) vs the runner's fast path, in one process, alternating.

Reference (learn2learn's example loop): every task sampled through the TaskDataset (`source.sample()`), one
`l2l.algorithms.MAML.clone()` + adapt per task, `backward` per task, Adam step.
Fast path (what `maml-run` does): the meta-batch sampled in one gather (`cached_episodes(source).sample_batch`)
and the MAML/FOMAML `train_step` with hardware.vectorize (default auto).

Both start from the same weights; each iteration seeds `random` identically before sampling, so both paths get
the same tasks. Printed per case: s/iter (median, sampling included), ratio, peak memory, the relative difference
of the first meta-gradient (float32) and of a float64 re-run of that meta-batch; last lines `SPEEDUP <case> <ratio>`.

Peer (Omniglot cases; scripts/l2l_peer.py): what a learn2learn user runs instead of `maml-run`, end to end:
`l2l.vision.benchmarks.get_tasksets('omniglot', ...)` over torchvision's Omniglot (PNG decoding and resizing per
sample, every task), `l2l.vision.models.OmniglotCNN`, the MAML example's per-task clone/adapt/backward and Adam; same
meta-batch, inner steps and learning rates. Timed per iteration with sampling included (building the datasets is
not timed), alternating with the other two paths; printed `PEER_SPEEDUP <case> <peer s/iter / fast s/iter>`.
It needs the original zips under --root (a symlinked copy with the extracted PNGs goes to --peer-root); without
them, or with --no-peer, the column is left out.

    .venv/bin/python scripts/bench_speed.py --iterations 5      # ~5 min on a 2-core CPU
    .venv/bin/python scripts/bench_speed.py --cases maml_5w1s --profile   # where the time goes (torch.profiler)
    .venv/bin/python scripts/bench_speed.py --iterations 3 --cases maml_5w1s fomaml_5w1s --device cuda
    .venv/bin/python scripts/bench_speed.py --iterations 20 --cases maml_5w1s fomaml_5w1s --threads 1  # peer ratios
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import learn2learn as l2l
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from maml_runner.algorithms import build_algorithm
from maml_runner.algorithms.vectorized import use_vectorized
from maml_runner.data.base import TaskBatch
from maml_runner.data.fast_episodes import cached_episodes
from maml_runner.data.omniglot import CharacterImages, OmniglotTasks, build_omniglot
from maml_runner.data.sinusoid import SinusoidTasks
from maml_runner.hardware import compile_fast_path, set_tf32
from maml_runner.models import MLP, Conv4

REPO = Path(__file__).resolve().parents[1]

# case -> (dataset, ways, shots, query_shots, inner_lr); Finn et al. 2017 settings, 1 inner step, meta-batch 32.
# The 5-shot cases (50 and 200 images per task, which hardware.vectorize=auto runs as per-task loops on CPU) are
# opt-in.
DATASETS = {"5w1s": ("omniglot", 5, 1, 1, 0.4), "20w1s": ("omniglot", 20, 1, 1, 0.1),
            "5w5s": ("omniglot", 5, 5, 5, 0.4), "20w5s": ("omniglot", 20, 5, 5, 0.1),
            "sinusoid": ("sinusoid", 1, 10, 10, 0.01)}
ALL_CASES = [f"{a}_{d}" for d in DATASETS for a in ("maml", "fomaml")]
DEFAULT_CASES = [case for case in ALL_CASES if not case.endswith("5s")]


# ---- memory ----------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator stats, or on CPU the process RSS sampled every ms
    (glibc told to return large blocks at once, so RSS follows what is allocated)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _trim_heap()  # memory freed earlier but kept by malloc would otherwise hide this block's growth
            self.base = self.peak = _rss()
            self.running = True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak_mb = (max(self.peak, _rss()) - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _return_freed_memory() -> None:
    try:  # M_MMAP_THRESHOLD = -3: blocks above 64 KiB are mmapped, so freeing them lowers RSS at once
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)
    except OSError:
        pass


# ---- data ------------------------------------------------------------------------------------------------------
def omniglot_sources(ways, shots, query, root: Path, notes: list):
    cfg = OmegaConf.create(dict(root=str(root), ways=ways, shots=shots, query_shots=query, image_size=28,
                                split=[1100, 100, 423], split_seed=1, rotations=[0, 90, 180, 270], cache_dir=None,
                                download=False))
    if (root / "images_background.zip").exists() or (root / "images_background").is_dir():
        return build_omniglot(cfg)["train"]
    if not notes:
        notes.append(f"NOTE: no Omniglot under {root}: using a SYNTHETIC image tensor (1100 random characters x 20);"
                     f" timings are representative, accuracies meaningless")
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(1100 * 20, 1, 28, 28, generator=generator) > 0.8).to(torch.uint8) * 255
    labels = torch.arange(1100).repeat_interleave(20)
    return OmniglotTasks(CharacterImages(images, labels), ways, shots, query)


# ---- the two paths ---------------------------------------------------------------------------------------------
def reference_iteration(source, maml, optimizer, loss_fn, batch, steps, device, dtype):
    """learn2learn's loop: sample and adapt task by task."""
    optimizer.zero_grad(set_to_none=True)
    for _ in range(batch):
        support_x, support_y, query_x, query_y = (t.to(device) for t in source.sample())
        support_x, query_x = support_x.to(dtype), query_x.to(dtype)
        if loss_fn is F.mse_loss:
            support_y, query_y = support_y.to(dtype), query_y.to(dtype)
        learner = maml.clone()
        for _ in range(steps):
            learner.adapt(loss_fn(learner(support_x), support_y))
        (loss_fn(learner(query_x), query_y) / batch).backward()
    gradients = [p.grad.detach().clone() for p in maml.module.parameters()]
    optimizer.step()
    return gradients


def fast_iteration(fast_source, algorithm, batch, device, dtype):
    tasks = fast_source.sample_batch(batch).to(device)
    if dtype != torch.float32:
        tasks = _cast(tasks, dtype)
    algorithm.train_step(tasks, iteration=0)
    return [p.grad.detach().clone() for p in algorithm.model.parameters()], tasks


def _cast(tasks: TaskBatch, dtype) -> TaskBatch:
    regression = tasks.support_y.is_floating_point()
    return TaskBatch(tasks.support_x.to(dtype), tasks.support_y.to(dtype) if regression else tasks.support_y,
                     tasks.query_x.to(dtype), tasks.query_y.to(dtype) if regression else tasks.query_y)


def relative_difference(a, b) -> float:
    num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(x.double().pow(2).sum()) for x in a)
    return (num / den) ** 0.5


def build_peer(case, args, device, peer_tasksets_cache: dict):
    """learn2learn's pipeline for an Omniglot case (None for sinusoid, with --no-peer, or without the zips).

    The tasksets of one ways/shots are built once and shared by the MAML and FOMAML cases (building them decodes
    every image once for learn2learn's bookkeeping the first time a --peer-root is used)."""
    algorithm_name, dataset = case.split("_", 1)
    kind, ways, shots, query, inner_lr = DATASETS[dataset]
    if kind != "omniglot" or args.no_peer:
        return None
    import l2l_peer  # scripts/l2l_peer.py (this script's folder is on sys.path)
    if not l2l_peer.peer_available(args.root):
        print(f"NOTE: no Omniglot zips under {args.root}: no peer column", flush=True)
        return None
    key = (ways, shots)
    if key not in peer_tasksets_cache:
        started = time.perf_counter()
        random.seed(0)  # learn2learn's class split shuffles with the global random
        peer_root = l2l_peer.prepare_peer_root(args.root, args.peer_root)
        peer_tasksets_cache[key] = l2l_peer.peer_tasksets(peer_root, ways, shots)
        print(f"peer tasksets {ways}w{shots}s ready in {time.perf_counter() - started:.1f} s (not timed)", flush=True)
    torch.manual_seed(0)
    return l2l_peer.PeerMAML(peer_tasksets_cache[key], ways, shots, inner_lr, 1, 0.001,
                             algorithm_name == "fomaml", device)


def build_case(case, root, notes, device, dtype, vectorize):
    algorithm_name, dataset = case.split("_", 1)
    kind, ways, shots, query, inner_lr = DATASETS[dataset]
    torch.manual_seed(0)  # same initial weights in every run of the script (the f32 differences depend on them)
    if kind == "omniglot":
        source = omniglot_sources(ways, shots, query, root, notes)
        model = Conv4(ways)
    else:
        source, model = SinusoidTasks(shots, query), MLP()
    cfg = OmegaConf.create(dict(name=algorithm_name, inner_lr=inner_lr, inner_steps=1, outer_lr=0.001,
                                first_order=algorithm_name == "fomaml"))
    task_type = source.task_type
    model = model.to(device=device, dtype=dtype)
    reference_model = copy.deepcopy(model)
    algorithm = build_algorithm(model, cfg, task_type, 100, vectorize=vectorize).to(device)
    maml = l2l.algorithms.MAML(reference_model, lr=inner_lr, first_order=algorithm_name == "fomaml")
    optimizer = torch.optim.Adam(maml.parameters(), lr=0.001)
    loss_fn = F.mse_loss if task_type == "regression" else F.cross_entropy
    return source, cached_episodes(source), algorithm, maml, optimizer, loss_fn


def run_case(case, args, root, notes, device):
    """Time both paths (no memory watcher running: its polling thread and the malloc setting it needs slow both
    paths down); peak memory is measured afterwards by `measure_memory`."""
    batch, steps = args.meta_batch, 1
    state = build_case(case, root, notes, device, torch.float32, args.vectorize)
    peer = build_peer(case, args, device, args.peer_tasksets_cache)
    state = (*state, peer)
    algorithm = state[2]
    if args.compile:
        compile_fast_path(algorithm)
    names = path_names(state)
    times = {name: [] for name in names}
    first_difference, path, tasks = None, None, None
    for iteration in range(args.iterations + 1):  # iteration 0 warms up (not timed)
        seed = 1000 + iteration
        shift = iteration % len(names)  # each path goes first, middle and last equally often
        order = names[shift:] + names[:shift]
        gradients = {}
        for name in order:
            random.seed(seed)  # both paths draw the same tasks
            started = time.perf_counter()
            gradients[name], path_tasks = run_path(name, state, batch, steps, device)
            tasks = path_tasks if name == "fast" else tasks
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if iteration:
                times[name].append(time.perf_counter() - started)
        if iteration == 0:  # same starting weights: the meta-gradients must agree
            first_difference = relative_difference(gradients["reference"], gradients["fast"])
            path = "vectorized" if algorithm.vectorized_for(tasks) else "per-task loop"
    float64_difference = float64_check(case, root, notes, device, args)
    reference, fast = statistics.median(times["reference"]), statistics.median(times["fast"])
    ratio = reference / fast
    peer_ratio, peer_text = None, ""
    if peer is not None:
        peer_time = statistics.median(times["peer"])
        peer_ratio = peer_time / fast
        peer_text = f"  peer {peer_time:7.3f} s/iter  peer ratio {peer_ratio:5.2f}"
    print(f"{case:16s} reference {reference:7.3f} s/iter  fast {fast:7.3f} s/iter  ratio {ratio:5.2f}{peer_text}  "
          f"fast path: {path}  grad rel diff f32 {first_difference:.1e} f64 {float64_difference:.1e}", flush=True)
    return (ratio, peer_ratio), state


def path_names(state) -> tuple[str, ...]:
    """The paths a case times: reference and fast, and the peer where one was built (the state's last item)."""
    return ("reference", "fast") + (("peer",) if state[-1] is not None else ())


def run_path(name, state, batch, steps, device):
    source, fast_source, algorithm, maml, optimizer, loss_fn, peer = state
    if name == "peer":  # its own model: no gradients to compare
        peer.train_iteration(batch)
        return None, None
    if name == "reference":
        return reference_iteration(source, maml, optimizer, loss_fn, batch, steps, device, torch.float32), None
    return fast_iteration(fast_source, algorithm, batch, device, torch.float32)


def profile_case(case, state, args, device, rows=8) -> None:
    """torch.profiler over 3 iterations per path: the top ops by self time and the convolutions' share of it,
    i.e. how much of each path is FLOPs that vectorizing cannot remove."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name in path_names(state):
        with profile(activities=activities) as prof:
            for iteration in range(3):
                random.seed(7000 + iteration)
                run_path(name, state, args.meta_batch, 1, device)
        events = prof.key_averages()
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events) / 3e3
        conv = sum(getattr(e, key) for e in events if "conv" in e.key) / 3e3
        print(f"PROFILE {case} {name}: {total:.1f} ms/iter of op self time, convolution ops {conv:.1f} ms "
              f"({100 * conv / max(total, 1e-9):.0f} %)", flush=True)
        print(events.table(sort_by=key, row_limit=rows), flush=True)


def measure_memory(case, state, args, device) -> None:
    """One more iteration per path with the peak-memory watcher (after all timings: see run_case)."""
    peaks = {}
    for name in path_names(state):
        random.seed(5000)
        with PeakMemory(device) as peak:
            run_path(name, state, args.meta_batch, 1, device)
        peaks[name] = peak.peak_mb
    print(f"{case:16s} peak MB above the process's level: "
          + "  ".join(f"{name} {peak:7.1f}" for name, peak in peaks.items()), flush=True)


def float64_check(case, root, notes, device, args) -> float:
    """One meta-batch in float64 through both paths from the same weights (the <= 1e-4 criterion)."""
    source, fast_source, algorithm, maml, optimizer, loss_fn = build_case(
        case, root, notes, device, torch.float64, args.vectorize)
    random.seed(99)
    reference = reference_iteration(source, maml, optimizer, loss_fn, args.check_tasks, 1, device, torch.float64)
    random.seed(99)
    fast, _ = fast_iteration(fast_source, algorithm, args.check_tasks, device, torch.float64)
    return relative_difference(reference, fast)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=ALL_CASES)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per path and case")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--check-tasks", type=int, default=8, help="tasks in the float64 gradient check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--vectorize", default="auto", choices=("auto", "on", "off"))
    parser.add_argument("--compile", action="store_true",
                        help="the runner's step with hardware.compile=true (first-order: the compiled grouped "
                             "forward; second-order: batch norm's compiled double backward); warm-up compiles")
    parser.add_argument("--tf32", action="store_true",
                        help="allow TensorFloat-32 on CUDA (hardware.tf32=true; default: full float32, the runner's)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables per case")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--no-peer", action="store_true", help="leave out learn2learn's pipeline (the peer)")
    parser.add_argument("--peer-root", default=None,
                        help="where the peer's torchvision layout goes (symlinks + extracted PNGs; default: a fixed "
                             "folder under the temp dir, reused)")
    args = parser.parse_args(argv)
    args.peer_tasksets_cache = {}
    if args.peer_root is None and not args.no_peer:
        import l2l_peer
        args.peer_root = l2l_peer.DEFAULT_PEER_ROOT
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    set_tf32(args.tf32)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device {name} | torch {torch.__version__} | threads {torch.get_num_threads()} | load average {load:.2f}"
          f" | meta-batch {args.meta_batch}, 1 inner step, {args.iterations} timed iterations per path (median)"
          f" | hardware.vectorize={args.vectorize}{' hardware.compile=true' if args.compile else ''}"
          f"{' hardware.tf32=true' if args.tf32 else ''}"
          f" | peer: {'off' if args.no_peer else 'learn2learn pipeline'}",
          flush=True)
    notes: list = []
    ratios, states = {}, {}
    for case in args.cases:
        ratios[case], states[case] = run_case(case, args, Path(args.root), notes, device)
        if notes and notes[0]:
            print(notes[0], flush=True)
            notes[0] = ""
    if args.profile:
        for case in args.cases:
            profile_case(case, states[case], args, device)
    _return_freed_memory()  # from here on RSS follows what is allocated (slower; nothing is timed any more)
    for case in args.cases:
        measure_memory(case, states[case], args, device)
    for case, (ratio, _) in ratios.items():
        print(f"SPEEDUP {case} {ratio:.2f}")
    for case, (_, peer_ratio) in ratios.items():
        if peer_ratio is not None:
            print(f"PEER_SPEEDUP {case} {peer_ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
