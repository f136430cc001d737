"""Time to accuracy: learn2learn's pipeline (the peer) and the runner trained side by side on the same budget.

Both sides train MAML (or FOMAML) on Omniglot N-way 1-shot with the same meta-batch, inner steps, inner and outer
learning rates (the runner's dataset config: 5w1s inner lr 0.4, 20w1s 0.1; Adam 1e-3; meta-batch 32; 1 step):
- runner: what `maml-run dataset=omniglot_<case> model=conv4` builds (`maml_runner.train.build`: the task sampler,
  Conv4 and the algorithm of that config), and its training step (meta-batch sampling + `train_step`);
- peer: scripts/l2l_peer.py (get_tasksets over torchvision's Omniglot, OmniglotCNN, the MAML example's loop).
They alternate in blocks of --validate-every iterations in one process (each block is timed; both see the same
machine load). After each block the side is validated on --val-tasks fixed tasks of its own held-out validation
characters (100 characters on both sides; 1 query per class; --val-steps adaptation steps on both sides, the
runner's eval.inner_steps by default). Validation time is not counted. A side stops when its validation accuracy
reaches the target, or at --budget-seconds of training time, or at --max-iterations.

Writes into --out: curve.csv (side, iteration, train_seconds, val_accuracy, seconds_per_iteration, load average),
summary.csv (per side: seconds and iteration at which the target was first reached, or empty) and curve.png.

    .venv/bin/python scripts/time_to_accuracy.py --case 5w1s --out outputs/time_to_accuracy/5w1s --threads 1
    .venv/bin/python scripts/time_to_accuracy.py --case 20w1s --out outputs/time_to_accuracy/20w1s   # target 80 %
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"5w1s": 0.95, "20w1s": 0.80}
CURVE_COLUMNS = ["side", "iteration", "train_seconds", "val_accuracy", "seconds_per_iteration", "load_average"]
SUMMARY_COLUMNS = ["side", "target", "reached", "seconds_to_target", "iteration_at_target", "iterations_run",
                   "train_seconds", "best_val_accuracy"]


# ---- pure logic (tested in tests/test_speed_scripts.py) ---------------------------------------------------------
def first_crossing(rows: list[dict], target: float) -> dict | None:
    """The first curve row (in training order) whose validation accuracy is at least the target, else None."""
    for row in sorted(rows, key=lambda r: r["iteration"]):
        if row["val_accuracy"] >= target:
            return row
    return None


def summarize(rows: list[dict], sides, target: float) -> list[dict]:
    """One summary row per side from the curve rows."""
    summary = []
    for side in sides:
        own = [row for row in rows if row["side"] == side]
        hit = first_crossing(own, target)
        last = max(own, key=lambda r: r["iteration"]) if own else None
        summary.append({
            "side": side, "target": target, "reached": hit is not None,
            "seconds_to_target": round(hit["train_seconds"], 1) if hit else "",
            "iteration_at_target": hit["iteration"] if hit else "",
            "iterations_run": last["iteration"] if last else 0,
            "train_seconds": round(last["train_seconds"], 1) if last else 0.0,
            "best_val_accuracy": max((row["val_accuracy"] for row in own), default=float("nan")),
        })
    return summary


def speedup_line(summary: list[dict]) -> str:
    """`TIME_TO_TARGET_RATIO peer/runner` when both reached the target; a lower bound when only the runner did."""
    by_side = {row["side"]: row for row in summary}
    runner, peer = by_side.get("runner"), by_side.get("peer")
    if not runner or not peer or not runner["reached"]:
        return "TIME_TO_TARGET_RATIO n/a (the runner did not reach the target)"
    if peer["reached"]:
        return f"TIME_TO_TARGET_RATIO {peer['seconds_to_target'] / runner['seconds_to_target']:.2f}"
    return (f"TIME_TO_TARGET_RATIO > {peer['train_seconds'] / runner['seconds_to_target']:.2f} "
            f"(the peer had not reached the target after {peer['train_seconds']:.0f} s)")


def should_stop(side_state: dict, target: float, budget_seconds: float, max_iterations: int) -> bool:
    """A side stops at the target accuracy, its training-time budget or its iteration limit."""
    return (side_state["accuracy"] >= target or side_state["seconds"] >= budget_seconds
            or side_state["iteration"] >= max_iterations)


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """Whole file written beside and renamed into place (a reader never sees half a file)."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in columns} for row in rows)
    os.replace(partial, path)


def plot(rows: list[dict], target: float, case: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for side, style in (("runner", "o-"), ("peer", "s--")):
        own = sorted((r for r in rows if r["side"] == side), key=lambda r: r["iteration"])
        if own:
            label = "maml-runner" if side == "runner" else "learn2learn pipeline"
            axis.plot([r["train_seconds"] for r in own], [100 * r["val_accuracy"] for r in own], style,
                      label=label, markersize=3)
    axis.axhline(100 * target, color="grey", linewidth=0.8, linestyle=":")
    axis.set_xlabel("training wall seconds (sampling included, validation excluded)")
    axis.set_ylabel("validation accuracy (%)")
    axis.set_title(f"Omniglot {case}: time to {100 * target:.0f} % validation accuracy")
    axis.legend(loc="best")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    os.replace(partial, path)


# ---- the two sides -----------------------------------------------------------------------------------------------
class RunnerSide:
    """The runner as `maml-run` builds it for this case; trained and validated block by block."""

    def __init__(self, args, ways: int, run_dir: Path):
        from hydra import compose, initialize_config_dir

        from maml_runner.train import build

        conf = Path(__file__).resolve().parents[1] / "conf"
        overrides = [f"dataset=omniglot_{args.case}", "model=conv4", f"algorithm={args.algorithm}",
                     f"dataset.root={args.root}", f"train.meta_batch_size={args.meta_batch}",
                     f"seed={args.seed}", f"hardware.device={args.device}", "report.enabled=false"]
        if args.threads:
            overrides.append(f"hardware.threads={args.threads}")
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            self.cfg = compose(config_name="config", overrides=overrides)
        self.trainer = build(self.cfg, run_dir)
        self.algorithm, self.device = self.trainer.algorithm, self.trainer.device
        self.train_source = self.trainer.sources["train"]
        self.val_tasks = [task.to(self.device) for task in
                          self.trainer.sources["validation"].fixed_tasks(args.val_tasks, args.seed + 1)]
        self.meta_batch, self.iteration = args.meta_batch, 0
        self.hyper = (float(self.cfg.algorithm.inner_lr), int(self.cfg.algorithm.inner_steps),
                      float(self.cfg.algorithm.outer_lr))

    def train(self, iterations: int) -> None:
        for _ in range(iterations):
            tasks = self.algorithm.next_batch(self.train_source, self.meta_batch).to(self.device)
            self.algorithm.train_step(tasks, self.iteration)
            self.iteration += 1

    def validate(self, steps: int) -> float:
        from maml_runner.evaluate import evaluate
        return float(evaluate(self.algorithm, self.val_tasks, steps, self.device).accuracies.mean())


class PeerSide:
    """learn2learn's pipeline with the runner's hyperparameters."""

    def __init__(self, args, ways: int, hyper: tuple):
        import torch

        import l2l_peer  # scripts/l2l_peer.py (this script's folder is on sys.path)
        inner_lr, inner_steps, outer_lr = hyper
        random.seed(args.seed)  # learn2learn's class split shuffles with the global random
        torch.manual_seed(args.seed)
        tasksets = l2l_peer.peer_tasksets(l2l_peer.prepare_peer_root(args.root, args.peer_root), ways, 1)
        self.peer = l2l_peer.PeerMAML(tasksets, ways, 1, inner_lr, inner_steps, outer_lr,
                                      args.algorithm == "fomaml", args.device)
        self.val_tasks = self.peer.fixed_validation_tasks(args.val_tasks, args.seed + 1)
        self.meta_batch, self.iteration = args.meta_batch, 0

    def train(self, iterations: int) -> None:
        for _ in range(iterations):
            self.peer.train_iteration(self.meta_batch)
            self.iteration += 1

    def validate(self, steps: int) -> float:
        return self.peer.validation_accuracy(self.val_tasks, steps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(TARGETS), default="5w1s")
    parser.add_argument("--algorithm", choices=("maml", "fomaml"), default="maml")
    parser.add_argument("--target", type=float, default=None, help="validation accuracy to reach (default: 0.95 "
                                                                    "for 5w1s, 0.80 for 20w1s)")
    parser.add_argument("--budget-seconds", type=float, default=1800.0, help="training seconds per side")
    parser.add_argument("--max-iterations", type=int, default=60000)
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--val-tasks", type=int, default=200)
    parser.add_argument("--val-steps", type=int, default=3, help="adaptation steps at validation (both sides)")
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--sides", nargs="+", choices=("runner", "peer"), default=["runner", "peer"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (both sides)")
    parser.add_argument("--root", default=os.environ.get("OMNIGLOT_ROOT", "../shared/data/omniglot"))
    parser.add_argument("--peer-root", default=None, help="the peer's torchvision layout (default: a fixed folder "
                                                          "under the temp dir, reused)")
    parser.add_argument("--out", required=True, help="folder for curve.csv, summary.csv, curve.png")
    args = parser.parse_args(argv)
    target = TARGETS[args.case] if args.target is None else args.target
    ways = int(args.case.split("w")[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.peer_root is None:
        import l2l_peer
        args.peer_root = l2l_peer.DEFAULT_PEER_ROOT

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    # The runner's own files (the split it writes) go to a scratch folder, removed at the end, not into --out.
    with tempfile.TemporaryDirectory(prefix="tta_runner_") as scratch:
        return train_side_by_side(args, ways, target, out, RunnerSide(args, ways, Path(scratch)))


def train_side_by_side(args, ways: int, target: float, out: Path, runner: RunnerSide) -> int:
    """The alternating blocks, the CSVs and the plot; returns the exit code."""
    import torch
    sides = {}
    if "runner" in args.sides:
        sides["runner"] = runner
    if "peer" in args.sides:
        sides["peer"] = PeerSide(args, ways, runner.hyper)
    print(f"time to {100 * target:.0f} % | {args.algorithm} {args.case} | meta-batch {args.meta_batch}, "
          f"inner lr {runner.hyper[0]}, {runner.hyper[1]} step(s), Adam {runner.hyper[2]} | validation: "
          f"{args.val_tasks} tasks, {args.val_steps} steps, every {args.validate_every} iterations | budget "
          f"{args.budget_seconds:.0f} s per side | threads {torch.get_num_threads()} | load average "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    state = {name: {"seconds": 0.0, "iteration": 0, "accuracy": 0.0} for name in sides}
    rows: list[dict] = []
    active = list(sides)
    while active:
        for name in list(active):
            side, own = sides[name], state[name]
            block = min(args.validate_every, args.max_iterations - own["iteration"])
            started = time.perf_counter()
            side.train(block)
            elapsed = time.perf_counter() - started
            own["seconds"] += elapsed
            own["iteration"] += block
            own["accuracy"] = side.validate(args.val_steps)
            rows.append({"side": name, "iteration": own["iteration"], "train_seconds": round(own["seconds"], 2),
                         "val_accuracy": round(own["accuracy"], 5),
                         "seconds_per_iteration": round(elapsed / max(block, 1), 4),
                         "load_average": round(os.getloadavg()[0], 2)})
            print(f"{name:6s} iteration {own['iteration']:6d}  {own['seconds']:8.1f} s  val acc "
                  f"{100 * own['accuracy']:6.2f} %  ({elapsed / max(block, 1):.3f} s/iter)", flush=True)
            write_csv(out / "curve.csv", rows, CURVE_COLUMNS)
            if should_stop(own, target, args.budget_seconds, args.max_iterations):
                active.remove(name)
    summary = summarize(rows, list(sides), target)
    write_csv(out / "summary.csv", summary, SUMMARY_COLUMNS)
    plot(rows, target, args.case, out / "curve.png")
    for row in summary:
        reached = (f"reached at {row['seconds_to_target']} s (iteration {row['iteration_at_target']})"
                   if row["reached"] else f"not reached ({row['train_seconds']} s, {row['iterations_run']} iterations)")
        print(f"{row['side']:6s} {100 * target:.0f} % {reached}; best {100 * row['best_val_accuracy']:.2f} %")
    print(speedup_line(summary))
    return 0 if math.isfinite(state[next(iter(state))]["accuracy"]) else 1


if __name__ == "__main__":
    sys.exit(main())
