"""The end-of-run TensorBoard summary: the HParams session (config values + final metrics), the final/* and
validation-CI scalars and the run's figures as images, read back from the event files as TensorBoard reads them."""
from __future__ import annotations

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from conftest import run_cli
from maml_runner.io import read_csv


def load_events(run_dir):
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def hparams_data(accumulator) -> dict:
    """tag -> HParamsPluginData (experiment, session start/end) as the HParams plugin reads it."""
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
            for tag, content in accumulator.PluginTagToContent("hparams").items()}


def hparam_value(value):
    kind = value.WhichOneof("kind")
    return getattr(value, kind)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    result = run_cli("train.iterations=20", "train.val_interval=10", "train.val_tasks=4", "train.meta_batch_size=4",
                     "eval.num_tasks=8", "hardware=cpu", "hardware.threads=1", "algorithm.inner_lr=0.02",
                     "report.adaptation_tasks=2", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_hparams_session_holds_the_config_and_the_final_metrics(cli_run):
    data = hparams_data(load_events(cli_run))
    experiment = data["_hparams_/experiment"].experiment
    start = data["_hparams_/session_start_info"].session_start_info
    assert data["_hparams_/session_end_info"].session_end_info.status == 1  # STATUS_SUCCESS
    hparams = {name: hparam_value(value) for name, value in start.hparams.items()}
    assert hparams["algorithm.inner_lr"] == pytest.approx(0.02) and hparams["algorithm.name"] == "maml"
    assert hparams["train.iterations"] == 20 and hparams["dataset.name"] == "sinusoid"
    assert "hardware" not in hparams and "hydra.run.dir" not in hparams  # where/how, not what was trained
    metric_tags = {info.name.tag for info in experiment.metric_infos}
    assert metric_tags == {"final/test_mse", "final/test_mse_ci95", "final/test_loss", "final/best_val_loss"}


def test_final_scalars_are_the_results_row_and_validation_cis_the_metrics_rows(cli_run):
    events = load_events(cli_run)
    row = read_csv(cli_run / "results.csv", typed=True)[0]
    final = {tag: events.Scalars(tag) for tag in ("final/test_mse", "final/best_val_loss", "final/test_mse_ci95")}
    assert [e.step for e in final["final/test_mse"]] == [20]
    assert final["final/test_mse"][0].value == pytest.approx(row["mean"], rel=1e-6)
    assert final["final/test_mse_ci95"][0].value == pytest.approx(row["ci95"], rel=1e-6)
    assert final["final/best_val_loss"][0].value == pytest.approx(row["best_val_loss"], rel=1e-6)
    metrics = read_csv(cli_run / "metrics.csv", typed=True)
    cis = events.Scalars("val/loss_ci95")
    assert [e.step for e in cis] == [m["iteration"] for m in metrics] == [10, 20]
    assert [e.value for e in cis] == pytest.approx([m["val_loss_ci95"] for m in metrics], rel=1e-6)
    assert "val/accuracy_ci95" not in events.Tags()["scalars"]  # regression: no accuracy (nan) is written
    assert events.Scalars("val/loss")  # the training loop's own scalars are still there


def test_the_run_figures_are_images(cli_run):
    from PIL import Image

    events = load_events(cli_run)
    assert set(events.Tags()["images"]) == {"figures/curves", "figures/adaptation"}
    for tag, file in (("figures/curves", "curves.png"), ("figures/adaptation", "adaptation.png")):
        (image,) = events.Images(tag)
        with Image.open(cli_run / file) as png:
            assert (image.width, image.height) == png.size and image.step == 20


def test_final_metrics_skip_non_finite_values():
    from maml_runner.tensorboard_summary import final_metrics

    row = {"metric": "accuracy", "mean": 0.9, "ci95": 0.01, "test_loss": 0.3, "best_val_loss": math.nan,
           "best_val_accuracy": None}
    assert final_metrics(row) == {"final/test_accuracy": 0.9, "final/test_accuracy_ci95": 0.01,
                                  "final/test_loss": 0.3}
