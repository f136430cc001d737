"""Networks from Finn et al. 2017. Every model is `head(body(x))` so head-only algorithms (ANIL) can split them."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from . import grouped_conv
from .norm_derivatives import transductive_batch_norm
from .schema import HEAD_FEATURES

BN_MODES = ("transductive", "running", "none")


def batch_norm(channels: int, mode: str, scale: bool = True, eps: float = 1e-5) -> nn.Module:
    """`scale=False` drops gamma and keeps the offset beta: tf.contrib.layers.batch_norm's defaults (Finn's code)."""
    if mode == "none":
        return nn.Identity()
    # transductive = always the current batch's statistics, at test time too (the MAML reference code).
    bn = BatchNorm2d(channels, eps=eps, track_running_stats=(mode == "running"), momentum=0.1)
    if not scale:
        del bn.weight
        bn.register_parameter("weight", None)  # F.batch_norm takes weight=None as gamma = 1
    return bn


class TFSamePad2d(nn.Module):
    """TensorFlow's padding='SAME' for a strided 3x3 convolution: the total padding max((ceil(n/s) - 1) * s + k - n,
    0) split with the odd pixel at the bottom/right. With stride 2 on an even size that is 0 before, 1 after, where
    PyTorch's padding=1 pads both sides (Finn's Omniglot network, cbfinn/maml utils.conv_block)."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def amounts(self, size: int) -> tuple[int, int]:
        total = max((-(-size // self.stride) - 1) * self.stride + self.kernel_size - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self.amounts(x.shape[-2])
        left, right = self.amounts(x.shape[-1])
        return F.pad(x, (left, right, top, bottom))


class PerStepBatchNorm(nn.Module):
    """Batch norm with one weight/bias and one set of running statistics per inner step (`step` picks them;
    steps past the last reuse it): MAML++'s BNRS + BNWB. Running statistics are only kept with model.bn=running;
    transductive mode never reads them."""

    def __init__(self, bn: nn.BatchNorm2d, steps: int):
        super().__init__()
        channels = bn.num_features
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().repeat(steps, 1))
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().repeat(steps, 1))
        self.register_buffer("running_mean", torch.zeros(steps, channels))
        self.register_buffer("running_var", torch.ones(steps, channels))
        self.eps, self.momentum = bn.eps, bn.momentum if bn.momentum is not None else 0.1
        self.use_running_stats = bn.track_running_stats  # model.bn=running
        self.steps, self.step = steps, 0

    def index(self, step: int) -> int:
        return min(step, self.steps - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        i = self.index(self.step)
        weight = None if self.weight is None else self.weight[i]
        bias = None if self.bias is None else self.bias[i]
        if not self.use_running_stats:
            return transductive_batch_norm(x, weight, bias, self.eps)
        return F.batch_norm(x, self.running_mean[i], self.running_var[i], weight, bias,
                            self.training, self.momentum, self.eps)


def has_transductive_batch_norm(model: nn.Module) -> bool:
    """Whether some batch norm of `model` normalises with the current batch's statistics (model.bn=transductive):
    those run norm_derivatives' double backward in second-order steps."""
    return any((isinstance(m, BatchNorm2d) and m.running_mean is None)
               or (isinstance(m, PerStepBatchNorm) and not m.use_running_stats) for m in model.modules())


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


# ---- task-grouped execution ----------------------------------------------------------------------------------
# A meta-batch's T tasks at once, each with its own copy of the parameters (`params`: name -> tensor [T, *shape]).
# Images run as [N, T*C, H, W] (task t owns channels t*C..t*C+C-1): a grouped convolution (groups=T) applies each
# task's own filters, and batch norm's per-channel statistics are per task and channel, i.e. exactly each task's
# transductive batch norm, with torch's native batch_norm kernels (and, in second-order steps on CPU,
# norm_derivatives' double backward). Vectors run as [T, N, F] with batched matmuls. Activations, padding and
# pooling act per channel: the layout does not matter.
def running_statistics_reason(model: nn.Module) -> str | None:
    """None if no module of `model` updates running statistics (buffers written in the forward pass, which neither
    the task-grouped forward nor vmap can do); else which module does."""
    for name, module in model.named_modules():
        if (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats) or \
                (isinstance(module, PerStepBatchNorm) and module.use_running_stats):
            return f"{name or type(module).__name__} tracks running statistics (model.bn=running)"
    return None


def images_to_grouped(x: torch.Tensor) -> torch.Tensor:
    """[T, N, C, H, W] -> [N, T*C, H, W]."""
    tasks, n = x.shape[:2]
    # channels_last measured slower here (2-core CPU: second-order grouped convs ~2x slower), so not used.
    return x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])


def grouped_features(x: torch.Tensor, tasks: int) -> torch.Tensor:
    """[N, T*C, H, W] -> [T, N, C*H*W]: each task's images flattened as nn.Flatten flattens one image."""
    return x.reshape(x.shape[0], tasks, -1).transpose(0, 1)


def _shared(value: torch.Tensor, own: nn.Parameter) -> bool:
    """Whether `value` is one tensor for all tasks (shaped like the module's own parameter `own`) rather than
    per-task copies [T, *shape]: ANIL's body, which the inner loop does not adapt."""
    return value.dim() == own.dim()


def grouped_conv2d(conv: nn.Conv2d, x: torch.Tensor, params: dict, prefix: str, tasks: int) -> torch.Tensor:
    weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
    if _shared(weight, conv.weight):  # one ordinary convolution over every task's images ([N, T*C] = [N*T, C])
        out = F.conv2d(grouped_conv.tasks_as_batch(x, tasks), weight, bias, conv.stride, conv.padding, conv.dilation)
        return grouped_conv.batch_as_tasks(out, x.shape[0])
    return grouped_conv.task_grouped_conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)


def grouped_norm(norm: nn.Module, x: torch.Tensor, params: dict, prefix: str, tasks: int, step: int) -> torch.Tensor:
    """Transductive batch norm (BatchNorm2d without running statistics, PerStepBatchNorm at inner step `step`) or
    nn.Identity (model.bn=none), per task and channel."""
    if isinstance(norm, nn.Identity):
        return x
    affine = {}
    for name in ("weight", "bias"):
        value, own = params.get(prefix + name), getattr(norm, name)
        if value is None:
            affine[name] = None
            continue
        shared = _shared(value, own)
        if isinstance(norm, PerStepBatchNorm):  # weights [(T,) steps, C]: this step's row (of every task)
            value = value[norm.index(step)] if shared else value[:, norm.index(step)]
        affine[name] = value.repeat(tasks) if shared else value.reshape(-1)
    return transductive_batch_norm(x, affine["weight"], affine["bias"], norm.eps)


def grouped_linear(x: torch.Tensor, params: dict, prefix: str) -> torch.Tensor:
    """[T, N, F] -> [T, N, out] with each task's own weight [T, out, F] and bias [T, out] (or one shared
    weight [out, F] and bias [out])."""
    weight, bias = params[prefix + "weight"], params.get(prefix + "bias")
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    out = torch.bmm(x, weight.transpose(1, 2))
    return out if bias is None else out + bias.unsqueeze(1)


def grouped_vector_layers(layers: nn.Sequential, x: torch.Tensor, params: dict, prefix: str) -> torch.Tensor:
    """An MLP body (Linear and elementwise activations) on [T, N, F]."""
    for index, layer in enumerate(layers):
        x = grouped_linear(x, params, f"{prefix}{index}.") if isinstance(layer, nn.Linear) else layer(x)
    return x


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose transductive mode (no running statistics) takes norm_derivatives' double backward inside
    a second-order step: the per-task loops' batch norms, as `Conv2d` for their convolutions. Same parameters and
    state dict as nn.BatchNorm2d."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.running_mean is not None:
            return super().forward(input)
        return transductive_batch_norm(input, self.weight, self.bias, self.eps)


class Conv2d(nn.Conv2d):
    """nn.Conv2d whose derivatives inside a second-order step are grouped_conv's (on CPU: faster there, the same
    values): the per-task loops' convolutions (MAML, Meta-SGD and MAML++ enter `second_order_step` in their inner
    loops). Same parameters and state dict as nn.Conv2d."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return super()._conv_forward(input, weight, bias)
        return grouped_conv.grouped_conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class TaskGrouped:
    """Task-grouped execution, for models that are `head(body(x))` with a linear head: the inner loop of a whole
    meta-batch in one pass (algorithms/vectorized.py). A model supporting it defines `grouped_body`; `x` is the
    meta-batch's inputs [T, N, ...], `params` maps every parameter name to its per-task copies [T, *shape] (or, for
    parameters the inner loop does not change, the shared tensor itself), `step` is the inner step (MAML++'s
    per-step batch norm). A model without these methods takes the vmap path."""

    def grouped_reason(self) -> str | None:
        """None if this model can run task-grouped now; else why not."""
        return running_statistics_reason(self)

    def grouped_body(self, x: torch.Tensor, params: dict, step: int = 0) -> torch.Tensor:
        """The body's features per task: [T, N, features]."""
        raise NotImplementedError

    def grouped_head(self, features: torch.Tensor, params: dict) -> torch.Tensor:
        """The head on per-task features [T, N, F] -> [T, N, out] (ANIL adapts only this)."""
        return grouped_linear(features, params, "head.")

    def grouped_forward(self, x: torch.Tensor, params: dict, step: int = 0) -> torch.Tensor:
        """The model's output per task, [T, N, out]: task t's slice is `model(x[t])` with parameters `params[.][t]`."""
        return self.grouped_head(self.grouped_body(x, params, step), params)


class Conv4(TaskGrouped, nn.Module):
    """4 x [3x3 conv, `hidden` filters, batch norm, ReLU] + linear head.

    pooling="stride": stride-2 convolutions, spatial mean before the head (Finn et al.'s Omniglot network);
    pooling="max": stride-1 convolutions, each block ends in 2x2 max-pooling, the head sees the flattened features
    (Finn et al.'s miniImageNet network, Antoniou et al.'s MAML++ network). `head_features` overrides what the head
    sees: "mean" (the spatial mean, `hidden` inputs) or "flatten" (the last feature map flattened, hidden * H * W
    inputs: supervised-reptile's Omniglot network, 64 * 2 * 2 at 28x28); None keeps the pooling's own (mean for
    "stride", flatten for "max"). `padding="tf_same"` pads as TensorFlow's
    'SAME' (stride 2: bottom/right only); `bn_scale=False` drops gamma; `bn_adapted=False` keeps the batch-norm
    parameters out of the inner loop (`outer_loop_only`); `init="xavier"` draws conv and linear weights
    Glorot-uniform with zero biases, and `head_init="normal"` the head weights from N(0, 1) (Finn's Omniglot head);
    `activation="leaky_relu"` (slope 0.01) is MAML++'s.
    """

    def __init__(self, out_features: int, in_channels: int = 1, hidden: int = 64, layers: int = 4,
                 bn: str = "transductive", image_size: int = 28, bn_scale: bool = True, bn_eps: float = 1e-5,
                 bn_adapted: bool = True, padding: str = "symmetric", pooling: str = "stride",
                 init: str = "pytorch", head_init: str = "same", activation: str = "relu",
                 head_features: str | None = None):
        super().__init__()
        if head_features is None:
            head_features = "flatten" if pooling == "max" else "mean"
        if head_features not in HEAD_FEATURES:
            raise UserError(f"model.head_features={head_features!r} is invalid: expected null, mean or flatten")
        stride = 2 if pooling == "stride" else 1
        blocks, channels, size = [], in_channels, image_size
        self._conv_indices = []  # where each block's convolution sits in `body` (its norm follows it)
        for _ in range(layers):
            if padding == "tf_same":
                blocks.append(TFSamePad2d(3, stride))
            self._conv_indices.append(len(blocks))
            blocks.append(Conv2d(channels, hidden, 3, stride=stride, padding=0 if padding == "tf_same" else 1))
            blocks += [batch_norm(hidden, bn, bn_scale, bn_eps),
                       nn.LeakyReLU() if activation == "leaky_relu" else nn.ReLU()]
            size = -(-size // stride)
            if pooling == "max":
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            channels = hidden
        # `size`: the last feature map's side, followed through every block above (never assumed: 28 -> 2 with
        # stride 2, 28 -> 1 with max-pooling; other image sizes and layer counts give other sides).
        if head_features == "flatten":
            self.body = nn.Sequential(*blocks, nn.Flatten())
            features = hidden * size * size
        else:
            self.body = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            features = hidden
        self.head_features = head_features
        self.head = nn.Linear(features, out_features)
        self.bn_adapted = bn_adapted
        if init == "xavier":
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
        if head_init == "normal":  # cbfinn/maml: w5 = tf.random_normal (stddev 1), b5 = 0
            nn.init.normal_(self.head.weight, 0.0, 1.0)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def grouped_body(self, x: torch.Tensor, params: dict, step: int = 0) -> torch.Tensor:
        tasks = x.shape[0]
        x = images_to_grouped(x)
        convs = set(self._conv_indices)
        norms = {i + 1 for i in convs}  # the batch norm (or Identity, model.bn=none) after each convolution
        for index, module in enumerate(self.body):
            if index in convs:
                x = grouped_conv2d(module, x, params, f"body.{index}.", tasks)
            elif index in norms:  # MAML++ may have replaced it by a PerStepBatchNorm
                x = grouped_norm(module, x, params, f"body.{index}.", tasks, step)
            elif isinstance(module, nn.Flatten):  # head_features="flatten": the last module
                return grouped_features(x, tasks)
            elif isinstance(module, nn.AdaptiveAvgPool2d):  # head_features="mean": spatial mean, then Flatten
                return grouped_features(x.mean((-2, -1)), tasks)
            else:  # padding, activation, max-pooling: per channel
                x = module(x)
        raise AssertionError("Conv4's body ends in Flatten")


def outer_loop_only(model: nn.Module) -> set[str]:
    """Names of parameters the inner loop must not adapt: batch-norm weights of a model built with bn_adapted=False
    (in Finn's code beta is a variable outside the adapted `weights` dict: trained by the outer Adam only)."""
    if getattr(model, "bn_adapted", True):
        return set()
    return {f"{name}.{p}" if name else p for name, module in model.named_modules()
            if isinstance(module, (nn.BatchNorm2d, PerStepBatchNorm))
            for p, _ in module.named_parameters(recurse=False)}


class MLP(TaskGrouped, nn.Module):
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

    def grouped_body(self, x: torch.Tensor, params: dict, step: int = 0) -> torch.Tensor:
        return grouped_vector_layers(self.body, x, params, "body.")


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
        choices = {key: str(model_cfg.get(key, default)) for key, default in (
            ("padding", "symmetric"), ("pooling", "stride"), ("init", "pytorch"), ("head_init", "same"),
            ("activation", "relu"))}
        return Conv4(out_features, in_channels=int(dataset_cfg.get("channels", 1)), hidden=int(model_cfg.hidden),
                     layers=int(model_cfg.layers), bn=bn, image_size=int(dataset_cfg.image_size),
                     bn_scale=bool(model_cfg.get("bn_scale", True)), bn_eps=float(model_cfg.get("bn_eps", 1e-5)),
                     bn_adapted=bool(model_cfg.get("bn_adapted", True)),
                     head_features=model_cfg.get("head_features"), **choices)
    if model_cfg.name == "mlp":
        in_features = 1 if regression else int(dataset_cfg.image_size) ** 2
        model = MLP(out_features, in_features=in_features, hidden=tuple(model_cfg.hidden))
        if not regression:  # images flattened so the MLP also runs on Omniglot
            return _FlatMLP(model)
        return model
    raise UserError(f"model={model_cfg.name!r} is not known; use conv4 or mlp")


class _FlatMLP(TaskGrouped, nn.Module):
    """MLP on flattened images, keeping the body/head split."""

    def __init__(self, mlp: MLP):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), *mlp.body)
        self.head = mlp.head

    def forward(self, x):
        return self.head(self.body(x))

    def grouped_body(self, x: torch.Tensor, params: dict, step: int = 0) -> torch.Tensor:
        # body[0] is the Flatten: [T, N, C, H, W] -> [T, N, C*H*W], then the MLP's layers from index 1
        x = x.flatten(2)
        for index, layer in enumerate(self.body):
            if index:
                x = grouped_linear(x, params, f"body.{index}.") if isinstance(layer, nn.Linear) else layer(x)
        return x
