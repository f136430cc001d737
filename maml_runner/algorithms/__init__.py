"""Algorithms come from their YAML: `conf/algorithm/<name>.yaml` names the class implementing `MetaAlgorithm` with
`_target_` (e.g. `maml_runner.algorithms.maml.MAML`), and the class's `Config` dataclass lists the keys the YAML
holds. There is no list of algorithms in the code: adding one is a module and a YAML (README, "Adding an algorithm").

The algorithms that exist are the YAML files of the config search path's `algorithm/` folders (the repository's
conf/ and any `hydra.searchpath` folder of the running command). Only a class one of them names is imported: a
checkpoint's saved config (eval.only, ablation.from_runs) cannot make the runner import anything else.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import OmegaConf

from ..errors import UserError
from ..paths import CONF_DIR
from .base import MetaAlgorithm


def config_dirs() -> list[Path]:
    """The config folders of this run: the repository's conf/, then the `file://` entries of the running Hydra
    command's config search path (hydra.searchpath), when there is one."""
    dirs = [Path(CONF_DIR)]
    try:
        from hydra.core.hydra_config import HydraConfig
        sources = HydraConfig.get().runtime.config_sources if HydraConfig.initialized() else []
    except Exception:  # noqa: BLE001 - outside a Hydra run there is no search path beyond conf/
        sources = []
    for source in sources:
        if str(source.schema) == "file" and Path(str(source.path)).resolve() not in [d.resolve() for d in dirs]:
            dirs.append(Path(str(source.path)))
    return dirs


def algorithm_targets() -> dict[str, str]:
    """{option name: the class its YAML names} for every `algorithm/*.yaml` on the search path (first one wins)."""
    targets: dict[str, str] = {}
    for folder in config_dirs():
        for path in sorted((folder / "algorithm").glob("*.yaml")):
            target = OmegaConf.select(OmegaConf.load(path), "_target_")
            if path.stem not in targets and isinstance(target, str):
                targets[path.stem] = target
    return targets


def available_algorithms() -> list[str]:
    return sorted(algorithm_targets())


def algorithm_class(algorithm_cfg) -> type[MetaAlgorithm]:
    """The class an algorithm section names: its `_target_`, or for a config without one (saved before `_target_`
    existed, or a script's hand-made config) the `_target_` of conf/algorithm/<algorithm.name>.yaml."""
    targets = algorithm_targets()
    target = algorithm_cfg.get("_target_")
    if target is None:
        name = str(algorithm_cfg.get("name"))
        if name not in targets:
            raise UserError(f"algorithm={name!r} is not known; choose one of: {', '.join(sorted(targets))}")
        target = targets[name]
    target = str(target)
    if target not in targets.values():
        raise UserError(f"algorithm._target_={target!r} is not the class of any algorithm/*.yaml on the config "
                        f"search path ({', '.join(sorted(targets))}); add its YAML (README: adding an algorithm)")
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise UserError(f"algorithm._target_={target!r} cannot be imported ({type(exc).__name__}: {exc}); it names "
                        f"the class of the algorithm as <module>.<Class>") from None
    if not (isinstance(cls, type) and issubclass(cls, MetaAlgorithm)):
        raise UserError(f"algorithm._target_={target!r} is not a MetaAlgorithm subclass "
                        f"(maml_runner/algorithms/base.py)")
    return cls


def build_algorithm(model, algorithm_cfg, task_type: str, total_iterations: int, grad_clip=None,
                    train_source=None, vectorize: str = "auto") -> MetaAlgorithm:
    algorithm = algorithm_class(algorithm_cfg)(model, algorithm_cfg, task_type, total_iterations)
    algorithm.grad_clip = grad_clip
    algorithm.set_loss_reduction(str(algorithm_cfg.get("loss_reduction", "mean")),
                                 getattr(train_source, "shots", None))
    algorithm.vectorize = vectorize  # hardware.vectorize: read by the algorithms with a task-grouped inner loop
    if train_source is not None:
        algorithm.bind_data(train_source)
    if algorithm.optimizer is None:
        algorithm.build_optimizer()
    return algorithm
