"""Checkpoints and result files: written atomically, and a truncated, foreign or mismatched checkpoint is one clear
line naming the file, never a reason to overwrite best.pt with something worse."""
from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import stat

import numpy as np
import pytest
import torch

from conftest import compose_config, run_cli
from maml_runner.checkpoint import FORMAT, VERSION, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from maml_runner.errors import CheckpointError
from maml_runner.io import atomic_write, read_csv, write_csv
from maml_runner.train import build, run
from test_bad_input import assert_one_line_error

TINY = ["train.iterations=20", "train.val_interval=10", "train.val_tasks=4", "train.meta_batch_size=2",
        "eval.num_tasks=4", "hardware=cpu", "hardware.threads=1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished")
    run(compose_config(TINY), run_dir)
    return run_dir


@pytest.fixture
def copy_of(finished, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(finished, target)
    return target


# ---- atomic writes -------------------------------------------------------------------------------------
def test_a_write_that_dies_half_way_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "results.csv"
    write_csv(path, [{"a": 1}])

    def dies_half_way(handle):
        handle.write(b"a\n2")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_half_way)
    assert read_csv(path) == [{"a": "1"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    umask = os.umask(0o022)
    try:
        write_csv(tmp_path / "metrics.csv", [{"a": 1}])
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "metrics.csv").stat().st_mode) == 0o644


def test_typed_csv_round_trip(tmp_path):
    row = {"i": 3, "x": 0.1, "nan": float("nan"), "flag": False, "none": None, "name": "maml"}
    write_csv(tmp_path / "r.csv", [row])
    back = read_csv(tmp_path / "r.csv", typed=True)[0]
    assert back["i"] == 3 and back["x"] == 0.1 and back["nan"] != back["nan"]
    assert back["flag"] is False and back["none"] is None and back["name"] == "maml"


# ---- bad checkpoints -----------------------------------------------------------------------------------
def test_truncated_last_checkpoint_is_one_line_naming_it_and_best_is_untouched(copy_of):
    last, best = copy_of / "checkpoints/last.pt", copy_of / "checkpoints/best.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    best_bytes = best.read_bytes()
    (copy_of / "results.csv").unlink()
    result = run_cli(*TINY, f"hydra.run.dir={copy_of}", "train.resume=true")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"maml-run: error: checkpoint '{last}' is corrupt or truncated; delete it, or "
                                     f"resume from another checkpoint (train.resume=<run dir>/checkpoints/best.pt)")
    assert best.read_bytes() == best_bytes and not (copy_of / "results.csv").exists()


def test_foreign_checkpoint_is_named(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"'{tmp_path / 'model.pt'}' is not a maml-runner checkpoint")):
        load_checkpoint(tmp_path / "model.pt")
    (tmp_path / "notes.pt").write_text("not even a zip")
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint '{tmp_path / 'notes.pt'}' is corrupt or trunc")):
        load_checkpoint(tmp_path / "notes.pt")


def test_checkpoint_from_a_newer_format_is_refused(tmp_path):
    save_checkpoint(tmp_path / "x.pt", {})
    payload = torch.load(tmp_path / "x.pt", weights_only=True)
    payload["version"] = VERSION + 1
    torch.save(payload, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=rf"has format version {VERSION + 1}, newer than"):
        load_checkpoint(tmp_path / "x.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_state_from_a_checkpoint_loaded_onto_cuda_is_restored(tmp_path):
    """Trainer.resume loads checkpoints with map_location=<device>: on CUDA the saved RNG states arrive as CUDA
    tensors, which the generators refuse unless they go back to the CPU (resume on CUDA failed on this)."""
    import random
    torch.cuda.init()
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    draws = lambda: (random.random(), torch.rand(3), torch.rand(3, device="cuda").cpu())  # noqa: E731
    expected = draws()
    set_rng_state(load_checkpoint(tmp_path / "c.pt", map_location="cuda")["rng"])
    again = draws()
    assert expected[0] == again[0] and torch.equal(expected[1], again[1]) and torch.equal(expected[2], again[2])


def test_checkpoint_of_another_model_does_not_fit(finished, tmp_path):
    """A shape mismatch deep inside torch's load_state_dict becomes one line naming the file."""
    cfg = compose_config([*TINY, "model.hidden=[20,20]", f"train.resume={finished}"])
    with pytest.raises(CheckpointError) as raised:
        run(cfg, tmp_path / "other")
    message = str(raised.value)
    assert message.startswith(f"checkpoint '{finished / 'checkpoints/last.pt'}' does not fit this config "
                              f"(algorithm/model/dataset differ): size mismatch for model.body.0.weight: copying "
                              f"a param with shape torch.Size([40, 1]) from checkpoint, the shape in current model "
                              f"is torch.Size([20, 1])")
    assert "\n" not in message


def test_a_better_best_on_disk_is_never_replaced_by_a_worse_one(copy_of):
    """A kill between writing best.pt and last.pt leaves best.pt ahead of what last.pt knows."""
    best = copy_of / "checkpoints/best.pt"
    state = load_checkpoint(best)
    state["best_val_loss"] = 1e-9  # better than anything the resumed run will reach
    save_checkpoint(best, {k: v for k, v in state.items() if k not in ("format", "version")})
    best_bytes = best.read_bytes()
    run(compose_config([*TINY, "train.iterations=40", "train.resume=true"]), copy_of)
    assert [r["iteration"] for r in read_csv(copy_of / "metrics.csv", typed=True)] == [10, 20, 30, 40]
    assert best.read_bytes() == best_bytes
    assert load_checkpoint(copy_of / "checkpoints/last.pt")["best_val_loss"] == pytest.approx(1e-9)


def test_test_phase_with_a_missing_best_falls_back_to_last(copy_of):
    (copy_of / "checkpoints/best.pt").unlink()
    trainer = build(compose_config(TINY), copy_of)
    row = trainer.test()
    assert row["checkpoint"] == "last"


# ---- loading never runs code from the file -------------------------------------------------------------
class RunsCode:
    """Unpickling this calls open(marker, "w"): stands in for whatever code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def write_crafted(path, marker, kind="torch"):
    """A file that claims to be a maml-runner checkpoint and creates `marker` when unpickled."""
    payload = {"format": FORMAT, "version": 1, "iteration": 0, "payload": RunsCode(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    return path


def not_a_checkpoint(path) -> str:
    return re.escape(f"'{path}' is not a maml-runner checkpoint (expected format '{FORMAT}'); point train.resume "
                     f"at a run directory written by maml-run")


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_the_crafted_files_do_run_code_when_unpickled_the_unsafe_way(kind, tmp_path):
    """The exploit the tests below guard against is real (this is what weights_only=False did)."""
    path = write_crafted(tmp_path / "x.pt", tmp_path / "marker", kind)
    if kind == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)
    assert (tmp_path / "marker").exists()


@pytest.mark.parametrize("kind", ["torch", "pickle", "torch-legacy"])
def test_loading_a_crafted_checkpoint_is_refused_and_runs_nothing(kind, tmp_path):
    path, marker = tmp_path / "x.pt", tmp_path / "marker"
    if kind == "torch-legacy":  # torch's pre-1.6 format: a bare pickle stream, like pickle.dump
        torch.save({"format": FORMAT, "payload": RunsCode(marker)}, path, _use_new_zipfile_serialization=False)
    else:
        write_crafted(path, marker, kind)
    with pytest.raises(CheckpointError, match=not_a_checkpoint(path)):
        load_checkpoint(path)
    assert not marker.exists()


def crafted_run(tmp_path, marker, kind="torch", results=False):
    """A run directory whose checkpoints/last.pt is crafted (and results.csv present, if asked)."""
    run_dir = tmp_path / "crafted"
    write_crafted(run_dir / "checkpoints/last.pt", marker, kind)
    if results:
        write_csv(run_dir / "results.csv", [{"mean": 0.0}])
    return run_dir


QUICK = [*TINY, "report.enabled=false"]


@pytest.mark.parametrize("case", ["resume-file-torch", "resume-file-pickle", "resume-dir", "resume-true-run-dir",
                                  "finished-check", "ablation-from-runs"])
def test_crafted_checkpoint_through_the_cli_is_one_line_and_runs_nothing(case, tmp_path):
    marker = tmp_path / "marker"
    kind = "pickle" if case == "resume-file-pickle" else "torch"
    run_dir = crafted_run(tmp_path, marker, kind, results=case == "finished-check")
    last = run_dir / "checkpoints/last.pt"
    fresh = f"hydra.run.dir={tmp_path / 'fresh'}"
    overrides, named = {
        "resume-file-torch": ([f"train.resume={last}", fresh], last),
        "resume-file-pickle": ([f"train.resume={last}", fresh], last),
        "resume-dir": ([f"train.resume={run_dir}", fresh], last),
        "resume-true-run-dir": (["train.resume=true", f"hydra.run.dir={run_dir}"], last),
        "finished-check": ([f"train.resume={run_dir}", fresh], last),  # results.csv there: the finished check reads
        "ablation-from-runs": (["ablation.enabled=true", f"ablation.from_runs=['{run_dir}']",
                                "ablation.train_steps=[]", "ablation.eval_steps=[1]", fresh], last),
    }[case]
    if case == "ablation-from-runs":  # eval.checkpoint=best: from_runs reads best.pt
        named = write_crafted(run_dir / "checkpoints/best.pt", marker)
    result = run_cli(*QUICK, *overrides)
    assert_one_line_error(result, not_a_checkpoint(named))
    assert not marker.exists()


def test_a_crafted_sibling_is_skipped_by_resume_true_and_runs_nothing(tmp_path):
    """train.resume=true scans sibling runs for a last.pt with the same config: a crafted one is passed over."""
    marker = tmp_path / "marker"
    sibling = write_crafted(tmp_path / "outputs/2024-01-01_00-00-00/checkpoints/last.pt", marker)
    fresh = tmp_path / "outputs/2024-01-02_00-00-00"
    row = run(compose_config([*TINY, "train.resume=true"]), fresh)
    assert not marker.exists()
    assert row["iterations_done"] == 20 and (fresh / "results.csv").is_file()  # started from scratch
    assert not (sibling.parent.parent / "results.csv").exists()


def test_a_crafted_best_on_disk_is_not_unpickled_when_resuming(copy_of, tmp_path):
    """Resuming compares last.pt's best loss with best.pt's (best_val_loss_on_disk): a crafted best.pt is unreadable,
    nothing in it runs, and it is replaced by the run's own best."""
    marker = tmp_path / "marker"
    write_crafted(copy_of / "checkpoints/best.pt", marker)
    run(compose_config([*TINY, "train.iterations=40", "train.resume=true"]), copy_of)
    assert not marker.exists()
    assert load_checkpoint(copy_of / "checkpoints/best.pt")["format"] == FORMAT


# ---- version 1 checkpoints (numpy RNG state pickled as an array) still load -----------------------------
def save_v1(path, payload: dict) -> None:
    """What maml-runner wrote before version 2: torch.save with rng.numpy = np.random.get_state() (an ndarray)."""
    payload = {**payload, "format": FORMAT, "version": 1}
    payload["rng"] = {**payload["rng"], "numpy": np.random.get_state()}
    torch.save(payload, path)


def test_version_1_rng_state_loads_with_weights_only_and_restores_numpy_exactly(tmp_path):
    np.random.seed(3)
    np.random.standard_normal(7)  # a cached gaussian and a position inside the key: every field matters
    expected = np.random.get_state()
    save_v1(tmp_path / "v1.pt", {"rng": {"python": random.getstate(), "torch": torch.random.get_rng_state()}})
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(tmp_path / "v1.pt")) >= {"numpy.ndarray"}
    draws = np.random.standard_normal(5)
    np.random.seed(99)
    state = load_checkpoint(tmp_path / "v1.pt")
    set_rng_state(state["rng"])
    got = np.random.get_state()
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]
    assert np.array_equal(np.random.standard_normal(5), draws)


def test_version_1_checkpoint_resumes_like_the_version_2_one(finished, tmp_path):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    shutil.copytree(finished, v2)
    shutil.copytree(finished, v1)
    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(v1 / "checkpoints" / name)
        save_v1(v1 / "checkpoints" / name, {k: v for k, v in state.items() if k not in ("format", "version")})
        assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(v1 / "checkpoints" / name)
    rows = [run(compose_config([*TINY, "train.iterations=40", f"train.resume={d}"]), tmp_path / "unused")
            for d in (v2, v1)]
    assert rows[1]["iterations_done"] == 40
    assert (rows[1]["mean"], rows[1]["ci95"], rows[1]["test_loss"]) == (rows[0]["mean"], rows[0]["ci95"],
                                                                      rows[0]["test_loss"])
    assert load_checkpoint(v1 / "checkpoints/last.pt")["version"] == VERSION  # rewritten in the new format
    assert "numpy.ndarray" not in torch.serialization.get_unsafe_globals_in_checkpoint(v1 / "checkpoints/last.pt")
