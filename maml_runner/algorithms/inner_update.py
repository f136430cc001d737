"""The inner-loop update every gradient-based meta-learner here shares: one SGD step `p - rate * g`.

The rate is MAML's plain α (a float), MAML++'s learned per-layer per-step rates or Meta-SGD's learned per-parameter
rates (`Rate` callables below). The same function runs on a task's parameters (per-task loop) and on a meta-batch's
per-task copies [T, *shape] (task-grouped fast path): a rate shaped like the parameter broadcasts over the task
dimension. One expression in one op order, so the two paths compute the same numbers.
"""
from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
from torch import nn

# (parameter name, inner step) -> the step size for that parameter: a number, a scalar tensor or a tensor shaped like
# the parameter.
Rate = Union[float, Callable[[str, int], Union[float, torch.Tensor]]]


def inner_update(params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor | None], rate: Rate,
                 step: int = 0) -> dict[str, torch.Tensor]:
    """`params` after one SGD step at inner step `step`: `p - rate * g` for every parameter with a gradient in
    `grads`; the others (not adapted, or unused by the loss) stay as they are."""
    rate_of = rate if callable(rate) else (lambda name, step: rate)
    return {name: p if grads.get(name) is None else p - rate_of(name, step) * grads[name]
            for name, p in params.items()}


def per_step_rates(table: Mapping[str, torch.Tensor], key: Callable[[str], str] = lambda name: name) -> Rate:
    """MAML++'s LSLR: `table[key(name)]` holds one rate per inner step; a step beyond those reuses the last."""
    def rate(name: str, step: int) -> torch.Tensor:
        rates = table[key(name)]
        return rates[min(step, rates.shape[0] - 1)]
    return rate


def per_parameter_rates(names: list[str], rates: list[torch.Tensor]) -> Rate:
    """Meta-SGD: one learned rate tensor per parameter, shaped like it (learn2learn MetaSGD's `lrs`, in the order of
    `model.parameters()`)."""
    by_name = dict(zip(names, rates))
    return lambda name, step: by_name[name]


def set_parameters(module: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Makes `module` (a learn2learn clone, whose parameters are non-leaf tensors) compute with `params`, by name, as
    learn2learn's update_module does."""
    for name, value in params.items():
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._parameters[leaf] = value
