"""The typed config: one dataclass per config section, registered with Hydra's ConfigStore, plus the allowed range of
each key (its `Allowed`), declared on the field that holds it.

What is checked where:
  * When Hydra composes the config (before anything runs): the types of `train`, `eval`, `ablation`, `report`,
    `hardware` (`RunConfig`, named first in conf/config.yaml's defaults list), of the model and of the dataset
    (each conf/model/<name>.yaml and conf/dataset/<preset>.yaml names its schema in its defaults list, e.g.
    `- /model_schema_conv4@_here_`). A value of the wrong type (`train.iterations=abc`), removing a key
    (`~train.iterations`) or a key the section lacks (`model.hiddn=...`) is refused then; cli.py prints it as
    config.composition_error_line's one line.
  * The algorithm section is typed against the class its YAML names (`_target_`), which Hydra cannot know before
    it is imported: config.validate imports it and merges the section into its `Config` right after composition,
    before any work (an algorithm's keys live with that algorithm: algorithms/<module>.py).
  * Ranges and choices (`Allowed`: a positive integer, one of stop/skip, ...): config.validate, from the `allowed`
    of each field, so a key's type and range are declared in one place.

Every field is `required()` (no default): the YAML files hold the values, the dataclasses only what is allowed; a key
a YAML forgets is reported as missing instead of silently taking a second default from here.

Adding a model or a dataset kind: a dataclass here (a dataset kind subclasses `DatasetConfig`, adding its own keys),
an entry in MODEL_SCHEMAS / DATASET_SCHEMAS (name / `dataset.kind` -> dataclass; registered as
`model_schema_<name>` / `dataset_schema_<kind>`), and the line `- /dataset_schema_<kind>@dataset` in the preset's
defaults list (`- /model_schema_<name>@_here_` for a model). A dataset YAML that names no schema still composes;
config.validate then checks the keys every dataset has (`DatasetConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Callable, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Allowed values of the switches that reproduce the papers' released code (docs/protocols.md); the modules that
# implement them import these (through maml_runner.config).
LOSS_REDUCTIONS = ("mean", "sum_over_shots")   # algorithm.loss_reduction
RESIZE_MODES = ("lanczos", "binary_nearest")   # dataset.image_resize
PADDINGS = ("symmetric", "tf_same")            # model.padding
POOLINGS = ("stride", "max")                   # model.pooling
INITS = ("pytorch", "xavier")                  # model.init
HEAD_INITS = ("same", "normal")                # model.head_init
ACTIVATIONS = ("relu", "leaky_relu")           # model.activation
HEAD_FEATURES = ("mean", "flatten")            # model.head_features (null: the pooling's own)


@dataclass(frozen=True)
class Allowed:
    """What a key may hold, and the words of the one-line error that says so (`expected <text>`).

    kind: int or float (a number of that kind: bools, strings and non-finite numbers are refused), bool (true or
    false), str (compared as a string) or None (anything); test: the range, on the value as that kind; optional:
    null is allowed too."""
    text: str
    kind: type | None = None
    test: Callable[[Any], bool] = lambda value: True
    optional: bool = False


POSITIVE_INT = Allowed("a positive integer (>= 1)", int, lambda x: x > 0)
NON_NEGATIVE_INT = Allowed("an integer >= 0", int, lambda x: x >= 0)
POSITIVE_FLOAT = Allowed("a positive number (> 0)", float, lambda x: x > 0)
FRACTION = Allowed("a number in [0, 1]", float, lambda x: 0 <= x <= 1)
OPTIONAL_POSITIVE_INT = Allowed("a positive integer or null", int, lambda x: x > 0, optional=True)
OPTIONAL_POSITIVE_FLOAT = Allowed("a positive number or null (off)", float, lambda x: x > 0, optional=True)
BOOL = Allowed("true or false", bool)
INK = Allowed("1 (ink 1 on a background of 0, cbfinn/maml) or 0 (ink 0 on a background of 1, supervised-reptile and "
              "MAML++)", int, lambda x: x in (0, 1))  # dataset.ink


def one_of(*choices: str) -> Allowed:
    return Allowed(f"one of {', '.join(choices)}", str, lambda value: value in choices)


def required(allowed: Allowed | None = None) -> Any:
    """A field the YAML must set (no default here), with what it may hold."""
    return field(default=MISSING, metadata={"allowed": allowed})


def allowed_of(schema: type, name: str) -> Allowed | None:
    """The `Allowed` of field `name` of a schema dataclass (None: no range, or no such field)."""
    for item in fields(schema):
        if item.name == name:
            return item.metadata.get("allowed")
    return None


def field_names(schema: type) -> list[str]:
    return [item.name for item in fields(schema)]


def section_schema(schema: type, name: str) -> type | None:
    """The dataclass of the nested section `name` of `schema` (RunConfig.train -> TrainConfig); None if untyped."""
    for item in fields(schema):
        if item.name == name:
            factory = item.default_factory
            return factory if is_dataclass(factory) else None
    return None


def is_number_of_kind(value, kind) -> bool:
    """True for an int/float value (not a bool, not a string) that is finite and, for kind int, whole."""
    if isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and (kind is not int or value == int(value))


# ---- sections -------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    iterations: int = required(POSITIVE_INT)
    max_minutes: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)
    meta_batch_size: int = required(POSITIVE_INT)
    val_interval: int = required(POSITIVE_INT)
    val_tasks: int = required(POSITIVE_INT)
    grad_clip_value: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)  # element-wise clip (cbfinn/maml miniImageNet)
    grad_clip: Optional[float] = required(OPTIONAL_POSITIVE_FLOAT)
    resume: Any = required()  # true/false or a run directory / .pt path (checkpoint.find_resume_checkpoint)
    nan_policy: str = required(one_of("stop", "skip"))
    log_interval: int = required(POSITIVE_INT)


@dataclass
class EvalConfig:
    inner_steps: int = required(POSITIVE_INT)
    num_tasks: int = required(POSITIVE_INT)
    seed: int = required(NON_NEGATIVE_INT)
    checkpoint: str = required(one_of("best", "last", "ensemble"))
    ensemble_size: int = required(POSITIVE_INT)  # eval.checkpoint=ensemble: how many top validations (ensemble.py)
    only: bool = required(BOOL)


@dataclass
class AblationConfig:
    enabled: bool = required(BOOL)
    train_steps: Any = required()  # lists checked by ablation._steps / _from_runs, with their own messages
    eval_steps: Any = required()
    from_runs: Any = required()


@dataclass
class ReportConfig:
    enabled: bool = required(BOOL)
    adaptation_tasks: int = required()


@dataclass
class HardwareConfig:
    device: str = required()  # auto | cpu | cuda | cuda:<index>: hardware.select_device says what is wrong
    threads: Optional[int] = required(OPTIONAL_POSITIVE_INT)
    deterministic: bool = required(BOOL)
    vectorize: str = required(one_of("auto", "on", "off"))
    compile: bool = required(BOOL)  # torch.compile the fast path's forward or BN's double backward (hardware.py)
    tf32: bool = required(BOOL)  # CUDA: TensorFloat-32 convolutions and matrix products (hardware.configure)


@dataclass
class MLPConfig:
    name: str = required()
    hidden: List[int] = required()
    bn: str = required()


@dataclass
class Conv4Config:
    name: str = required()
    hidden: int = required()
    layers: int = required()
    bn: str = required()
    bn_scale: bool = required(BOOL)
    bn_eps: float = required(POSITIVE_FLOAT)
    bn_adapted: bool = required(BOOL)
    padding: str = required(one_of(*PADDINGS))
    pooling: str = required(one_of(*POOLINGS))
    init: str = required(one_of(*INITS))
    head_init: str = required(one_of(*HEAD_INITS))
    activation: str = required(one_of(*ACTIVATIONS))
    head_features: Optional[str] = required(Allowed(
        "null (mean for pooling=stride, flatten for pooling=max), mean or flatten", str,
        lambda value: value in HEAD_FEATURES, optional=True))


@dataclass
class DatasetConfig:
    """The keys every dataset has (what the trainer, the models and the results read)."""
    name: str = required()
    kind: str = required()
    shots: int = required(POSITIVE_INT)
    query_shots: int = required(POSITIVE_INT)
    ways: int = required(POSITIVE_INT)
    root: Optional[str] = required()
    download: bool = required(BOOL)


@dataclass
class SinusoidDataset(DatasetConfig):
    amplitude: List[float] = required()
    phase: List[float] = required()
    x_range: List[float] = required()


@dataclass
class OmniglotDataset(DatasetConfig):
    eval_query_shots: Optional[int] = required(OPTIONAL_POSITIVE_INT)
    image_size: int = required(POSITIVE_INT)
    split: List[int] = required()
    split_seed: int = required(NON_NEGATIVE_INT)
    rotations: List[int] = required()
    eval_rotations: Optional[List[int]] = required()
    rotations_as_classes: bool = required(BOOL)
    image_resize: str = required(one_of(*RESIZE_MODES))
    ink: int = required(INK)
    cache_dir: Optional[str] = required()


@dataclass
class MiniImageNetDataset(DatasetConfig):
    eval_query_shots: Optional[int] = required(OPTIONAL_POSITIVE_INT)
    image_size: int = required(POSITIVE_INT)
    channels: int = required(Allowed("3 (miniImageNet is RGB)", int, lambda x: x == 3))
    rotations: List[int] = required()
    eval_rotations: Optional[List[int]] = required()
    cache_dir: Optional[str] = required()


@dataclass
class ImageFolderDataset(DatasetConfig):
    eval_query_shots: Optional[int] = required(OPTIONAL_POSITIVE_INT)
    image_size: int = required(POSITIVE_INT)
    channels: int = required(Allowed("1 (grayscale) or 3 (RGB)", int, lambda x: x in (1, 3)))
    split: List[float] = required()  # train/validation/test proportions (image_classes.seeded_split checks them)
    split_seed: int = required(NON_NEGATIVE_INT)
    rotations: List[int] = required()
    eval_rotations: Optional[List[int]] = required()
    cache_dir: Optional[str] = required()


@dataclass
class AlgorithmConfig:
    """The keys every algorithm has. An algorithm's own keys: a subclass as its class's `Config`
    (MetaAlgorithm.Config; e.g. algorithms/maml.py), in the order of its YAML."""
    _target_: str = required()  # the class: conf/algorithm/<name>.yaml names it, config.algorithm_class imports it
    name: str = required()      # how runs, results and logs call it
    loss_reduction: str = required(one_of(*LOSS_REDUCTIONS))


@dataclass
class RunConfig:
    """conf/config.yaml. The group sections are typed by their options (model, dataset) or after composition
    (algorithm: its class's Config); here they are only required to exist."""
    seed: int = required(NON_NEGATIVE_INT)
    name: str = required()
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    algorithm: Any = MISSING
    model: Any = MISSING
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    dataset: Any = MISSING


MODEL_SCHEMAS: dict[str, type] = {"mlp": MLPConfig, "conv4": Conv4Config}          # model.name -> schema
DATASET_SCHEMAS: dict[str, type] = {"sinusoid": SinusoidDataset, "omniglot": OmniglotDataset,  # dataset.kind
                                     "miniimagenet": MiniImageNetDataset, "image_folder": ImageFolderDataset}


def register(store: ConfigStore | None = None) -> None:
    """Put the schemas where conf/*.yaml's defaults lists find them (idempotent: storing again replaces)."""
    store = store or ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for name, schema in MODEL_SCHEMAS.items():
        store.store(name=f"model_schema_{name}", node=schema)
    for kind, schema in DATASET_SCHEMAS.items():
        store.store(name=f"dataset_schema_{kind}", node=schema)


register()
