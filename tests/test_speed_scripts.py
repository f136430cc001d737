"""The speed scripts' own logic: the learn2learn peer's setup (scripts/l2l_peer.py), time-to-accuracy bookkeeping
(scripts/time_to_accuracy.py) and scripts/gpu_check.sh on a machine without a GPU."""
from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from omniglot_fixture import make_fake_omniglot

REPO = Path(__file__).resolve().parents[1]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


l2l_peer = _script("l2l_peer")
tta = _script("time_to_accuracy")


# ---- the peer's data setup ---------------------------------------------------------------------------------------
def test_peer_root_links_the_zips_and_extracts_them_without_touching_the_source(tmp_path):
    source = make_fake_omniglot(tmp_path / "shared")
    before = sorted(p.name for p in source.iterdir())
    peer_root = l2l_peer.prepare_peer_root(source, tmp_path / "peer")
    folder = peer_root / "omniglot-py"
    for part in l2l_peer.PARTS:
        assert (folder / f"{part}.zip").is_symlink()
        assert (folder / f"{part}.zip").resolve() == (source / f"{part}.zip").resolve()
        assert len(list((folder / part).glob("*/*/*.png"))) == 2 * 3 * 20  # 2 alphabets x 3 characters x 20
    assert sorted(p.name for p in source.iterdir()) == before
    assert not [p for p in folder.iterdir() if p.name.startswith(("images_background.", "images_evaluation."))
                and p.is_dir()]  # no temporary extraction folders left
    assert l2l_peer.prepare_peer_root(source, tmp_path / "peer") == peer_root  # a second call reuses it


def test_peer_root_refuses_a_foreign_zip(tmp_path):
    source = make_fake_omniglot(tmp_path / "shared")
    (tmp_path / "peer" / "omniglot-py").mkdir(parents=True)
    (tmp_path / "peer" / "omniglot-py" / "images_background.zip").write_bytes(b"not the shared zip")
    with pytest.raises(FileExistsError, match="is not a link to"):
        l2l_peer.prepare_peer_root(source, tmp_path / "peer")


def test_integrity_bypass_lets_torchvision_read_repacked_zips(tmp_path):
    from torchvision.datasets import Omniglot
    peer_root = l2l_peer.prepare_peer_root(make_fake_omniglot(tmp_path / "shared"), tmp_path / "peer")
    with pytest.raises(RuntimeError, match="not found or corrupted"):  # the md5 check refuses repacked zips
        Omniglot(str(peer_root), background=True, download=False)
    with l2l_peer.integrity_check_bypassed():
        dataset = Omniglot(str(peer_root), background=True, download=False)
    assert len(dataset) == 2 * 3 * 20
    image, label = dataset[25]
    assert image.size == (105, 105) and label == 1  # second character
    with pytest.raises(RuntimeError):  # the bypass ends with the block
        Omniglot(str(peer_root), background=True, download=False)


def test_split_support_query_takes_every_other_sample():
    # learn2learn returns a task's samples grouped by class, 2*shots per class: [a0 a1 b0 b1 c0 c1].
    data = torch.arange(6.0).view(6, 1, 1, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    support_x, support_y, query_x, query_y = l2l_peer.split_support_query(data, labels, shots=1, ways=3)
    assert support_x.flatten().tolist() == [0.0, 2.0, 4.0] and support_y.tolist() == [0, 1, 2]
    assert query_x.flatten().tolist() == [1.0, 3.0, 5.0] and query_y.tolist() == [0, 1, 2]


# ---- time to accuracy --------------------------------------------------------------------------------------------
def _curve():
    return [
        {"side": "runner", "iteration": 100, "train_seconds": 20.0, "val_accuracy": 0.90},
        {"side": "runner", "iteration": 200, "train_seconds": 41.0, "val_accuracy": 0.951},
        {"side": "runner", "iteration": 300, "train_seconds": 60.0, "val_accuracy": 0.94},
        {"side": "peer", "iteration": 100, "train_seconds": 70.0, "val_accuracy": 0.80},
        {"side": "peer", "iteration": 200, "train_seconds": 140.0, "val_accuracy": 0.93},
    ]


def test_first_crossing_is_the_earliest_row_at_or_above_the_target():
    rows = _curve()
    assert tta.first_crossing([r for r in rows if r["side"] == "runner"], 0.95)["iteration"] == 200
    assert tta.first_crossing([r for r in rows if r["side"] == "runner"], 0.90)["iteration"] == 100  # >= counts
    assert tta.first_crossing([r for r in rows if r["side"] == "peer"], 0.95) is None


def test_summary_and_ratio_line():
    summary = {row["side"]: row for row in tta.summarize(_curve(), ["runner", "peer"], 0.95)}
    assert summary["runner"]["reached"] and summary["runner"]["seconds_to_target"] == 41.0
    assert summary["runner"]["iteration_at_target"] == 200 and summary["runner"]["iterations_run"] == 300
    assert not summary["peer"]["reached"] and summary["peer"]["train_seconds"] == 140.0
    assert summary["peer"]["best_val_accuracy"] == pytest.approx(0.93)
    line = tta.speedup_line(list(summary.values()))
    assert line.startswith("TIME_TO_TARGET_RATIO > 3.41")  # 140 / 41: a lower bound, the peer is still short
    reached = tta.summarize(_curve() + [{"side": "peer", "iteration": 300, "train_seconds": 205.0,
                                         "val_accuracy": 0.96}], ["runner", "peer"], 0.95)
    assert tta.speedup_line(reached) == "TIME_TO_TARGET_RATIO 5.00"  # 205 / 41
    assert "n/a" in tta.speedup_line(tta.summarize(_curve(), ["runner", "peer"], 0.99))


def test_a_side_stops_at_target_budget_or_iterations():
    state = {"accuracy": 0.5, "seconds": 10.0, "iteration": 100}
    assert not tta.should_stop(state, 0.95, 100.0, 1000)
    assert tta.should_stop({**state, "accuracy": 0.95}, 0.95, 100.0, 1000)
    assert tta.should_stop({**state, "seconds": 100.0}, 0.95, 100.0, 1000)
    assert tta.should_stop({**state, "iteration": 1000}, 0.95, 100.0, 1000)


def test_curve_csv_has_the_rows_and_columns(tmp_path):
    tta.write_csv(tmp_path / "curve.csv", _curve(), tta.CURVE_COLUMNS)
    with open(tmp_path / "curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == tta.CURVE_COLUMNS and len(rows) == 5
    assert rows[1]["side"] == "runner" and float(rows[1]["val_accuracy"]) == 0.951
    assert not (tmp_path / "curve.csv.partial").exists()


# ---- gpu_check.sh --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_so(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PATH=os.environ.get("PATH", ""))
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    summary = (tmp_path / "gpu_check.md").read_text()
    assert result.returncode == 1
    assert "No CUDA device visible to torch: nothing measured" in summary
    assert "- Python:" in summary and "torch " in summary


def test_gpu_check_refuses_unknown_arguments(tmp_path):
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--fast"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("gpu_check.sh: unknown argument '--fast' (allowed: --dry-run, --budget "
                                     "SECONDS, --summary PATH, --out DIR, --stages A,B)")


@pytest.mark.slow
def test_gpu_check_stages_runs_only_the_named_stages(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path),
                             "--stages", "fixture,tf32"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    stages = [line.split("**")[1] for line in (tmp_path / "gpu_check.md").read_text().splitlines()
              if line.startswith("- **")]
    assert stages == ["fixture", "tf32"]


# ---- bench_formulations.py -----------------------------------------------------------------------------------------
def test_the_im2col_formulation_computes_the_grouped_convolution_and_its_second_order_gradient():
    """The ratio bench_formulations.py prints compares like with like: im2col + bmm is the same per-task stride-2
    convolution as the runner's grouped conv, values and the meta-gradient through an inner step (float64)."""
    formulations = _script("bench_formulations")
    tasks, cin = formulations.TASKS, 3
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, tasks * cin, 7, 7, generator=generator, dtype=torch.float64)
    grads = []
    for conv in (formulations.grouped_conv, formulations.unfold_bmm_conv):
        w = torch.randn(tasks, 5, cin, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64,
                        requires_grad=True)
        b = torch.zeros(tasks, 5, dtype=torch.float64, requires_grad=True)
        gw, gb = torch.autograd.grad((conv(x, w, b).tanh() ** 2).sum(), (w, b), create_graph=True)
        grads.append(torch.autograd.grad((conv(x, w - 0.1 * gw, b - 0.1 * gb) ** 2).sum(), w)[0])
    assert formulations.unfold_bmm_conv(x, w, b).shape == (4, tasks * 5, 4, 4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-10)


# ---- bench_vectorize.py --chunk-images ---------------------------------------------------------------------------
def test_chunk_sweep_times_each_chunk_size_and_restores_the_default(tmp_path, monkeypatch, capsys):
    """Each --chunk-images size is its own fast-path setting (same tasks, alternating), and the module's chunk size
    is the default again afterwards, so nothing else in the process runs at a swept size."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from maml_runner.algorithms import vectorized
    rule = ("CPU_IMAGES_PER_CHUNK", "CPU_SECOND_ORDER_IMAGES_PER_CHUNK", "CPU_FIRST_ORDER_CHUNK_FACTOR")
    default = [getattr(vectorized, name) for name in rule]
    seen = []
    original = vectorized.task_chunks
    monkeypatch.setattr(vectorized, "task_chunks", lambda tasks, second_order: seen.append(
        vectorized.images_per_chunk(second_order)) or original(tasks, second_order))
    bench = _script("bench_vectorize")
    assert bench.main(["--cases", "fomaml_5w1s", "--iterations", "1", "--meta-batch", "4", "--threads", "1",
                       "--chunk-images", "256", "20", "--root", str(tmp_path / "no_omniglot")]) == 0
    out = capsys.readouterr().out
    assert "chunk 256 images" in out and "chunk 20 images" in out
    assert 256 in seen and 20 in seen  # both sizes reached the fast path, exactly (first order: no factor)
    assert [getattr(vectorized, name) for name in rule] == default
    speedup = [line for line in out.splitlines() if line.startswith("SPEEDUP fomaml_5w1s ")]
    assert len(speedup) == 1 and float(speedup[0].split()[-1]) > 0
