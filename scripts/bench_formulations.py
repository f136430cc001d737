"""Candidate formulations of the fast path's step, measured side by side in one process (issue 17's 20-way work).

Ten experiments, each alternating its variants so that load changes hit both alike; every ratio is baseline / variant
(> 1: the variant is faster):

* `conv`: one task-grouped convolution layer of the 20-way meta-batch (T=16 tasks, N=20 images, 64 filters), forward,
  an inner step (create_graph) and the second-order backward, as the grouped conv the runner uses
  (models.grouped_conv2d: F.conv2d with groups=T) vs im2col + batched matmul (F.unfold, torch.bmm).
* `precision`: the runner's whole MAML/FOMAML train_step (real Omniglot, dataset preset hyperparameters) in float32
  vs under `torch.autocast(bfloat16)`, with the relative difference and cosine of the two meta-gradients of the
  first meta-batch (same weights, same tasks).
* `tf32`: the same step in full float32 (hardware.tf32=false, the default) vs with TensorFloat-32 convolutions and
  matrix products allowed (hardware.tf32=true; CUDA on Ampere and later only: on CPU both variants are the same).
* `cudagraph` (CUDA only): the MAML/FOMAML step eager vs its meta-gradient part (inner loop, query losses,
  backward) captured once in a CUDA graph and replayed on each meta-batch copied into the graph's input buffers;
  the accuracy, gradient norm and Adam step stay eager in both. Prepared on a machine without a GPU: never run yet.
* `compile`: the same step eager vs with hardware.compile=true: first-order algorithms `torch.compile` the grouped
  forward, second-order ones batch norm's double backward (norm_derivatives.compile_kernels). The warm-up, which
  includes the compilation, is printed apart.
* `batchnorm`: the same step with torch's native `batch_norm` (and its double backward) vs batch norm composed of
  mean / var / rsqrt, which autograd differentiates op by op (vectorized._CompositeBatchNorm, the vmap fallback's).
* `convgrad`: the same step with torch's own derivative rules for the grouped convolutions vs the runner's
  (maml_runner/grouped_conv.py: transposed convolutions and filter gradients, to any order; the runner uses them in
  second-order steps on CPU; with --device cuda the variant uses them on the GPU).
* `bngrad`: the same step with torch's own double backward for batch norm vs the runner's
  (maml_runner/norm_derivatives.py: three reductions and a few fused multiply-adds; the runner uses it in
  second-order steps on CPU; with --device cuda the variant uses it on the GPU).
* `firststep`: the same step with the support pass of inner step 0 as task-grouped convolutions vs as ordinary
  convolutions over all tasks' images at the shared filters (grouped_conv._SharedConv, on CPU; first-order steps
  at the detached copies of the filters).
* `channelslast`: the same step with the images in torch's default layout vs channels-last (NHWC, which oneDNN's
  strided backward-data kernels use; the other convolutions and batch norm follow the input's layout).

    .venv/bin/python scripts/bench_formulations.py conv
    .venv/bin/python scripts/bench_formulations.py precision --cases 20w1s:maml 20w1s:fomaml 5w1s:maml
    .venv/bin/python scripts/bench_formulations.py tf32 --device cuda --cases 5w1s:maml 20w1s:maml 5w1s:fomaml
    .venv/bin/python scripts/bench_formulations.py cudagraph --device cuda --cases 5w1s:maml 20w1s:maml 5w1s:fomaml
    .venv/bin/python scripts/bench_formulations.py compile --cases 20w1s:fomaml 5w1s:fomaml 5w1s:reptile
    .venv/bin/python scripts/bench_formulations.py compile --threads 2 --repeats 15 --cases 5w1s:maml 20w1s:maml
    .venv/bin/python scripts/bench_formulations.py batchnorm --cases 5w1s:maml 20w1s:maml
    .venv/bin/python scripts/bench_formulations.py convgrad --threads 2 --repeats 15
    .venv/bin/python scripts/bench_formulations.py bngrad --threads 2 --repeats 15
    .venv/bin/python scripts/bench_formulations.py firststep --threads 2 --repeats 15
    .venv/bin/python scripts/bench_formulations.py channelslast --threads 2 --repeats 15 --cases 5w1s:maml 20w1s:maml
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TASKS, IMAGES, FILTERS = 16, 20, 64
# The setting:algorithm cases each experiment on the whole step runs unless --cases names others.
DEFAULT_CASES = {
    "precision": ["20w1s:maml", "20w1s:fomaml", "5w1s:maml"],
    "tf32": ["5w1s:maml", "20w1s:maml", "5w1s:fomaml"],
    "cudagraph": ["5w1s:maml", "20w1s:maml", "5w1s:fomaml"],
    "compile": ["20w1s:fomaml", "5w1s:fomaml", "5w1s:reptile"],
    "batchnorm": ["5w1s:maml", "20w1s:maml"],
    "convgrad": ["5w1s:maml", "5w1s:fomaml", "20w1s:maml", "20w1s:fomaml", "5w1s:mamlpp", "5w1s:metasgd",
                 "5w1s:anil", "5w1s:reptile"],
    "bngrad": ["5w1s:maml", "20w1s:maml", "5w1s:mamlpp", "5w1s:metasgd"],
    "firststep": ["5w1s:maml", "20w1s:maml", "5w1s:mamlpp", "5w1s:metasgd", "5w1s:fomaml", "5w1s:reptile"],
    "channelslast": ["5w1s:maml", "20w1s:maml"],
}


def grouped_conv(x, w, b):
    """The runner's layout: x [N, T*Cin, H, W], per-task filters w [T, Cout, Cin, 3, 3]."""
    return F.conv2d(x, w.reshape(-1, *w.shape[2:]), b.reshape(-1), 2, 1, groups=TASKS)


def unfold_bmm_conv(x, w, b):
    """The same convolution as im2col patches times each task's filter matrix (one batched matmul)."""
    n, channels, height, width = x.shape
    cin = channels // TASKS
    cols = F.unfold(x, 3, padding=1, stride=2)  # [N, T*Cin*9, L]
    positions = cols.shape[-1]
    cols = cols.view(n, TASKS, cin * 9, positions).permute(1, 0, 3, 2).reshape(TASKS, n * positions, cin * 9)
    out = torch.bmm(cols, w.reshape(TASKS, w.shape[1], -1).transpose(1, 2)) + b.unsqueeze(1)
    h_out, w_out = (height - 1) // 2 + 1, (width - 1) // 2 + 1
    return out.view(TASKS, n, h_out, w_out, -1).permute(1, 0, 4, 2, 3).reshape(n, -1, h_out, w_out)


def second_order_layer_step(conv, cin: int, size: int) -> None:
    x = torch.randn(IMAGES, TASKS * cin, size, size)
    w = torch.randn(TASKS, FILTERS, cin, 3, 3, requires_grad=True)
    b = torch.zeros(TASKS, FILTERS, requires_grad=True)
    gw, gb = torch.autograd.grad((conv(x, w, b).relu() ** 2).mean(), (w, b), create_graph=True)
    (conv(x, w - 0.1 * gw, b - 0.1 * gb).relu() ** 2).mean().backward()


def median_pair(run_a, run_b, repeats: int) -> tuple[float, float]:
    times = ([], [])
    for _ in range(repeats):
        for which, fn in enumerate((run_a, run_b)):
            started = time.perf_counter()
            fn()
            times[which].append(time.perf_counter() - started)
    return statistics.median(times[0]), statistics.median(times[1])


def bench_conv(repeats: int) -> None:
    for cin, size in ((1, 28), (FILTERS, 14), (FILTERS, 7), (FILTERS, 4)):
        x = torch.randn(IMAGES, TASKS * cin, size, size)
        w, b = torch.randn(TASKS, FILTERS, cin, 3, 3), torch.randn(TASKS, FILTERS)
        assert torch.allclose(grouped_conv(x, w, b), unfold_bmm_conv(x, w, b), atol=1e-3, rtol=1e-4)
        grouped, unfolded = median_pair(lambda: second_order_layer_step(grouped_conv, cin, size),
                                        lambda: second_order_layer_step(unfold_bmm_conv, cin, size), repeats)
        print(f"conv layer {cin}->{FILTERS} at {size}x{size}: grouped {1e3 * grouped:.1f} ms | unfold+bmm "
              f"{1e3 * unfolded:.1f} ms | RATIO {grouped / unfolded:.2f}")


def build_case(case: str, root: str, device: str, repeats: int):
    """The runner's meta-learner for `setting:algorithm` (dataset preset hyperparameters, real Omniglot at `root`),
    its starting state and `repeats` meta-batches on its device."""
    from hydra import compose, initialize_config_dir

    from maml_runner.train import build
    setting, algorithm = case.split(":")
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", [f"algorithm={algorithm}", f"dataset=omniglot_{setting}", f"dataset.root={root}",
                                 f"hardware.device={device}"])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build(cfg, Path(run_dir))
    source = trainer.sources["train"]
    tasks = [source.sample_batch(int(cfg.train.meta_batch_size)).to(trainer.device) for _ in range(repeats)]
    return trainer.algorithm, copy.deepcopy(trainer.algorithm.state_dict()), tasks


def bench_step(experiment: str, cases: list[str], root: str, repeats: int, device: str) -> None:
    """The whole train_step, baseline vs variant: `precision` (float32 vs bf16 autocast), `tf32` (full float32 vs
    TensorFloat-32), `compile` (eager vs hardware.compile: the grouped forward, or for second-order algorithms batch
    norm's double backward, under torch.compile), `batchnorm` (native vs composite batch norm), `convgrad` (torch's
    derivative rules for the grouped convolutions vs grouped_conv's), `bngrad` (torch's batch-norm double backward
    vs norm_derivatives'), `firststep` (the step-0 support pass task-grouped vs at the shared filters) or
    `channelslast` (the task-grouped images in the default layout vs channels-last). Same weights, same tasks."""
    from maml_runner import grouped_conv, models, norm_derivatives
    from maml_runner.algorithms.vectorized import _CompositeBatchNorm
    from maml_runner.hardware import compile_fast_path, set_tf32
    default_layout = models.images_to_grouped  # each step sets the layout of its variant from this one
    default_devices = grouped_conv.EXPLICIT_BACKWARD_DEVICES
    default_norm_devices = norm_derivatives.EXPLICIT_BACKWARD_DEVICES
    for case in cases:
        meta, start, tasks = build_case(case, root, device, repeats)
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        eager = meta.model.grouped_forward
        if experiment == "compile":
            compile_fast_path(meta)
            compiled, meta.model.grouped_forward = meta.model.grouped_forward, eager
            compiled_kernel = norm_derivatives._compiled_kernel  # second order: the double-backward kernel
        gradients = {}

        def step(variant: bool, index: list) -> None:
            meta.load_state_dict(start)
            if experiment == "compile":
                meta.model.grouped_forward = compiled if variant else eager
                norm_derivatives._compiled_kernel = compiled_kernel if variant else None
            composite = _CompositeBatchNorm() if variant and experiment == "batchnorm" else contextlib.nullcontext()
            # convgrad: torch's own rules vs grouped_conv's on this device (also on CUDA, where the runner does not
            # use them yet); every other experiment runs with the runner's default.
            grouped_conv.EXPLICIT_BACKWARD_DEVICES = ((device_type,) if variant else ()) if experiment == "convgrad" \
                else default_devices
            norm_derivatives.EXPLICIT_BACKWARD_DEVICES = ((device_type,) if variant else ()) \
                if experiment == "bngrad" else default_norm_devices
            grouped_conv.SHARE_FIRST_STEP_FILTERS = variant or experiment != "firststep"
            if experiment == "tf32":  # every other experiment keeps the config's hardware.tf32 (build set it)
                set_tf32(variant)
            models.images_to_grouped = (lambda x: default_layout(x).contiguous(memory_format=torch.channels_last)) \
                if variant and experiment == "channelslast" else default_layout
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=variant and experiment == "precision"), \
                    composite:
                meta.train_step(tasks[index[0] % repeats], 10)
            if variant not in gradients:
                gradients[variant] = torch.cat([p.grad.flatten() for p in meta.parameters() if p.grad is not None])
            if device_type == "cuda":
                torch.cuda.synchronize()
            index[0] += 1

        counters = ([0], [0])
        warm = time.perf_counter()
        step(False, counters[0]), step(True, counters[1])  # warm-up (compilation) and the first batch's gradients
        warm = time.perf_counter() - warm
        base, variant = median_pair(lambda: step(False, counters[0]), lambda: step(True, counters[1]), repeats)
        g_base, g_variant = gradients[False], gradients[True]
        names = {"precision": ("float32", "bf16 autocast"), "tf32": ("float32", "TF32"),
                 "compile": ("eager", "torch.compile"),
                 "batchnorm": ("native batch_norm", "composite batch norm"),
                 "convgrad": ("torch's conv derivatives", "grouped_conv's"),
                 "bngrad": ("torch's batch-norm double backward", "norm_derivatives'"),
                 "firststep": ("grouped step-0 support pass", "shared-filter step-0 support pass"),
                 "channelslast": ("default layout", "channels-last")}[experiment]
        print(f"{case}: {names[0]} {base:.3f} s/iter | {names[1]} {variant:.3f} s/iter | RATIO {base / variant:.2f} | "
              f"meta-gradient relative difference {float((g_base - g_variant).norm() / g_base.norm()):.3f}, cosine "
              f"{float(F.cosine_similarity(g_base, g_variant, 0)):.3f} | warm-up {warm:.0f} s", flush=True)


def bench_cudagraph(cases: list[str], root: str, repeats: int, device: str) -> None:
    """`cudagraph`: the vectorized MAML/FOMAML train_step eager vs with its meta-gradient part replayed from a CUDA
    graph (the launch overhead a graph removes is what bounds a step on a GPU: docs/benchmarks.md, "GPU check").
    The graph is captured after three warm-up runs on a side stream, as torch's whole-network capture example
    does; the parameters' .grad tensors it writes are the ones the eager Adam step reads."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        raise SystemExit(f"bench_formulations.py cudagraph: needs --device cuda and a CUDA device "
                         f"(got --device {device})")
    from maml_runner.algorithms.vectorized import adapt_and_query
    from maml_runner.data.base import TaskBatch
    task_fields = lambda b: (b.support_x, b.support_y, b.query_x, b.query_y)  # noqa: E731
    for case in cases:
        meta, start, tasks = build_case(case, root, device, repeats)
        if not (hasattr(meta, "maml") and meta.vectorized_for(tasks[0])):
            print(f"{case}: skipped (cudagraph covers the vectorized MAML/FOMAML step only)", flush=True)
            continue
        first_order = meta.use_first_order(10)
        static = TaskBatch(*(t.clone() for t in task_fields(tasks[0])))  # the graph's input buffers

        def meta_gradients():
            losses, predictions = adapt_and_query(meta.model, static, float(meta.maml.lr), int(meta.cfg.inner_steps),
                                                  first_order, meta.loss_fn, adapted=meta.adapted)
            (losses.sum() / len(static)).backward()
            return losses.detach(), predictions.detach()

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    meta.optimizer.zero_grad(set_to_none=True)
                    meta_gradients()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            meta.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                graph_losses, graph_predictions = meta_gradients()
            graph_gradients = [p.grad for p in meta.parameters()]  # the eager step replaces .grad: re-linked below
        except Exception as exc:  # what a first GPU run must report: the op that cannot be captured
            print(f"{case}: CAPTURE FAILED: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
            continue
        gradients = {}

        def eager(index: list) -> None:
            meta.load_state_dict(start)
            meta.train_step(tasks[index[0] % repeats], 10)
            gradients.setdefault(False, torch.cat([p.grad.flatten() for p in meta.parameters() if p.grad is not None]))
            torch.cuda.synchronize()
            index[0] += 1

        def replayed(index: list) -> None:
            meta.load_state_dict(start)  # in place: the graph's parameter addresses stay
            batch = tasks[index[0] % repeats]
            for buffer, values in zip(task_fields(static), task_fields(batch)):
                buffer.copy_(values)
            graph.replay()  # overwrites the .grad tensors captured with it: no zero_grad between replays
            for parameter, gradient in zip(meta.parameters(), graph_gradients):
                parameter.grad = gradient
            gradients.setdefault(True, torch.cat([p.grad.flatten() for p in meta.parameters() if p.grad is not None]))
            accuracy = meta.metric(graph_predictions.flatten(0, 1), static.query_y.flatten(0, 1))
            meta.finish_step(graph_losses.mean().item(), accuracy, 10)
            torch.cuda.synchronize()
            index[0] += 1

        counters = ([0], [0])
        eager(counters[0]), replayed(counters[1])  # the first batch's meta-gradients, same weights and tasks
        base, variant = median_pair(lambda: eager(counters[0]), lambda: replayed(counters[1]), repeats)
        g_base, g_variant = gradients[False], gradients[True]
        print(f"{case}: eager {base:.4f} s/iter | CUDA graph replay {variant:.4f} s/iter | RATIO {base / variant:.2f}"
              f" | meta-gradient relative difference {float((g_base - g_variant).norm() / g_base.norm()):.1e}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=("conv", "precision", "tf32", "cudagraph", "compile", "batchnorm",
                                               "convgrad", "bngrad", "firststep", "channelslast"))
    parser.add_argument("--cases", nargs="+", default=None, help="setting:algorithm (defaults: " + "; ".join(
        f"{name}: {' '.join(cases)}" for name, cases in DEFAULT_CASES.items()) + ")")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "omniglot"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.experiment == "conv":
        bench_conv(args.repeats)
    elif args.experiment == "cudagraph":
        bench_cudagraph(args.cases or DEFAULT_CASES["cudagraph"], args.root, args.repeats, args.device)
    else:
        cases = args.cases or DEFAULT_CASES[args.experiment]
        bench_step(args.experiment, cases, args.root, args.repeats, args.device)


if __name__ == "__main__":
    main()
