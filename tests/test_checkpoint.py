"""Checkpoints and result files: written atomically, and a truncated, foreign or mismatched checkpoint is one clear
line naming the file, never a reason to overwrite best.pt with something worse."""
from __future__ import annotations

import os
import re
import shutil
import stat

import pytest
import torch

from conftest import compose_config, run_cli
from maml_runner.checkpoint import VERSION, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from maml_runner.errors import CheckpointError
from maml_runner.io import atomic_write, read_csv, write_csv
from maml_runner.train import build, run

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
    payload = torch.load(tmp_path / "x.pt", weights_only=False)
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
