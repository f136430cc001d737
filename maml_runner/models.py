"""Networks from Finn et al. 2017. Every model is `head(body(x))` so head-only algorithms (ANIL) can split them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError

BN_MODES = ("transductive", "running", "none")


def batch_norm(channels: int, mode: str) -> nn.Module:
    if mode == "none":
        return nn.Identity()
    # transductive = always the current batch's statistics, at test time too (the MAML reference code).
    return nn.BatchNorm2d(channels, track_running_stats=(mode == "running"), momentum=0.1)


class PerStepBatchNorm(nn.Module):
    """Batch norm with one weight/bias and one set of running statistics per inner step (`step` picks them;
    steps past the last reuse it): MAML++'s BNRS + BNWB. Running statistics are only kept with model.bn=running;
    transductive mode never reads them."""

    def __init__(self, bn: nn.BatchNorm2d, steps: int):
        super().__init__()
        channels = bn.num_features
        self.weight = nn.Parameter(bn.weight.detach().repeat(steps, 1))
        self.bias = nn.Parameter(bn.bias.detach().repeat(steps, 1))
        self.register_buffer("running_mean", torch.zeros(steps, channels))
        self.register_buffer("running_var", torch.ones(steps, channels))
        self.eps, self.momentum = bn.eps, bn.momentum if bn.momentum is not None else 0.1
        self.use_running_stats = bn.track_running_stats  # model.bn=running
        self.steps, self.step = steps, 0

    def index(self, step: int) -> int:
        return min(step, self.steps - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.index(self.step)
        if not self.use_running_stats:
            return F.batch_norm(x, None, None, self.weight[i], self.bias[i], True, 0.0, self.eps)
        return F.batch_norm(x, self.running_mean[i], self.running_var[i], self.weight[i], self.bias[i],
                            self.training, self.momentum, self.eps)


def per_step_batch_norms(module: nn.Module, steps: int) -> list[PerStepBatchNorm]:
    """Replaces every BatchNorm2d in `module` by a PerStepBatchNorm with `steps` sets; returns them."""
    replaced = []
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, PerStepBatchNorm(child, steps))
            replaced.append(getattr(module, name))
        else:
            replaced += per_step_batch_norms(child, steps)
    return replaced


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
