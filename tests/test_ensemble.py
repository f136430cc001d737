"""eval.checkpoint=ensemble (Antoniou et al. 2019's test: the query logits averaged over the top validation
checkpoints): which checkpoints training keeps, the averaged test against one computed by hand, resume, eval.only and
the ablation, on the tiny generated Omniglot (classification) and sinusoid."""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_same_csv_rows, compose_config, run_killed_at_last_pt
from maml_runner.ablation import run_ablation
from maml_runner.checkpoint import config_differences, load_algorithm, load_checkpoint, save_checkpoint
from maml_runner.ensemble import ranked_validations
from maml_runner.errors import UserError
from maml_runner.eval_only import evaluate_only
from maml_runner.io import read_csv
from maml_runner.train import build, run, without_mode_keys

K = 3
SMALL = ["train.iterations=40", "train.val_interval=5", "train.val_tasks=6", "train.meta_batch_size=2",
         "train.log_interval=5", "eval.num_tasks=12", "eval.inner_steps=1", "hardware=cpu", "hardware.threads=1",
         "hardware.deterministic=true", "report.enabled=false"]


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> list[str]:
    """Overrides for a 3-way MAML run on the generated Omniglot (12 characters, split 6 / 3 / 3)."""
    from omniglot_fixture import make_fake_omniglot
    base = tmp_path_factory.mktemp("omniglot")
    root = make_fake_omniglot(base / "data")
    return ["dataset=omniglot_5w1s", f"dataset.root={root}", f"dataset.cache_dir={base / 'cache'}",
            "dataset.split=[6,3,3]", "dataset.ways=3", "model.hidden=8", *SMALL, "eval.checkpoint=ensemble",
            f"eval.ensemble_size={K}"]


@pytest.fixture(scope="module")
def reference(omniglot, tmp_path_factory) -> Path:
    """The ensemble run done in one go."""
    run_dir = tmp_path_factory.mktemp("reference")
    run(compose_config(omniglot), run_dir)
    return run_dir


def by_hand_top_of(rows: list[dict], k: int) -> list[int]:
    """The k best validations of metrics rows: highest accuracy first, the later iteration first among equals."""
    return [r["iteration"] for r in sorted(rows, key=lambda r: (-r["val_accuracy"], -r["iteration"]))[:k]]


def by_hand_top(run_dir: Path, k: int) -> list[int]:
    return by_hand_top_of(read_csv(run_dir / "metrics.csv", typed=True), k)


def kept(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "checkpoints" / "top").iterdir()}


def retest(run_dir, out: Path, *overrides: str) -> dict:
    command = ["eval.only=true", f"train.resume={run_dir}", "hardware=cpu", "hardware.threads=1", *overrides]
    return evaluate_only(compose_config(command), out, command)


# ---- ranking ---------------------------------------------------------------------------------------------------
def test_ranking_best_accuracy_first_later_iteration_among_equals_and_no_nan():
    rows = [{"iteration": 10, "val_accuracy": 0.5, "val_loss": 1.0}, {"iteration": 20, "val_accuracy": 0.7,
            "val_loss": 0.9}, {"iteration": 30, "val_accuracy": 0.5, "val_loss": 0.8},
            {"iteration": 40, "val_accuracy": math.nan, "val_loss": math.nan},
            {"iteration": 50, "val_accuracy": 0.7, "val_loss": 0.7}]
    assert [r["iteration"] for r in ranked_validations(rows, "classification")] == [50, 20, 30, 10]
    # Regression: lowest validation loss first (its accuracy is nan).
    assert [r["iteration"] for r in ranked_validations(rows, "regression")] == [50, 30, 20, 10]


# ---- training keeps the top k -------------------------------------------------------------------------------------
def test_top_holds_exactly_the_k_best_validations_and_the_test_is_their_ensemble(reference):
    rows = read_csv(reference / "metrics.csv", typed=True)
    assert [r["iteration"] for r in rows] == list(range(5, 41, 5))
    top = by_hand_top(reference, K)
    assert kept(reference) == {f"iter_{i}.pt" for i in top}
    for iteration in top:  # each file is the state of that validation
        assert load_checkpoint(reference / "checkpoints" / "top" / f"iter_{iteration}.pt")["iteration"] == iteration
    result, = read_csv(reference / "results.csv", typed=True)
    assert result["checkpoint"] == "ensemble" and result["n_tasks"] == 12
    assert len(read_csv(reference / "test_tasks.csv")) == 12


def test_no_top_folder_without_eval_checkpoint_ensemble(omniglot, tmp_path):
    run(compose_config([*omniglot, "eval.checkpoint=best", "train.iterations=10"]), tmp_path)
    assert not (tmp_path / "checkpoints" / "top").exists()
    assert read_csv(tmp_path / "results.csv", typed=True)[0]["checkpoint"] == "best"


# ---- the averaged test -------------------------------------------------------------------------------------------
def test_one_member_is_exactly_the_test_of_the_best_accuracy_checkpoint(reference, tmp_path):
    best = by_hand_top(reference, 1)[0]
    ensemble = retest(reference, tmp_path, "eval.checkpoint=ensemble", "eval.ensemble_size=1")
    single = retest(reference / "checkpoints" / "top" / f"iter_{best}.pt", tmp_path)
    assert Path(ensemble["results_file"]).name == "results_eval_ensemble1_1steps_12tasks_seed1234.csv"
    assert (reference / "test_tasks_eval_ensemble1_1steps_12tasks_seed1234.csv").read_bytes() == \
        (reference / f"test_tasks_eval_iter_{best}_1steps_12tasks_seed1234.csv").read_bytes()
    assert ensemble["mean"] == single["mean"] and ensemble["checkpoint"] == "ensemble"


def test_two_members_average_the_logits_as_computed_by_hand(reference, omniglot, tmp_path):
    retest(reference, tmp_path, "eval.checkpoint=ensemble", "eval.ensemble_size=2")
    got = read_csv(reference / "test_tasks_eval_ensemble2_1steps_12tasks_seed1234.csv", typed=True)
    trainer = build(compose_config(omniglot), tmp_path / "by_hand")
    algorithm = trainer.algorithm.eval()
    tasks = list(trainer.sources["test"].iter_fixed_tasks(12, 1234))
    logits = []
    for iteration in by_hand_top(reference, 2):
        load_algorithm(algorithm, reference / "checkpoints" / "top" / f"iter_{iteration}.pt")
        logits.append([algorithm.adapt(task, 1, None)(task.query_x).detach() for task in tasks])
    for row, task, first, second in zip(got, tasks, *logits):
        mean = (first.double() + second.double()) / 2
        assert row["accuracy"] == (mean.argmax(-1) == task.query_y).float().mean().item()
        assert row["loss"] == pytest.approx(F.cross_entropy(mean, task.query_y).item(), rel=1e-5)
    # Not a copy of either member's test: the average is its own model.
    assert [row["loss"] for row in got] != pytest.approx([F.cross_entropy(x, t.query_y).item()
                                                         for x, t in zip(logits[0], tasks)], rel=1e-4)


def test_the_runs_own_ensemble_is_reproduced_by_eval_only(reference, tmp_path):
    row = retest(reference, tmp_path, "eval.checkpoint=ensemble")  # eval.ensemble_size: the run's own (3)
    assert Path(row["results_file"]).name == f"results_eval_ensemble{K}_1steps_12tasks_seed1234.csv"
    assert (reference / f"test_tasks_eval_ensemble{K}_1steps_12tasks_seed1234.csv").read_bytes() == \
        (reference / "test_tasks.csv").read_bytes()


def test_ablation_cells_test_the_runs_ensemble(reference, omniglot, tmp_path):
    rows = run_ablation(compose_config([*omniglot, "ablation.enabled=true", "ablation.train_steps=[]",
                                        "ablation.eval_steps=[1]", f"ablation.from_runs=[{reference}]"]), tmp_path)
    assert rows[0]["checkpoint"].count(" + ") == K - 1
    cells = read_csv(tmp_path / "ablation_tasks.csv", typed=True)
    own = read_csv(reference / "test_tasks.csv", typed=True)
    assert [c["accuracy"] for c in cells] == [r["accuracy"] for r in own]
    assert [c["loss"] for c in cells] == pytest.approx([r["loss"] for r in own], rel=1e-6)


# ---- resume --------------------------------------------------------------------------------------------------------
def test_killed_and_resumed_run_keeps_the_same_top_and_results(reference, omniglot, tmp_path, monkeypatch):
    """Killed while writing last.pt of a validation that entered the top: top/ then holds a state from after the
    last.pt the run resumes from (and not yet pruned); the resumed run must end as the one done in one go."""
    rows = read_csv(reference / "metrics.csv", typed=True)
    entered = [r["iteration"] for i, r in enumerate(rows)
               if i >= K and r["iteration"] in by_hand_top_of(rows[:i + 1], K)]
    assert entered, "no validation after the first few entered the top: pick another fixture"
    k = entered[-1]
    run_dir = tmp_path / "run"
    run_killed_at_last_pt(compose_config(omniglot), run_dir, k, monkeypatch)
    assert f"iter_{k}.pt" in kept(run_dir) and len(kept(run_dir)) == K + 1  # written, the dropped one not yet pruned
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == k - 5

    # Resumed to end where last.pt stands: top/ is pruned to the top of the validations up to there (iter_k, from
    # after it, goes; the member it had pushed out is back).
    early = tmp_path / "early"
    shutil.copytree(run_dir, early)
    run(compose_config([*omniglot, "train.resume=true", f"train.iterations={k - 5}"]), early)
    assert kept(early) == {f"iter_{i}" + ".pt" for i in by_hand_top_of([r for r in rows if r["iteration"] < k], K)}

    run(compose_config([*omniglot, "train.resume=true"]), run_dir)
    assert kept(run_dir) == kept(reference)
    assert_same_csv_rows(run_dir, reference, names=("metrics.csv", "results.csv", "test_tasks.csv"))
    for name in kept(reference):
        got, want = (load_checkpoint(d / "checkpoints" / "top" / name)["algorithm"]["parameters"]
                     for d in (run_dir, reference))
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=f"{name}:{key}")


# ---- fewer validations than members; regression; refusals ----------------------------------------------------------
SINUSOID = ["train.iterations=20", "train.val_interval=10", "train.val_tasks=8", "train.meta_batch_size=4",
            "eval.num_tasks=16", "hardware=cpu", "hardware.threads=1", "report.enabled=false"]


def test_fewer_validations_than_members_test_those_there_are_and_say_so(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="maml_runner.train"):
        row = run(compose_config([*SINUSOID, "eval.checkpoint=ensemble", "eval.ensemble_size=5"]), tmp_path)
    assert row["checkpoint"] == "ensemble" and row["metric"] == "mse"
    losses = {r["iteration"]: r["val_loss"] for r in read_csv(tmp_path / "metrics.csv", typed=True)}
    assert kept(tmp_path) == {"iter_10.pt", "iter_20.pt"}
    order = sorted(losses, key=lambda i: (losses[i], -i))  # regression: lowest validation loss first
    assert f"iterations {order[0]} (val loss" in caplog.text
    assert "2 of eval.ensemble_size=5: the run has only these validations with a kept checkpoint" in caplog.text


def test_eval_only_refuses_a_run_without_kept_checkpoints_and_a_file(tmp_path):
    run(compose_config(SINUSOID), tmp_path / "best_run")
    with pytest.raises(UserError, match=r"^train.resume=\S+/best_run: no checkpoints in '\S+/best_run/checkpoints/top'"
                                        r" \(kept only by runs trained with eval.checkpoint=ensemble\); use "
                                        r"eval.checkpoint=best or last$"):
        retest(tmp_path / "best_run", tmp_path, "eval.checkpoint=ensemble")
    with pytest.raises(UserError, match=r"eval.checkpoint=ensemble tests the checkpoints a run directory kept in "
                                        r"checkpoints/top/; name the run directory, not a file$"):
        retest(tmp_path / "best_run" / "checkpoints" / "best.pt", tmp_path, "eval.checkpoint=ensemble")


def test_runs_saved_before_the_key_existed_resume_and_retest_unchanged(tmp_path):
    """A checkpoint whose config lacks eval.ensemble_size (written before it existed) matches today's default config
    (no resume difference) and can still be re-tested."""
    run(compose_config(SINUSOID), tmp_path / "old")
    last = tmp_path / "old" / "checkpoints" / "last.pt"
    payload = load_checkpoint(last)
    del payload["config"]["eval"]["ensemble_size"]
    save_checkpoint(last, payload)
    assert config_differences(load_checkpoint(last)["config"], without_mode_keys(compose_config(SINUSOID))) == []
    row = retest(tmp_path / "old", tmp_path, "eval.checkpoint=last", "eval.num_tasks=4")
    assert row["checkpoint"] == "last" and row["n_tasks"] == 4


def test_temporaries_of_a_kill_mid_write_in_top_are_removed_at_the_next_start(tmp_path):
    from maml_runner.io import remove_stale_temporaries
    top = tmp_path / "checkpoints" / "top"
    top.mkdir(parents=True)
    (top / ".iter_10.pt.x1y2.tmp").write_bytes(b"half")
    (top / "iter_5.pt").write_bytes(b"kept")
    assert remove_stale_temporaries(tmp_path) == [top / ".iter_10.pt.x1y2.tmp"]
    assert [p.name for p in top.iterdir()] == ["iter_5.pt"]
