"""lifecycle.py on its own: real signals, the resume state round trip through a checkpoint file, the NaN policy."""
from __future__ import annotations

import math
import os
import random
import signal
import threading

import pytest
import torch

from maml_runner.checkpoint import load_checkpoint, rng_state, save_checkpoint
from maml_runner.errors import CheckpointError, UserError
from maml_runner.lifecycle import (MAX_CONSECUTIVE_SKIPS, NanPolicy, StopSignals, TrainingState, last_good_checkpoint,
                                   restore)


def test_a_real_sigterm_asks_to_stop_and_a_second_one_stops_at_once(caplog):
    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals()
    with signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    assert "received SIGTERM: stopping after this iteration and saving last.pt" in caplog.text
    stop = signals.stop_requested(6, 12, "run/checkpoints/last.pt", "run")
    assert str(stop) == "stopped by SIGTERM at iteration 6/12; saved run/checkpoints/last.pt" and stop.signum == 15


def test_outside_the_main_thread_the_handlers_stay():
    before, seen = signal.getsignal(signal.SIGINT), []

    def enter():
        with StopSignals():
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=enter)
    worker.start()
    worker.join()
    assert seen == [before]


def test_training_state_and_rng_come_back_from_a_checkpoint_file(tmp_path):
    state = TrainingState(iteration=7, best_val_loss=0.25, metrics_rows=[{"iteration": 5, "val_loss": 0.25}],
                          running={"loss": 1.5, "acc": 0.0, "grad_norm": 2.0, "n": 2}, consecutive_skips=1,
                          train_seconds=3.5, wall_seconds=4.0)
    random.seed(3)
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {**state.payload(), "rng": rng_state()})
    expected = (random.random(), torch.rand(2))
    random.seed(99)
    torch.manual_seed(99)
    back = restore(load_checkpoint(tmp_path / "checkpoints" / "last.pt"), tmp_path / "last.pt", {},
                   tmp_path / "checkpoints")
    assert back == state  # best.pt is absent: the checkpoint's best loss stands
    again = (random.random(), torch.rand(2))
    assert expected[0] == again[0] and torch.equal(expected[1], again[1])


def test_a_checkpoint_without_resume_state_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match=r"^checkpoint 'x.pt' lacks resume state \(KeyError: 'train_seconds'\); "
                                              r"resume from a last.pt written by maml-run$"):
        restore({"iteration": 3}, "x.pt", {}, tmp_path)


def test_end_interval_averages_the_finite_steps_and_restarts_the_sums():
    class Validation:
        loss, accuracy = (0.5, 0.1), (math.nan, math.nan)

    state = TrainingState(iteration=10, train_seconds=1.23456)
    state.add_step({"loss": 1.0, "acc": 0.0, "grad_norm": 4.0})
    state.add_step({"loss": 2.0, "acc": 0.0, "grad_norm": 2.0})
    row = state.end_interval(Validation())
    assert row["train_loss"] == 1.5 and row["grad_norm"] == 3.0 and row["elapsed_seconds"] == 1.235
    assert state.metrics_rows == [row] and state.running["n"] == 0
    assert math.isnan(state.end_interval(Validation())["train_loss"])  # an interval of skipped batches only


def test_nan_policy_stop_names_the_last_good_checkpoint_and_skip_gives_up_in_the_end(tmp_path, caplog):
    rows = [{"iteration": 10, "val_loss": 0.5}, {"iteration": 20, "val_loss": math.nan}]
    good = last_good_checkpoint(rows, 20, tmp_path)
    assert good == f"last good checkpoint: {tmp_path / 'best.pt'} (iteration 10, val loss 0.5)"
    assert last_good_checkpoint(rows[:1], 10, tmp_path).startswith(f"last good checkpoint: {tmp_path / 'last.pt'}")
    stats, state = {"loss": math.nan, "grad_norm": math.inf}, TrainingState(iteration=21)
    with pytest.raises(UserError, match=r"^non-finite training loss \(nan\) or gradient norm \(inf\) at iteration 21; "
                                        r"last good checkpoint: .*; lower algorithm.outer_lr/inner_lr or set "
                                        r"train.grad_clip \(or train.nan_policy=skip to skip such batches\)$"):
        NanPolicy("stop").non_finite(stats, state, good)
    skip = NanPolicy("skip")
    for _ in range(MAX_CONSECUTIVE_SKIPS - 1):
        skip.non_finite(stats, state, good)
    assert state.consecutive_skips == MAX_CONSECUTIVE_SKIPS - 1 and "skipped batch: non-finite" in caplog.text
    with pytest.raises(UserError, match=rf"^{MAX_CONSECUTIVE_SKIPS} non-finite batches in a row"):
        skip.non_finite(stats, state, good)
