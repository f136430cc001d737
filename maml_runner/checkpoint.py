"""Checkpoints: everything needed to continue a run exactly, written atomically, validated on load.

Resume (`train.resume`):
  * `true`: continue `<run dir>/checkpoints/last.pt` of this run's directory (`hydra.run.dir=<dir>`); if it has
    none, the newest sibling run (for the default layout: the newest run under `outputs/<name>/`) whose
    `last.pt` was written with the same config (ignoring `RESUME_IGNORED_KEYS`); if there is none either, the run
    starts from scratch with a warning (so a resumed sweep starts the jobs that never wrote a checkpoint).
  * a run directory or a `.pt` file: continue exactly that checkpoint (an error if it is missing); config
    differences are allowed (e.g. more `train.iterations`) and logged.
The resumed run keeps writing into the directory of the checkpoint it continues.

Loading never runs code from the file: checkpoints are read with `torch.load(weights_only=True)`, which only
rebuilds tensors and plain Python containers/numbers/strings. The globals a file's pickle names are listed
statically first, so a file that needs anything else is refused before a byte of it is unpickled. Version 1
files (the numpy RNG state pickled as a numpy array) are still read, allowing exactly the numpy globals they need.
"""
from __future__ import annotations

import io
import logging
import math
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .config import upgrade_saved
from .errors import CheckpointError, UserError
from .io import atomic_write

log = logging.getLogger(__name__)

FORMAT = "maml-runner-checkpoint"
VERSION = 2  # 2: the numpy RNG state as a tensor + numbers (version 1 pickled a numpy array)
LAST, BEST = "last.pt", "best.pt"
# Keys that may differ between a run and its resumption without changing a single number it computes.
# Keys that say how or where to run, not what the run is: train.max_minutes included, so a run stopped by its time
# budget continues under another budget (train.resume=true finds it) without a config-difference warning.
RESUME_IGNORED_KEYS = ("train.resume", "train.max_minutes", "hardware.threads", "dataset.root", "dataset.cache_dir",
                       "dataset.download")


def _numpy_state_to_plain(state: tuple) -> dict:
    """np.random.get_state() -> types torch.load(weights_only=True) reads: the MT19937 key as an int64 tensor."""
    name, key, pos, has_gauss, cached_gaussian = state
    return {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _numpy_state_from_plain(state: dict) -> tuple:
    key = np.asarray(state["key"].cpu().numpy(), dtype=np.uint32)
    return (state["bit_generator"], key, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state_to_plain(np.random.get_state()),
             "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # A checkpoint loaded with map_location=<cuda device> (Trainer.resume) holds these states as CUDA tensors; the
    # generators only take CPU byte tensors ("RNG state must be a torch.ByteTensor").
    random.setstate(state["python"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.random.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    payload = {"format": FORMAT, "version": VERSION, **payload}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _v1_numpy_globals() -> dict[str, tuple]:
    """What a version 1 checkpoint's `np.random.get_state()` array needs: name in the pickle -> (object, name).
    numpy 2 pickles `_reconstruct` from numpy._core, numpy 1 from numpy.core: the same function, both accepted."""
    reconstruct = np.ndarray((0,)).__reduce__()[0]
    names = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
             "numpy._core.multiarray._reconstruct": reconstruct, "numpy.core.multiarray._reconstruct": reconstruct}
    return {name: (obj, name) for name, obj in names.items()}


# `numpy.dtype("u4")` builds an instance of this class (numpy.dtypes.UInt32DType), which the unpickler then has to
# allow too; the static listing cannot see it. The MT19937 key is uint32, so no other dtype class is allowed.
_V1_KEY_DTYPE = type(np.dtype(np.uint32))


class _Foreign(Exception):
    """The file needs types a maml-runner checkpoint never holds (or is not a torch.save file at all)."""


def _safe_load(path: Path, map_location) -> dict:
    # torch.save writes zip files; a bare pickle (pickle.dump, torch's pre-1.6 format) was never a maml-runner
    # checkpoint, and one is not unpickled at all: say what it is without reading further.
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            if handle.read(1) == b"\x80":  # pickle protocol 2+ header
                raise _Foreign
        raise ValueError("neither a zip archive nor a pickle")
    # Static listing of the pickle's globals: nothing is executed. Anything beyond torch's weights-only set and
    # version 1's numpy array is refused here.
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    allowed = _v1_numpy_globals()
    if unsafe - set(allowed):
        raise _Foreign
    try:
        extra = [allowed[name] for name in sorted(unsafe)] + ([_V1_KEY_DTYPE] if "numpy.dtype" in unsafe else [])
        with torch.serialization.safe_globals(extra):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # a global the static listing could not see; the unpickler refused it
        raise _Foreign from None


def _upgrade(payload: dict) -> dict:
    """Version 1 -> 2: the numpy RNG state from the pickled array to a tensor + numbers."""
    rng = payload.get("rng")
    if isinstance(rng, dict) and isinstance(rng.get("numpy"), tuple):
        rng["numpy"] = _numpy_state_to_plain(rng["numpy"])
    return payload


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    foreign = CheckpointError(f"'{path}' is not a maml-runner checkpoint (expected format {FORMAT!r}); "
                              f"point train.resume at a run directory written by maml-run")
    try:
        payload = _safe_load(path, map_location)
    except _Foreign:
        raise foreign from None
    except Exception:  # truncated zip, pickle garbage, ... (the type varies with where the bytes stop)
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated; delete it, or resume from another "
                              f"checkpoint (train.resume=<run dir>/checkpoints/{BEST})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise foreign
    if payload.get("version", 0) > VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {payload['version']}, newer than this "
                              f"maml-runner reads ({VERSION}); upgrade maml-runner")
    return _upgrade(payload)


def load_algorithm(algorithm, path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint's meta-parameters (and the optimizer and schedule state saved with them) into `algorithm`.

    The one way to put a saved model back: training resume, the final test, eval.only re-tests, the ablation and
    the report's adaptation plot all call it.

    Arguments:
        algorithm: a `MetaAlgorithm` built from the same algorithm/model/dataset config as the checkpoint.
        path: a checkpoint file written by maml-run (read without running code: `load_checkpoint`).
        map_location: where the tensors go (the algorithm's device).
    Returns the whole checkpoint (iteration, metrics_rows, rng, config, ...), for callers that continue or report.
    Raises `CheckpointError`, one line, when the file is missing, foreign, corrupt or does not fit `algorithm`.
    """
    state = load_checkpoint(path, map_location=map_location)
    try:
        algorithm.load_checkpoint_state(state["algorithm"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        # torch's message starts "Error(s) in loading state_dict for X:"; the first line after it says what.
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise CheckpointError(f"checkpoint '{path}' does not fit this config (algorithm/model/dataset differ): "
                              f"{detail}") from None
    return state


def best_val_loss_on_disk(checkpoint_dir: Path) -> float:
    """The validation loss `best.pt` holds (inf if there is none or it cannot be read: it will be replaced)."""
    try:
        return float(load_checkpoint(Path(checkpoint_dir) / BEST)["best_val_loss"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return math.inf


# ---- resume ---------------------------------------------------------------------------------------------
def _flat(container, prefix="") -> dict:
    if not isinstance(container, dict):
        return {prefix[:-1]: container}
    flat = {}
    for key, value in container.items():
        flat.update(_flat(value, f"{prefix}{key}."))
    return flat


def config_differences(saved: dict, cfg: DictConfig) -> list[str]:
    """`key: saved -> current` for every config key that differs (ignoring `RESUME_IGNORED_KEYS`)."""
    old, new = _flat(upgrade_saved(saved)), _flat(OmegaConf.to_container(cfg, resolve=True))  # as saved today
    ignored = lambda key: any(key == k or key.startswith(k + ".") for k in RESUME_IGNORED_KEYS)  # noqa: E731
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if not ignored(key) and old.get(key) != new.get(key)]


def _resume_flag(value) -> bool | None:
    """True/False for boolean spellings of train.resume, None for a path."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if str(value).lower() in ("true", "false", "yes", "no", ""):
        return str(value).lower() in ("true", "yes")
    return None


def _same_config_checkpoint(run_dir: Path, cfg: DictConfig) -> Path | None:
    last = run_dir / "checkpoints" / LAST
    try:
        return last if last.is_file() and not config_differences(load_checkpoint(last)["config"], cfg) else None
    except (CheckpointError, KeyError):
        return None


def find_resume_checkpoint(cfg: DictConfig, run_dir: str | Path) -> Path | None:
    """The checkpoint `train.resume` asks to continue (see the module docstring), or None to start fresh."""
    run_dir = Path(run_dir)
    resume = cfg.train.get("resume", False)
    flag = _resume_flag(resume)
    if flag is False:
        return None
    if flag is None:  # an explicit run directory or checkpoint file
        source = Path(str(resume)).expanduser()
        last = source / "checkpoints" / LAST if source.is_dir() else source
        if not last.is_file():
            raise UserError(f"train.resume={resume}: no checkpoint at '{last}'; use train.resume=true or a run "
                            f"directory that has checkpoints/{LAST}")
        return last
    if (run_dir / "checkpoints" / LAST).is_file():
        return run_dir / "checkpoints" / LAST
    siblings = sorted((p for p in run_dir.parent.glob(f"*/checkpoints/{LAST}") if p.parent.parent != run_dir),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    for last in siblings:
        if _same_config_checkpoint(last.parent.parent, cfg):
            return last
    log.warning("train.resume=true: no checkpoints/%s in %s nor in a run with the same config under %s; "
                "starting from scratch", LAST, run_dir, run_dir.parent)
    return None


def checkpoint_run_dir(checkpoint: Path, default: Path) -> Path:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.pt`, or `<run>/checkpoints/top/x.pt`: kept
    for eval.checkpoint=ensemble), else `default`."""
    if checkpoint.parent.name == "top" and checkpoint.parent.parent.name == "checkpoints":
        return checkpoint.parent.parent.parent
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else Path(default)
