"""Networks from Finn et al. 2017. Every model is `head(body(x))` so head-only algorithms (ANIL) can split them."""
from __future__ import annotations

import torch
from torch import nn

from .errors import UserError

BN_MODES = ("transductive", "running", "none")


def batch_norm(channels: int, mode: str) -> nn.Module:
    if mode == "none":
        return nn.Identity()
    # transductive = always the current batch's statistics, at test time too (the MAML reference code).
    return nn.BatchNorm2d(channels, track_running_stats=(mode == "running"), momentum=0.1)


class Conv4(nn.Module):
    """4 x [3x3 conv, `hidden` filters, stride 2, batch norm, ReLU], spatial mean, linear head (28x28 input)."""

    def __init__(self, out_features: int, in_channels: int = 1, hidden: int = 64, layers: int = 4,
                 bn: str = "transductive"):
        super().__init__()
        blocks, channels = [], in_channels
        for _ in range(layers):
            blocks += [nn.Conv2d(channels, hidden, 3, stride=2, padding=1), batch_norm(hidden, bn), nn.ReLU()]
            channels = hidden
        self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MLP(nn.Module):
    """Sinusoid regressor 1-40-40-1 with ReLU (no normalisation)."""

    def __init__(self, out_features: int = 1, in_features: int = 1, hidden=(40, 40)):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def build_model(model_cfg, dataset_cfg) -> nn.Module:
    """The network for a model config and the dataset it is used on (output size from the task)."""
    regression = dataset_cfg.kind == "sinusoid"
    out_features = 1 if regression else int(dataset_cfg.ways)
    bn = str(model_cfg.get("bn", "none"))
    if bn not in BN_MODES:
        raise UserError(f"model.bn={bn!r} is not allowed; use one of {', '.join(BN_MODES)}")
    if model_cfg.name == "conv4":
        if regression:
            raise UserError("model=conv4 needs images; dataset=sinusoid uses model=mlp")
        return Conv4(out_features, hidden=int(model_cfg.hidden), layers=int(model_cfg.layers), bn=bn)
    if model_cfg.name == "mlp":
        in_features = 1 if regression else int(dataset_cfg.image_size) ** 2
        model = MLP(out_features, in_features=in_features, hidden=tuple(model_cfg.hidden))
        if not regression:  # images flattened so the MLP also runs on Omniglot
            return _FlatMLP(model)
        return model
    raise UserError(f"model={model_cfg.name!r} is not known; use conv4 or mlp")


class _FlatMLP(nn.Module):
    """MLP on flattened images, keeping the body/head split."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), *mlp.body)
        self.head = mlp.head

    def forward(self, x):
        return self.head(self.body(x))
