#!/usr/bin/env python
"""Run `maml-run` on each kind of bad input and print a Markdown table: input, the one line it printed, exit code.

  .venv/bin/python scripts/bad_input_table.py > docs/bad_input.md

Uses a tiny synthetic Omniglot (maml_runner/data/synthetic_omniglot.py) in a temporary directory; nothing touches the
network.
The tests (tests/test_bad_input.py, tests/test_checkpoint.py, tests/test_run_lock.py) assert these messages; this
script shows them.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from maml_runner.data.synthetic_omniglot import make_fake_omniglot

REPO = Path(__file__).resolve().parent.parent

TINY = ["train.iterations=4", "train.val_interval=2", "train.val_tasks=2", "train.meta_batch_size=2",
        "eval.num_tasks=2", "hardware=cpu", "hardware.threads=1"]


def cli_env() -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cli(*args: str, cwd=REPO) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-m", "maml_runner.cli", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=600)
    lines = done.stderr.strip().splitlines()
    return (lines[-1] if lines else "(nothing on stderr)"), done.returncode


def rewrite_zip(path: Path, change) -> None:
    with zipfile.ZipFile(path) as archive:
        items = [(name, change(name, archive.read(name))) for name in archive.namelist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in items:
            if data is not None:
                archive.writestr(name, data)


class RunsCode:
    """Unpickling this creates `marker` (stands in for any code a crafted checkpoint could run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@contextlib.contextmanager
def busy(run_dir: Path, pids: dict):
    """A long maml-run holding `run_dir` (its lock file names its pid) while the case runs; killed after."""
    holder = subprocess.Popen([sys.executable, "-m", "maml_runner.cli", *TINY, "train.iterations=1000000",
                               "report.enabled=false", f"hydra.run.dir={run_dir}"], cwd=REPO, env=cli_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        lock = run_dir / ".maml-run.lock"
        while not (lock.is_file() and lock.read_text().strip() == str(holder.pid)):
            if holder.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the holder run never took {lock}")
            time.sleep(0.05)
        pids[str(holder.pid)] = "<pid>"
        yield
    finally:
        holder.kill()
        holder.wait()


def first_drawing(name: str) -> bool:
    return name.endswith("_01.png") and "character01" in name and "Alphabet_b0" in name


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bad_input_"))
    run_dir = f"hydra.run.dir={tmp / 'run'}"

    def omniglot(name: str, **kwargs) -> list[str]:
        root = make_fake_omniglot(tmp / name, **kwargs)
        return ["dataset=omniglot_5w1s", f"dataset.root={root}", "dataset.split=[6,3,3]", "dataset.ways=3",
                "model.hidden=8", f"dataset.cache_dir={tmp / name / 'cache'}"]

    good = omniglot("good")
    missing_zip = omniglot("missing_zip")
    (tmp / "missing_zip" / "images_evaluation.zip").unlink()
    corrupt_zip = omniglot("corrupt_zip")
    (tmp / "corrupt_zip" / "images_background.zip").write_bytes(b"PK\x03\x04 not a zip")
    corrupt_png = omniglot("corrupt_png")
    rewrite_zip(tmp / "corrupt_png" / "images_background.zip",
                lambda n, d: b"\x89PNG garbage" if first_drawing(n) else d)
    partial = omniglot("partial", as_zip=False)
    for png in sorted((tmp / "partial" / "images_evaluation" / "Alphabet_e0" / "character02").glob("*.png"))[12:]:
        png.unlink()
    blocker = tmp / "a_file"
    blocker.write_text("not a directory")
    finished = tmp / "finished"
    cli(*TINY, f"hydra.run.dir={finished}")
    (finished / "checkpoints" / "last.pt").write_bytes((finished / "checkpoints" / "last.pt").read_bytes()[:1000])
    foreign = tmp / "foreign.pt"
    import torch
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, foreign)
    crafted, marker = tmp / "crafted.pt", tmp / "code-ran"
    torch.save({"format": "maml-runner-checkpoint", "version": 1, "payload": RunsCode(marker)}, crafted)
    pids: dict[str, str] = {}

    cases = [
        ("unknown group option", ["algorithm=foo"]),
        ("unknown key", ["train.iteratons=5"]),
        ("wrong type", ["train.iterations=1.5"]),
        ("zero iterations", ["train.iterations=0"]),
        ("negative learning rate", ["algorithm.inner_lr=-0.1"]),
        ("zero inner steps", ["algorithm.inner_steps=0"]),
        ("required key removed", ["~train.iterations"]),
        ("wrong type inside a list", ["dataset.amplitude=[0.1,high]"]),
        ("algorithm key removed", ["~algorithm.inner_lr"]),
        ("a key the algorithm does not have", ["+algorithm.inner_optimizer=adam"]),
        ("zero ways", [*good, "dataset.ways=0"]),
        ("negative shots", [*good, "dataset.shots=-1"]),
        ("ways > classes in a split", [*good, "dataset.ways=4"]),
        ("shots + query_shots > 20", [*good, "dataset.shots=15", "dataset.query_shots=10"]),
        ("best checkpoint without validation characters", ["experiment=nichol2018_reptile_5w1s",
                                                           "eval.checkpoint=best"]),
        ("missing data root", ["dataset=omniglot_5w1s", f"dataset.root={tmp / 'nowhere'}"]),
        ("missing one of the two zips", missing_zip),
        ("corrupt zip", corrupt_zip),
        ("corrupt PNG", corrupt_png),
        ("partial extraction", partial),
        ("CUDA requested, none present", ["hardware=cuda"]),
        ("outputs directory not writable", [f"hydra.run.dir={blocker}/run"]),
        ("NaN/inf loss during training", ["algorithm.inner_lr=1e30"]),
        ("truncated checkpoint", [f"train.resume={finished}"]),
        ("foreign checkpoint (not written by maml-run)", [f"train.resume={foreign}"]),
        ("checkpoint that would run code when unpickled", [f"train.resume={crafted}"]),
        ("run directory in use by another maml-run", [f"hydra.run.dir={tmp / 'busy'}"]),
        ("eval.only=true without a trained run to test", ["eval.only=true"]),
        ("eval.only=true changing what was trained", ["eval.only=true", f"train.resume={finished}",
                                                      "algorithm.inner_lr=0.1"]),
        ("unknown eval.checkpoint", ["eval.checkpoint=foo"]),
        ("zero ensemble size", ["eval.ensemble_size=0"]),
        ("torch.compile with a second-order algorithm", ["hardware.compile=true"]),
        ("eval.checkpoint=ensemble on a run that kept no top checkpoints", [
            "eval.only=true", f"train.resume={finished}", "eval.checkpoint=ensemble"]),
    ]
    setups = {"run directory in use by another maml-run": lambda: busy(tmp / "busy", pids)}
    print("# Bad input: what maml-run prints\n\n"
          "Produced by `.venv/bin/python scripts/bad_input_table.py > docs/bad_input.md` (a tiny synthetic Omniglot in a "
          "temporary\ndirectory; `<tmp>` stands for it). Each line is the last line on stderr; nothing else is printed "
          "and no result file is\nwritten half. The tests (`tests/test_bad_input.py`, `tests/test_checkpoint.py`, "
          "`tests/test_train.py`, `tests/test_run_lock.py`, `tests/test_eval_only.py`, `tests/test_ensemble.py`) assert "
          "these messages.\n")
    print("| bad input | command line (after `maml-run`) | message (stderr) | exit code |")
    print("|---|---|---|---|")
    for what, overrides in cases:
        extra = [] if any(o.startswith("hydra.run.dir") for o in overrides) else [run_dir]
        with setups.get(what, contextlib.nullcontext)():
            message, code = cli(*TINY, *overrides, *extra)
        if marker.exists():
            raise SystemExit(f"{what}: loading {crafted} ran the code inside it")
        for pid, shown_as in pids.items():  # the holder's pid changes from one regeneration to the next
            message = message.replace(f"pid {pid}", f"pid {shown_as}")
        shown = " ".join(o for o in overrides if not o.startswith(("dataset.root=", "dataset.cache_dir=",
                                                                    "dataset.split=", "model.hidden=")))
        print(f"| {what} | `{shown.replace(str(tmp), '<tmp>')}` | `{message.replace(str(tmp), '<tmp>')}` | {code} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
