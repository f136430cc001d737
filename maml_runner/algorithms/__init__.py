"""Algorithm registry: `algorithm.name` in the config -> the class implementing `MetaAlgorithm`."""
from __future__ import annotations

import importlib

from ..errors import UserError
from .base import MetaAlgorithm

# name -> "module:Class"; modules are imported on demand so one broken optional algorithm cannot break the rest.
REGISTRY: dict[str, str] = {
    "maml": "maml:MAML",
    "fomaml": "fomaml:FOMAML",
    "reptile": "reptile:Reptile",
    "anil": "anil:ANIL",
    "metasgd": "metasgd:MetaSGD",
    "mamlpp": "mamlpp:MAMLPlusPlus",
    "pretrain": "pretrain:Pretrain",
}


def algorithm_class(name: str) -> type[MetaAlgorithm]:
    if name not in REGISTRY:
        raise UserError(f"algorithm={name!r} is not known; choose one of: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_algorithm(model, algorithm_cfg, task_type: str, total_iterations: int, grad_clip=None,
                    train_source=None, vectorize: str = "auto") -> MetaAlgorithm:
    algorithm = algorithm_class(str(algorithm_cfg.name))(model, algorithm_cfg, task_type, total_iterations)
    algorithm.grad_clip = grad_clip
    algorithm.set_loss_reduction(str(algorithm_cfg.get("loss_reduction", "mean")),
                                 getattr(train_source, "shots", None))
    algorithm.vectorize = vectorize  # hardware.vectorize: read by algorithms with a vectorized inner loop (MAML, FOMAML, MAML++)
    if train_source is not None:
        algorithm.bind_data(train_source)
    if algorithm.optimizer is None:
        algorithm.build_optimizer()
    return algorithm
