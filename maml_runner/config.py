"""Checks on the composed config, one clear line per bad key before any work starts, and the results schema.

The types and allowed values of every key are declared once, on the fields of the dataclasses in schema.py (and an
algorithm's own keys on its class's `Config`). Hydra checks the types as it composes (cli.py prints its refusal as
`composition_error_line`); `validate` then, right after composition:
  1. types the algorithm section against the `Config` of the class its `_target_` names (imported here: Hydra cannot
     know it before), reporting missing keys, keys the algorithm does not have and values of the wrong type;
  2. checks every range and choice (`schema.Allowed`), with the same one-line messages as before the schemas.

A config that did not come through composition (a checkpoint's saved config, for eval.only) is checked key by key as
far as its keys go: a run saved before a key existed, or with a key since removed (eval.meta_batch_size, pretrain's
inner_steps), still validates.
"""
from __future__ import annotations

from dataclasses import fields

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError
from .schema import (ACTIVATIONS, HEAD_INITS, INITS, LOSS_REDUCTIONS, PADDINGS, POOLINGS, RESIZE_MODES,  # noqa: F401
                     DATASET_SCHEMAS, MODEL_SCHEMAS, Allowed, DatasetConfig, RunConfig, allowed_of, field_names,
                     is_number_of_kind, section_schema)

_UNSET = object()

SECTIONS = ("train", "eval", "algorithm", "model", "dataset", "hardware")
GROUPS = ("algorithm", "model", "dataset", "hardware")  # chosen as a whole from conf/<group>/
# Dataset presets set Finn et al.'s inner_steps / inner_lr / outer_lr for whichever algorithm runs; an algorithm
# without such a key (pretrain has no inner_steps, reptile no outer_lr) ignores it. Any other key an algorithm does
# not have is an error (e.g. a reptile preset's inner_optimizer with algorithm=maml).
PRESET_ALGORITHM_KEYS = ("inner_steps", "inner_lr", "outer_lr")


def _get(cfg: DictConfig, key: str, default=None):
    return OmegaConf.select(cfg, key, default=default)


def _shown(value) -> str:
    """A value as it would be typed on the command line (strings quoted so that '' and ' 5' are visible)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))  # a typed float key holds `grad_clip=0` as 0.0: show it as typed
    return repr(value) if isinstance(value, str) else str(value)


def invalid(key: str, value, allowed: Allowed) -> UserError:
    return UserError(f"{key}={_shown(value)} is invalid: expected {allowed.text}")


def check_value(key: str, value, allowed: Allowed) -> None:
    """Raise the one-line UserError when `value` is not what `allowed` allows."""
    if value is None:
        if allowed.optional:
            return
        raise invalid(key, value, allowed)
    if allowed.kind in (int, float):  # the runner does arithmetic with these; a quoted "5" is a type error
        if not is_number_of_kind(value, allowed.kind) or not allowed.test(allowed.kind(value)):
            raise invalid(key, value, allowed)
    elif allowed.kind is bool:
        if not isinstance(value, bool):
            raise invalid(key, value, allowed)
    elif not allowed.test(str(value) if allowed.kind is str else value):
        raise invalid(key, value, allowed)


def missing(key: str) -> UserError:
    return UserError(f"{key} is missing from the config; it is required (restore it, e.g. {key}=<value>)")


# ---- which schema holds a key ----------------------------------------------------------------------------------
def _typed(node) -> type | None:
    """The schema dataclass a composed section was typed with (None for a plain mapping, e.g. a saved config)."""
    if not isinstance(node, DictConfig):
        return None
    kind = OmegaConf.get_type(node)
    return kind if kind not in (None, dict) else None


def _is_composed(cfg: DictConfig) -> bool:
    """Whether `cfg` came through Hydra's composition with the schemas (not a checkpoint's saved config)."""
    return _typed(cfg) is RunConfig


def section_schemas(cfg: DictConfig | None = None) -> dict[str, list[type]]:
    """section -> the schema(s) its keys are checked against: the one it was typed with, else the one its name /
    kind selects, else (with no config, for a composition error) every candidate."""
    def pick(section: str, by: str, table: dict, fallback: list[type]) -> list[type]:
        node = _get(cfg, section) if cfg is not None else None
        if _typed(node):
            return [_typed(node)]
        if node is not None and str(node.get(by)) in table:
            return [table[str(node.get(by))]]
        return fallback
    schemas = {name: [section_schema(RunConfig, name)] for name in ("train", "eval", "ablation", "report", "hardware")}
    schemas["model"] = pick("model", "name", MODEL_SCHEMAS, list(MODEL_SCHEMAS.values()) if cfg is None else [])
    schemas["dataset"] = pick("dataset", "kind", DATASET_SCHEMAS,
                              list(DATASET_SCHEMAS.values()) if cfg is None else [DatasetConfig])
    return schemas


def allowed_for(key: str, cfg: DictConfig | None = None) -> Allowed | None:
    """What `key` (dotted, e.g. train.iterations) may hold, from the schemas; None when no range is declared."""
    section, _, name = key.partition(".")
    if not name:
        return allowed_of(RunConfig, section)
    for schema in section_schemas(cfg).get(section, []):
        allowed = allowed_of(schema, name)
        if allowed is not None:
            return allowed
    return None


_TYPE_WORDS = {"Integer": "expected an integer", "Float": "expected a number", "Boolean": "expected true or false"}


def _type_expected(exc: ValidationError) -> str:
    """'expected an integer' for OmegaConf's "Value 'x' of type 'str' could not be converted to Integer", else its
    own first line."""
    detail = str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]
    for word, expected in _TYPE_WORDS.items():
        if detail.endswith(f"converted to {word}"):
            return expected
    return detail


def composition_error_line(exc: BaseException) -> str | None:
    """The one line for Hydra's refusal of a value while composing (the cause of its ConfigCompositionException):
    the same words `validate` uses for that key. None when the error is not about one value."""
    key = getattr(exc, "full_key", None)
    if not key:
        return None
    value = getattr(exc, "value", None)
    if isinstance(exc, ValidationError):
        if key in SECTIONS or key in ("ablation", "report"):
            how = f"{key}=<option>" if key in GROUPS else f"{key}.<key>=<value>"
            return (f"{key}={_shown(value)} is invalid: expected the {key} section (a mapping); set it with {how}")
        allowed = allowed_for(key)
        if allowed is not None:
            return str(invalid(key, value, allowed))
        return f"{key}={_shown(value)} is invalid: {_type_expected(exc)}"
    if "does not support deletion" in str(exc):
        return f"{key} is required; it cannot be removed (set it with {key}=<value>)"
    return None


# ---- the algorithm section ---------------------------------------------------------------------------------------
def algorithm_schema(cfg: DictConfig) -> type:
    """The `Config` dataclass of the algorithm class the config's algorithm section names."""
    from .algorithms import algorithm_class  # imports torch: only once a run is about to start
    return algorithm_class(cfg.algorithm).Config


def _check_algorithm(cfg: DictConfig, schema: type, composed: bool) -> None:
    """Type the algorithm section against its class's Config: missing keys, unknown keys, wrong types."""
    section = OmegaConf.to_container(cfg.algorithm, resolve=True)
    known = set(field_names(schema))
    unknown = [key for key in section if key not in known and key not in PRESET_ALGORITHM_KEYS]
    if unknown and composed:
        cls = f"{schema.__module__}.{schema.__qualname__}"
        raise UserError(f"algorithm.{unknown[0]} is not a key of algorithm={section.get('name')} ({cls} has: "
                        f"{', '.join(k for k in field_names(schema) if k != '_target_')})")
    given = {key: value for key, value in section.items() if key in known}
    try:
        typed = OmegaConf.merge(OmegaConf.structured(schema), given)
    except ValidationError as exc:
        key = f"algorithm.{exc.full_key}"
        allowed = allowed_of(schema, str(exc.full_key))
        raise (invalid(key, exc.value, allowed) if allowed is not None else
               UserError(f"{key}={_shown(exc.value)} is invalid: {_type_expected(exc)}")) from None
    except ConfigKeyError as exc:  # not expected after the filtering above; still one line
        raise UserError(f"algorithm.{exc.full_key} is not a key of this algorithm") from None
    if composed:
        for key in field_names(schema):
            if OmegaConf.is_missing(typed, key):
                raise missing(f"algorithm.{key}")
    for item in fields(schema):
        allowed = item.metadata.get("allowed")
        if allowed is not None and item.name in section:
            check_value(f"algorithm.{item.name}", section[item.name], allowed)


# ---- validate --------------------------------------------------------------------------------------------------
def validate(cfg: DictConfig) -> None:
    """Raise a one-line UserError for the first bad key of `cfg`; return None when the config can run."""
    for section in SECTIONS:
        if not isinstance(_get(cfg, section), DictConfig):
            how = f"{section}=<option>" if section in GROUPS else f"{section}.<key>=<value>"
            raise UserError(f"{section}={_shown(_get(cfg, section))} is invalid: expected the {section} section "
                            f"(a mapping); set it with {how}")
    try:
        unset = OmegaConf.missing_keys(cfg)
    except OmegaConfBaseException:  # it resolves interpolations on its way: the resolution check below says which
        unset = set()
    if unset:  # a YAML that leaves a schema key unset ('???'): the first, in section order
        raise missing(min(unset, key=lambda k: (k.split(".")[0] not in SECTIONS, k)))
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # an interpolation that does not resolve (${oc.env:...}, a typo in ${...})
        raise UserError(f"the config does not resolve: {str(exc).strip().splitlines()[0]}") from None
    composed = _is_composed(cfg)
    if composed or _get(cfg, "algorithm._target_") is not None or _get(cfg, "algorithm.name") is not None:
        _check_algorithm(cfg, algorithm_schema(cfg), composed)
    seed = allowed_of(RunConfig, "seed")
    if _get(cfg, "seed", _UNSET) is not _UNSET:
        check_value("seed", _get(cfg, "seed"), seed)
    for section, schemas in section_schemas(cfg).items():
        for schema in schemas[:1]:
            for item in fields(schema):
                allowed = item.metadata.get("allowed")
                value = _get(cfg, f"{section}.{item.name}", _UNSET)
                if allowed is not None and value is not _UNSET:
                    check_value(f"{section}.{item.name}", value, allowed)
    if _get(cfg, "dataset.kind") == "sinusoid" and _get(cfg, "dataset.ways") != 1:
        raise UserError(f"dataset.ways={_shown(_get(cfg, 'dataset.ways'))} is invalid for sinusoid regression: "
                        f"expected 1")
    if _get(cfg, "dataset.kind") == "omniglot" and _get(cfg, "dataset.split") is not None:
        split = check_omniglot_split(_get(cfg, "dataset.split"))
        checkpoint = _get(cfg, "eval.checkpoint")
        if split[1] == 0 and checkpoint is not None and str(checkpoint) != "last":
            # best.pt (and anything chosen by validation) needs validation tasks; there are none to choose with.
            raise UserError(f"eval.checkpoint={checkpoint} needs validation characters, but dataset.split={split} "
                            f"has none (validation size 0): use eval.checkpoint=last, or a validation size >= 1")


def check_omniglot_split(split) -> list[int]:
    """`dataset.split` of Omniglot: three character counts [train, validation, test], train and test >= 1,
    validation >= 0 (0: no validation set, as supervised-reptile's 1200 / 0 / 423). Returns them as ints; raises
    the one-line UserError otherwise."""
    values = OmegaConf.to_container(split) if isinstance(split, ListConfig) else split
    if not isinstance(values, (list, tuple)) or len(values) != 3 or \
            not all(is_number_of_kind(v, int) for v in values) or min(values[0], values[2]) < 1 or values[1] < 0:
        raise UserError(f"dataset.split={_shown(split)} is invalid: expected three character counts [train, "
                        f"validation, test], train and test >= 1, validation >= 0 (0: no validation set)")
    return [int(v) for v in values]


# ---- configs saved by earlier versions ------------------------------------------------------------------------
REMOVED_KEYS = ("eval.meta_batch_size",)  # read by nothing (issue 15); checkpoints written before still hold it
# Keys added since runs were first saved, with the dataset kinds they belong to (None: any) and the value that does
# what the code did before the key existed (conf/config.yaml's default): a checkpoint saved without them is compared
# as if it had them, so resume and train.resume=true see no difference (a resumed 2026-11-25 Omniglot run would
# otherwise warn "dataset.ink: None -> 1"). eval.ensemble_size is only read with eval.checkpoint=ensemble, which did
# not exist before. hardware.tf32: false, what every run saved before it ran (on CPU, where TF32 does not exist).
ADDED_KEYS = (("dataset.ink", ("omniglot",), 1), ("dataset.rotations_as_classes", ("omniglot",), False),
              ("eval.ensemble_size", None, 5), ("hardware.compile", None, False), ("hardware.tf32", None, False))


def upgrade_saved(saved: dict) -> dict:
    """A checkpoint's saved config as this version would save it: the algorithm's `_target_` (from
    conf/algorithm/<name>.yaml) when it predates `_target_`; with ADDED_KEYS' values where it lacks them; without
    REMOVED_KEYS and without algorithm keys its class no longer has (pretrain's inner_steps/first_order, reptile's
    outer_lr, ...; dataset presets' inner_steps, inner_lr, outer_lr stay: they are still set). Resume compares
    against it (checkpoint.config_differences) and eval.only starts from it. An algorithm that cannot be found
    leaves the config as it was."""
    import copy
    upgraded = copy.deepcopy(saved)
    for key in REMOVED_KEYS:
        section, _, name = key.partition(".")
        if isinstance(upgraded.get(section), dict):
            upgraded[section].pop(name, None)
    for key, kinds, value in ADDED_KEYS:
        section, _, name = key.partition(".")
        part = upgraded.get(section)
        if isinstance(part, dict) and name not in part and (kinds is None or part.get("kind") in kinds):
            part[name] = value
    algorithm = upgraded.get("algorithm")
    if not isinstance(algorithm, dict):
        return upgraded
    from .algorithms import algorithm_class
    try:
        cls = algorithm_class(OmegaConf.create(algorithm))
    except (UserError, OmegaConfBaseException):
        return upgraded
    known = field_names(cls.Config)
    kept = {key: value for key, value in algorithm.items() if key in known or key in PRESET_ALGORITHM_KEYS}
    upgraded["algorithm"] = {"_target_": f"{cls.__module__}.{cls.__qualname__}", **kept}
    return upgraded


# ---- results schema ----------------------------------------------------------------------------------------------
RESULT_LEADING_KEYS = ["algorithm.name", "dataset.name", "model.name", "dataset.ways", "dataset.shots",
                       "dataset.query_shots"]
RESULT_TRAILING_KEYS = ["train.meta_batch_size", "train.iterations", "eval.inner_steps", "seed"]
# The algorithm columns results.csv had before they followed the algorithm: first, in this order, where an
# algorithm has them, so existing columns keep their places.
RESULT_ALGORITHM_ORDER = ["inner_steps", "inner_lr", "outer_lr", "first_order"]


def result_fields(cfg: DictConfig) -> list[str]:
    """The config keys a results row records: the dataset/model/run keys every run has, and the keys the run's
    algorithm has (its Config's, not keys every algorithm must carry)."""
    keys = [name for name in field_names(algorithm_schema(cfg)) if name not in ("_target_", "name")]
    ordered = [k for k in RESULT_ALGORITHM_ORDER if k in keys] + [k for k in keys if k not in RESULT_ALGORITHM_ORDER]
    return [*RESULT_LEADING_KEYS, *(f"algorithm.{k}" for k in ordered), *RESULT_TRAILING_KEYS]


def is_result_config_column(column: str) -> bool:
    """Whether a results.csv column is a config key (written by `result_fields`, of this or an older version)."""
    return column in RESULT_LEADING_KEYS or column in RESULT_TRAILING_KEYS or column.startswith("algorithm.")


def flat_config(cfg: DictConfig, keys) -> dict:
    """Selected config keys as a flat dict (for CSV rows)."""
    return {key: _get(cfg, key) for key in keys}
