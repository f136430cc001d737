"""Sweep aggregation: swept keys as columns, job order, paired comparisons over the same test tasks; the stats;
the multirun callback and the launcher presets."""
from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from scipy import stats as scipy_stats

from conftest import CONF_DIR, run_cli
from maml_runner.aggregate import aggregate
from maml_runner.errors import UserError
from maml_runner.io import read_csv, write_csv
from maml_runner.stats import paired_comparison
from maml_runner.config import RESULT_LEADING_KEYS, RESULT_TRAILING_KEYS
from maml_runner.train import RESULT_METRIC_COLUMNS

# results.csv of a maml run (config.result_fields for algorithm=maml)
RESULT_COLUMNS = [*RESULT_LEADING_KEYS, "algorithm.inner_steps", "algorithm.inner_lr", "algorithm.outer_lr",
                  "algorithm.first_order", "algorithm.loss_reduction", *RESULT_TRAILING_KEYS, *RESULT_METRIC_COLUMNS]


def fake_run(run_dir, overrides: dict, per_task_acc, algorithm="maml", inner_steps=1, eval_seed=1234):
    """A finished run as maml-run leaves it: results.csv, test_tasks.csv, .hydra/{overrides,config}.yaml."""
    acc = np.asarray(per_task_acc, dtype=float)
    row = {key: None for key in RESULT_COLUMNS}
    row.update({"algorithm.name": algorithm, "dataset.name": "omniglot_5w1s", "dataset.ways": 5, "dataset.shots": 1,
                "dataset.query_shots": 1, "algorithm.inner_steps": inner_steps, "metric": "accuracy",
                "mean": acc.mean(), "ci95": 0.01, "test_loss": 1 - acc.mean(), "test_loss_ci95": 0.01,
                "test_accuracy": acc.mean(), "test_accuracy_ci95": 0.01, "n_tasks": acc.size,
                "iterations_done": 10, "seconds_per_iteration": 0.25, "peak_memory_mb": 512.5})
    write_csv(run_dir / "results.csv", [row], RESULT_COLUMNS)
    write_csv(run_dir / "test_tasks.csv", [{"task": i, "loss": 1 - a, "accuracy": a} for i, a in enumerate(acc)])
    hydra = run_dir / ".hydra"
    hydra.mkdir(parents=True)
    (hydra / "overrides.yaml").write_text("".join(f"- {k}={v}\n" for k, v in overrides.items()))
    (hydra / "config.yaml").write_text(f"eval:\n  seed: {eval_seed}\n")


@pytest.fixture
def sweep(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 0.9, size=40)
    runs = {}
    for num, (algo, steps, shift) in enumerate([("maml", 1, 0.0), ("maml", 3, 0.05), ("fomaml", 1, -0.01)] * 4):
        if num >= 11:  # 11 jobs: checks that job 10 sorts after job 9
            break
        acc = np.clip(base + shift + rng.normal(0, 0.01, size=40), 0, 1)
        name = f"{num}_algorithm={algo},algorithm.inner_steps={steps},seed={num // 3}"
        fake_run(tmp_path / name, {"algorithm": algo, "algorithm.inner_steps": steps, "seed": num // 3,
                                   "dataset.root": "/data", "hardware": "cpu"}, acc, algo, steps)
        runs[num] = acc
    return tmp_path, runs


def test_aggregate_puts_swept_keys_in_columns_in_job_order(sweep):
    root, runs = sweep
    result = aggregate([root])
    assert result["swept"] == ["algorithm", "algorithm.inner_steps", "seed"]  # dataset.root, hardware: not swept
    table = read_csv(root / "aggregate.csv", typed=True)
    assert [int(r["run"].split("_")[0]) for r in table] == list(range(11))
    assert list(table[0])[:4] == ["run", "algorithm", "algorithm.inner_steps", "seed"]
    assert [r["mean"] for r in table] == pytest.approx([runs[i].mean() for i in range(11)])
    text = (root / "aggregate.md").read_text()
    assert "| 10 | maml | 3 | 3 | accuracy |" in text  # job number as the run label
    assert [(r["seconds_per_iteration"], r["peak_memory_mb"]) for r in table] == [(0.25, 512.5)] * 11  # cost columns
    assert "| 40 | 10 | 0.25 | 512.5 |" in text


def test_paired_comparison_against_the_first_run_matches_a_paired_t_test(sweep):
    root, runs = sweep
    comparisons = {int(r["run"].split("_")[0]): r for r in aggregate([root])["comparisons"]}
    assert sorted(comparisons) == list(range(1, 11))
    one = comparisons[1]
    assert one["diff"] == pytest.approx((runs[1] - runs[0]).mean())
    assert one["p_value"] == pytest.approx(scipy_stats.ttest_rel(runs[1], runs[0]).pvalue)
    assert one["diff_ci95_low"] < one["diff"] < one["diff_ci95_high"]
    assert one["significant"] is True  # +5 points on every task
    rows = read_csv(root / "comparisons.csv", typed=True)
    assert len(rows) == 10 and rows[0]["baseline"].startswith("0_")


def test_baseline_by_key_and_runs_not_on_the_same_tasks_are_not_paired(tmp_path):
    fake_run(tmp_path / "0_a", {"algorithm": "maml"}, [0.5, 0.6, 0.7])
    fake_run(tmp_path / "1_b", {"algorithm": "fomaml"}, [0.4, 0.6, 0.6], algorithm="fomaml")
    fake_run(tmp_path / "2_c", {"algorithm": "anil"}, [0.4, 0.6, 0.6], algorithm="anil", eval_seed=7)
    fake_run(tmp_path / "3_d", {"algorithm": "reptile"}, [0.4, 0.6], algorithm="reptile")
    result = aggregate([tmp_path], baseline="algorithm=fomaml")
    assert result["baseline"]["run"] == "1_b"
    notes = {r["run"]: r["note"] for r in result["comparisons"]}
    assert notes["0_a"] == ""
    assert notes["2_c"] == "not paired: eval.seed 7 vs 1234"
    assert notes["3_d"] == "not paired: 2 vs 3 test tasks"
    with pytest.raises(UserError, match="--baseline 'algorithm=nope' matches 0 runs"):
        aggregate([tmp_path], baseline="algorithm=nope")


def test_relative_directories_work(sweep, monkeypatch):
    root, _ = sweep
    monkeypatch.chdir(root.parent)
    result = aggregate([root.name])
    assert len(result["table"]) == 11 and (root / "aggregate.md").is_file()


def test_no_results_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="no results.csv under"):
        aggregate([tmp_path])
    with pytest.raises(UserError, match="does not exist"):
        aggregate([tmp_path / "missing"])


def test_paired_comparison_numbers():
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.5, 2.0, 2.0, 3.5])
    result = paired_comparison(a, b, seed=0)
    assert result.diff == pytest.approx(0.5) and result.n == 4
    assert result.t_statistic == pytest.approx(scipy_stats.ttest_rel(a, b).statistic)
    assert paired_comparison(a, b, seed=0) == result  # same seed, same bootstrap CI
    same = paired_comparison(a, a)
    assert same.diff == 0 and same.p_value == 1.0 and not same.significant
    shifted = paired_comparison(a + 1, a)
    assert shifted.diff == 1 and shifted.ci95_low == shifted.ci95_high == 1 and shifted.significant
    with pytest.raises(UserError, match="same tasks on both sides: got 4 and 3 values"):
        paired_comparison(a, a[:3])


def test_multirun_writes_the_aggregate_table_through_the_callback(tmp_path):
    result = run_cli("-m", "algorithm.inner_steps=1,2", "train.iterations=2", "train.val_interval=2",
                     "train.val_tasks=2", "train.meta_batch_size=2", "eval.num_tasks=4", "hardware=cpu",
                     "report.enabled=false", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    table = read_csv(tmp_path / "aggregate.csv", typed=True)
    assert [r["algorithm.inner_steps"] for r in table] == [1, 2]
    assert len(read_csv(tmp_path / "comparisons.csv")) == 1
    assert all(len(read_csv(next(tmp_path.glob(f"{n}_*")) / "test_tasks.csv")) == 4 for n in (0, 1))


@pytest.mark.parametrize("preset, target", [("parallel", "JoblibLauncher"), ("local_submitit", "LocalLauncher"),
                                            ("slurm", "SlurmLauncher")])
def test_launcher_presets_compose(preset, target):
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.callbacks.aggregate._target_ == "maml_runner.aggregate.AggregateCallback"


def test_a_group_set_by_a_preset_shows_the_name_it_ran_with(tmp_path):
    fake_run(tmp_path / "a", {"algorithm": "maml"}, [0.9, 0.8], "maml")
    fake_run(tmp_path / "b", {"experiment": "nichol2018_reptile_5w1s"}, [0.5, 0.6], "reptile")
    result = aggregate([tmp_path / "a", tmp_path / "b"])
    assert result["swept"][:2] == ["algorithm", "experiment"]
    assert [(r["algorithm"], r["experiment"]) for r in result["table"]] == [("maml", None),
                                                                          ("reptile", "nichol2018_reptile_5w1s")]
