"""Episode sources per split, built from the `dataset` config."""
from __future__ import annotations

from ..errors import UserError
from .base import EpisodeSource, Task, seeded_global_rng
from .sinusoid import SinusoidTasks

SPLITS = ("train", "validation", "test")
KINDS = ("sinusoid", "omniglot", "miniimagenet", "image_folder")


def build_sources(dataset_cfg) -> dict[str, EpisodeSource]:
    kind = str(dataset_cfg.kind)
    if kind == "sinusoid":
        source = SinusoidTasks(dataset_cfg.shots, dataset_cfg.query_shots, dataset_cfg.amplitude,
                               dataset_cfg.phase, dataset_cfg.x_range)
        return {split: source for split in SPLITS}  # every split draws from the same task distribution
    if kind == "omniglot":
        from .omniglot import build_omniglot
        return build_omniglot(dataset_cfg)
    if kind == "miniimagenet":
        from .miniimagenet import build_miniimagenet
        return build_miniimagenet(dataset_cfg)
    if kind == "image_folder":
        from .image_folder import build_image_folder
        return build_image_folder(dataset_cfg)
    raise UserError(f"dataset.kind={kind!r} is not known; use one of {', '.join(KINDS)}")


__all__ = ["EpisodeSource", "Task", "seeded_global_rng", "build_sources", "SPLITS", "KINDS"]
