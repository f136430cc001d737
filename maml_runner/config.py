"""Checks on the composed config: one clear line per bad key, before any work starts."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

POSITIVE_INTS = ["train.iterations", "train.meta_batch_size", "train.val_interval", "train.val_tasks",
                 "eval.num_tasks", "eval.meta_batch_size", "dataset.shots", "dataset.query_shots", "dataset.ways"]
NON_NEGATIVE_INTS = ["algorithm.inner_steps", "eval.inner_steps"]
POSITIVE_FLOATS = ["algorithm.inner_lr", "algorithm.outer_lr"]
CHOICES = {"train.nan_policy": ("stop", "skip"), "eval.checkpoint": ("best", "last"),
           "hardware.vectorize": ("auto", "on", "off")}


def _get(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, default=None)


def _as_number(cfg, key, kind):
    value = _get(cfg, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{key}={value!r} is not a number; expected {'an integer' if kind is int else 'a number'}") from None
    if kind is int and float(value) != int(value):
        raise UserError(f"{key}={value!r} must be an integer")
    return kind(value)


def validate(cfg: DictConfig) -> None:
    for key in POSITIVE_INTS:
        value = _as_number(cfg, key, int)
        if value is not None and value <= 0:
            raise UserError(f"{key}={value} must be a positive integer")
    for key in NON_NEGATIVE_INTS:
        value = _as_number(cfg, key, int)
        if value is not None and value < 0:
            raise UserError(f"{key}={value} must be an integer >= 0")
    for key in POSITIVE_FLOATS:
        value = _as_number(cfg, key, float)
        if value is not None and not value > 0:
            raise UserError(f"{key}={value} must be a positive number")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and str(value) not in allowed:
            raise UserError(f"{key}={value!r} is not allowed; use one of {', '.join(allowed)}")
    if not isinstance(_get(cfg, "algorithm.first_order"), (bool, type(None))):
        raise UserError(f"algorithm.first_order={_get(cfg, 'algorithm.first_order')!r} must be true or false")
    clip = _get(cfg, "train.grad_clip")
    if clip is not None and _as_number(cfg, "train.grad_clip", float) <= 0:
        raise UserError(f"train.grad_clip={clip} must be a positive number or null")


def flat_config(cfg: DictConfig, keys) -> dict:
    """Selected config keys as a flat dict (for CSV rows)."""
    return {key: _get(cfg, key) for key in keys}


RESULT_KEYS = ["algorithm.name", "dataset.name", "model.name", "dataset.ways", "dataset.shots", "dataset.query_shots",
               "algorithm.inner_steps", "algorithm.inner_lr", "algorithm.outer_lr", "algorithm.first_order",
               "train.meta_batch_size", "train.iterations", "eval.inner_steps", "seed"]
