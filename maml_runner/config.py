"""Checks on the composed config: one clear line per bad key, before any work starts."""
from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf

from .errors import UserError

_UNSET = object()

# Allowed values of the switches that reproduce the papers' released code (docs/protocols.md); the modules that
# implement them import these.
LOSS_REDUCTIONS = ("mean", "sum_over_shots")   # algorithm.loss_reduction
RESIZE_MODES = ("lanczos", "binary_nearest")   # dataset.image_resize
PADDINGS = ("symmetric", "tf_same")            # model.padding
POOLINGS = ("stride", "max")                   # model.pooling
INITS = ("pytorch", "xavier")                  # model.init
HEAD_INITS = ("same", "normal")                # model.head_init
ACTIVATIONS = ("relu", "leaky_relu")           # model.activation

# key -> what is allowed. Keys absent from the composed config (e.g. an algorithm without inner_lr) are not checked;
# keys present must hold a valid value (null included only where the description allows it).
POSITIVE_INTS = ["train.iterations", "train.meta_batch_size", "train.val_interval", "train.val_tasks",
                 "train.log_interval", "eval.num_tasks", "eval.meta_batch_size", "algorithm.inner_steps",
                 "eval.inner_steps", "dataset.shots", "dataset.query_shots", "dataset.ways"]
NON_NEGATIVE_INTS = ["seed", "eval.seed"]
POSITIVE_FLOATS = ["algorithm.inner_lr", "algorithm.outer_lr", "algorithm.meta_step_size", "algorithm.min_outer_lr",
                   "model.bn_eps"]
FRACTIONS = ["algorithm.msl_fraction", "algorithm.first_order_fraction"]
OPTIONAL_POSITIVE_INTS = ["hardware.threads", "algorithm.bn_steps", "dataset.eval_query_shots",
                          "algorithm.inner_batch_size", "algorithm.eval_inner_batch_size"]
OPTIONAL_POSITIVE_FLOATS = ["train.grad_clip", "algorithm.eval_inner_lr", "train.max_minutes",
                            "algorithm.rate_outer_lr"]
BOOLS = ["algorithm.first_order", "hardware.deterministic", "algorithm.multi_step_loss",
         "algorithm.derivative_order_annealing", "algorithm.learned_step_rates", "algorithm.per_step_bn",
         "algorithm.cosine_annealing", "model.bn_scale", "model.bn_adapted"]
CHOICES = {"train.nan_policy": ("stop", "skip"), "eval.checkpoint": ("best", "last"),
           "hardware.vectorize": ("auto", "on", "off"), "algorithm.inner_optimizer": ("sgd", "adam"),
           "algorithm.loss_reduction": LOSS_REDUCTIONS, "model.padding": PADDINGS, "model.pooling": POOLINGS,
           "model.init": INITS, "model.head_init": HEAD_INITS, "model.activation": ACTIVATIONS,
           "dataset.image_resize": RESIZE_MODES,
           "algorithm.inner_optimizer_state": ("fresh", "persistent"), "algorithm.eval_optimizer": ("sgd", "inner")}


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _shown(value) -> str:
    """A value as it would be typed on the command line (strings quoted so that '' and ' 5' are visible)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return repr(value) if isinstance(value, str) else str(value)


def _number(key: str, value, kind, allowed: str):
    """`value` as int/float, or a UserError saying what is allowed (bools and non-numbers are rejected)."""
    bad = UserError(f"{key}={_shown(value)} is invalid: expected {allowed}")
    if isinstance(value, (bool, str)):  # the runner does arithmetic with these; a quoted "5" is a type error
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not math.isfinite(number) or (kind is int and number != int(number)):
        raise bad
    return kind(number)


def _check_numbers(cfg, keys, kind, allowed: str, is_allowed, optional: bool) -> None:
    for key in keys:
        value = _get(cfg, key, _UNSET)
        if value is _UNSET or (optional and value is None):
            continue
        if not is_allowed(_number(key, value, kind, allowed)):
            raise UserError(f"{key}={_shown(value)} is invalid: expected {allowed}")


SECTIONS = ("train", "eval", "algorithm", "model", "dataset", "hardware")
GROUPS = ("algorithm", "model", "dataset", "hardware")  # chosen as a whole from conf/<group>/
# Keys every run reads, whatever the algorithm or dataset (e.g. removed with `~train.iterations`).
REQUIRED = ("seed", "train.iterations", "train.meta_batch_size", "train.val_interval", "train.val_tasks",
            "train.log_interval", "eval.inner_steps", "eval.num_tasks", "eval.seed", "eval.checkpoint",
            "algorithm.name", "model.name", "dataset.kind", "dataset.ways", "dataset.shots", "dataset.query_shots",
            "hardware.device")


def validate(cfg: DictConfig) -> None:
    for section in SECTIONS:
        if not isinstance(_get(cfg, section), DictConfig):
            how = f"{section}=<option>" if section in GROUPS else f"{section}.<key>=<value>"
            raise UserError(f"{section}={_shown(_get(cfg, section))} is invalid: expected the {section} section "
                            f"(a mapping); set it with {how}")
    for key in REQUIRED:
        if _get(cfg, key, _UNSET) is _UNSET:
            raise UserError(f"{key} is missing from the config; it is required (restore it, e.g. {key}=<value>)")
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # an interpolation that does not resolve (${oc.env:...}, a typo in ${...})
        raise UserError(f"the config does not resolve: {str(exc).strip().splitlines()[0]}") from None
    positive, non_negative = (lambda x: x > 0), (lambda x: x >= 0)
    _check_numbers(cfg, POSITIVE_INTS, int, "a positive integer (>= 1)", positive, optional=False)
    _check_numbers(cfg, NON_NEGATIVE_INTS, int, "an integer >= 0", non_negative, optional=False)
    _check_numbers(cfg, POSITIVE_FLOATS, float, "a positive number (> 0)", positive, optional=False)
    _check_numbers(cfg, FRACTIONS, float, "a number in [0, 1]", lambda x: 0 <= x <= 1, optional=False)
    _check_numbers(cfg, OPTIONAL_POSITIVE_INTS, int, "a positive integer or null", positive, optional=True)
    _check_numbers(cfg, OPTIONAL_POSITIVE_FLOATS, float, "a positive number or null (off)", positive, optional=True)
    for key in BOOLS:
        value = _get(cfg, key, _UNSET)
        if value is not _UNSET and not isinstance(value, bool):
            raise UserError(f"{key}={_shown(value)} is invalid: expected true or false")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and str(value) not in allowed:
            raise UserError(f"{key}={_shown(value)} is invalid: expected one of {', '.join(allowed)}")
    if _get(cfg, "dataset.kind") == "sinusoid" and _get(cfg, "dataset.ways") != 1:
        raise UserError(f"dataset.ways={_shown(_get(cfg, 'dataset.ways'))} is invalid for sinusoid regression: "
                        f"expected 1")


def flat_config(cfg: DictConfig, keys) -> dict:
    """Selected config keys as a flat dict (for CSV rows)."""
    return {key: _get(cfg, key) for key in keys}


RESULT_KEYS = ["algorithm.name", "dataset.name", "model.name", "dataset.ways", "dataset.shots", "dataset.query_shots",
               "algorithm.inner_steps", "algorithm.inner_lr", "algorithm.outer_lr", "algorithm.first_order",
               "train.meta_batch_size", "train.iterations", "eval.inner_steps", "seed"]
