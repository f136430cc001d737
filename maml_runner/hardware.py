"""Device choice, threads, seeding and determinism; the peak-memory probe results.csv reports."""
from __future__ import annotations

import os
import random
import resource

import numpy as np
import torch

from . import norm_derivatives
from .errors import UserError
from .models import has_transductive_batch_norm

DEVICES = ("auto", "cpu", "cuda")


def select_device(hardware_cfg) -> torch.device:
    requested = str(hardware_cfg.device)
    if requested not in DEVICES and not requested.startswith("cuda:"):
        raise UserError(f"hardware.device={requested!r} is invalid: expected one of {', '.join(DEVICES)}, cuda:<index>")
    if requested in ("auto", "cuda") and torch.cuda.is_available():  # no index given: spread a sweep's jobs
        device = torch.device(device_for_job(sweep_job_number(), torch.cuda.device_count()))
        if device.index is not None:  # also for code that allocates on the bare "cuda" device
            torch.cuda.set_device(device)
        return device
    if requested == "auto":
        return torch.device("cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"hardware.device={requested} was requested but no CUDA device is available; "
                        f"use hardware=cpu or hardware=auto")
    try:
        device = torch.device(requested)
    except RuntimeError:  # "cuda:x"
        raise UserError(f"hardware.device={requested!r} is invalid: expected cuda or cuda:<index>") from None
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"hardware.device={requested}: there are only {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    return device


# ---- multi-GPU sweeps: one device per job, round robin (issue 18) ------------------------------------------------
def device_for_job(job_number: int | None, device_count: int) -> str:
    """The CUDA device of a sweep job: job k of a `maml-run -m` sweep gets cuda:(k mod device_count), so the jobs a
    joblib or submitit_local launcher runs at the same time spread over the visible GPUs instead of all landing on
    cuda:0. Outside a sweep (job_number None) or with one visible device: "cuda" (the current device, cuda:0).

    Arguments: job_number: Hydra's hydra.job.num, or None; device_count: torch.cuda.device_count() (>= 1).
    Returns a torch device string."""
    if job_number is None or device_count <= 1:
        return "cuda"
    return f"cuda:{int(job_number) % int(device_count)}"


def sweep_job_number() -> int | None:
    """hydra.job.num of the running multirun job; None in a single run or outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        if not HydraConfig.initialized():
            return None
        hydra_cfg = HydraConfig.get()
        if str(hydra_cfg.mode) != "RunMode.MULTIRUN":
            return None
        return int(hydra_cfg.job.num)
    except Exception:  # hydra.job.num unset (a config composed by hand): no sweep to spread
        return None
# ---- end of multi-GPU sweeps --------------------------------------------------------------------------------------


def configure(hardware_cfg, seed: int) -> torch.device:
    device = select_device(hardware_cfg)
    threads = hardware_cfg.get("threads")
    if threads:
        torch.set_num_threads(int(threads))
    if hardware_cfg.get("deterministic", False):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    set_tf32(bool(hardware_cfg.get("tf32", False)))
    seed_everything(seed)
    return device


def set_tf32(enabled: bool) -> None:
    """hardware.tf32. On Ampere and later GPUs torch runs float32 convolutions in TensorFloat-32 by default (10-bit
    mantissa); the papers' code ran full float32 (pre-Ampere GPUs). Measured on an H200 (docs/benchmarks.md): TF32
    moves the MAML meta-gradient by 15 % (5w1s) and 70 % (20w1s, relative) for 0.95-1.20x the speed. Off by default:
    full float32 convolutions and matrix products; true trades that for speed. No effect on CPU."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- peak memory ------------------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start this run's peak-memory count (sweep jobs share one process: the process-wide peak would carry over)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:  # Linux: "5" resets the resident-set high-water mark VmHWM
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak since `reset_peak_memory`: max allocated on CUDA, resident set size (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB; process-wide peak


# ---- hardware.compile ---------------------------------------------------------------------------------------------
def compile_fast_path(algorithm) -> None:
    """hardware.compile=true. First-order algorithms (fomaml, reptile, pretrain, `algorithm.first_order=true`):
    `torch.compile` the model's task-grouped forward, which the fast path (algorithms/vectorized.py) runs for every
    inner step and query of a meta-batch; the per-task loop, evaluation and ANIL's body/head split run uncompiled.
    Second-order algorithms, which torch.compile cannot differentiate: compile batch norm's double backward
    (norm_derivatives.compile_kernels), a kernel of the outer backward that is never differentiated itself; that
    kernel runs on CPU only, in models with transductive batch norm. The first meta-batch of each shape pays the
    compilation (seconds to about a minute on the development CPU). Float64 meta-gradients equal the uncompiled ones
    to rounding (tests/test_fast_path.py, tests/test_norm_derivatives.py)."""
    model = algorithm.model
    device = next(model.parameters()).device
    _check_cpu_compiler(device)
    if algorithm.needs_double_backward():
        _compile_second_order(algorithm, device)
        return
    if not hasattr(model, "grouped_forward"):
        raise UserError(f"hardware.compile=true compiles the task-grouped forward, which {type(model).__name__} "
                        f"does not have; use hardware.compile=false")
    norm_derivatives.raise_recompile_limit()
    # An instance attribute: the fast path looks grouped_forward up on the model at each call; state_dict (and so
    # checkpoints) are unchanged.
    model.grouped_forward = torch.compile(model.grouped_forward, dynamic=False)


def _check_cpu_compiler(device: torch.device) -> None:
    """On CPU torch.compile builds C++ kernels on first use: without a compiler that would fail mid-training."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile report it
        return
    try:
        get_cpp_compiler()
    except Exception as exc:  # torch's InvalidCxxCompiler
        raise UserError(f"hardware.compile=true needs a C++ compiler on CPU ({str(exc).splitlines()[0]}; set CXX or "
                        f"install g++); use hardware.compile=false") from None


def _compile_second_order(algorithm, device: torch.device) -> None:
    model = algorithm.model
    if device.type != "cpu":
        raise UserError(f"hardware.compile=true with a second-order algorithm (algorithm={algorithm.name}) compiles "
                        f"batch norm's CPU double backward, which {device.type} does not run; use "
                        f"hardware.compile=false")
    if not has_transductive_batch_norm(model):
        raise UserError(f"hardware.compile=true with a second-order algorithm (algorithm={algorithm.name}) compiles "
                        f"transductive batch norm's double backward, which {type(model).__name__} does not have "
                        f"(model.bn=transductive); use hardware.compile=false")
    norm_derivatives.compile_kernels(True)
