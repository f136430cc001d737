"""Local multi-GPU sweeps: job k gets cuda:(k mod visible devices), tested without a GPU (a faked device count);
hardware.tf32."""
from __future__ import annotations

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from conftest import compose_config
from maml_runner import hardware
from maml_runner.hardware import device_for_job, select_device


def test_jobs_go_round_robin_over_the_visible_devices():
    assert [device_for_job(k, 3) for k in range(7)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:0", "cuda:1", "cuda:2",
                                                        "cuda:0"]
    assert [device_for_job(k, 1) for k in range(3)] == ["cuda"] * 3  # one GPU: every job on it, as before
    assert device_for_job(None, 4) == "cuda"  # not a sweep job


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch reports `count` CUDA devices; set_device calls are recorded instead of made."""
    chosen = []

    def fake(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.append(str(device)))
        return chosen
    return fake


def set_hydra_job(monkeypatch, mode: RunMode, num: int) -> None:
    """What Hydra's launchers set in each job process before the task function runs."""
    cfg = OmegaConf.create({"hydra": {"mode": mode, "job": {"num": num}}})
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: True))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: cfg.hydra))


@pytest.mark.parametrize("preset", ["auto", "cuda"])
def test_a_sweep_job_on_auto_or_cuda_takes_its_round_robin_device(preset, fake_gpus, monkeypatch):
    chosen = fake_gpus(4)
    set_hydra_job(monkeypatch, RunMode.MULTIRUN, 6)
    device = select_device(compose_config([f"hardware={preset}"]).hardware)
    assert device == torch.device("cuda:2") and chosen == ["cuda:2"]


def test_an_explicit_index_and_a_single_run_are_left_alone(fake_gpus, monkeypatch):
    chosen = fake_gpus(4)
    set_hydra_job(monkeypatch, RunMode.MULTIRUN, 6)
    assert select_device(compose_config(["hardware=cuda", "hardware.device=cuda:3"]).hardware) == torch.device("cuda:3")
    set_hydra_job(monkeypatch, RunMode.RUN, 0)
    assert select_device(compose_config(["hardware=auto"]).hardware) == torch.device("cuda")
    assert chosen == []
    assert hardware.sweep_job_number() is None


def test_without_hydra_there_is_no_job_number(monkeypatch):
    monkeypatch.setattr(HydraConfig, "initialized", staticmethod(lambda: False))
    assert hardware.sweep_job_number() is None


@pytest.mark.parametrize("tf32", [True, False])
def test_hardware_tf32_sets_torchs_tensorfloat32_switches_both_ways(tf32):
    """hardware.tf32: torch's defaults (cuDNN convolutions in TF32) would silently change float32 meta-gradients on
    Ampere and later (by 70 % relative on MAML 20w1s on an H200, docs/benchmarks.md); configure sets both switches
    from the config, each way, whatever they were before."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not tf32
        hardware.configure(OmegaConf.create(dict(device="cpu", threads=None, deterministic=False, vectorize="auto",
                                        compile=False, tf32=tf32)), seed=0)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (tf32, tf32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_the_default_config_keeps_float32_convolutions():
    for preset in ("auto", "cpu", "cuda"):
        assert compose_config([f"hardware={preset}"]).hardware.tf32 is False
