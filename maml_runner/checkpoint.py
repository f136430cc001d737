"""Checkpoints: everything needed to continue a run exactly, written atomically, validated on load."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError
from .io import atomic_write

FORMAT = "maml-runner-checkpoint"
VERSION = 1


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    payload = {"format": FORMAT, "version": VERSION, **payload}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(exc).__name__}); "
                              f"delete it or resume from another run") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a maml-runner checkpoint (expected format {FORMAT!r})")
    return payload
