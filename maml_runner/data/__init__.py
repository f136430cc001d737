"""Episode sources per split, built from the `dataset` config."""
from __future__ import annotations

from ..errors import UserError
from .base import EpisodeSource, Task, seeded_global_rng
from .sinusoid import SinusoidTasks

SPLITS = ("train", "validation", "test")


def build_sources(dataset_cfg) -> dict[str, EpisodeSource]:
    kind = str(dataset_cfg.kind)
    if kind == "sinusoid":
        source = SinusoidTasks(dataset_cfg.shots, dataset_cfg.query_shots, dataset_cfg.amplitude,
                               dataset_cfg.phase, dataset_cfg.x_range)
        return {split: source for split in SPLITS}  # every split draws from the same task distribution
    if kind == "omniglot":
        from .omniglot import build_omniglot
        return build_omniglot(dataset_cfg)
    raise UserError(f"dataset.kind={kind!r} is not known; use omniglot or sinusoid")


__all__ = ["EpisodeSource", "Task", "seeded_global_rng", "build_sources", "SPLITS"]
