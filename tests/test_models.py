from __future__ import annotations

import pytest
import torch

from conftest import compose_config
from maml_runner.errors import UserError
from maml_runner.models import Conv4, build_model


def test_conv4_matches_finn2017_architecture():
    model = Conv4(out_features=5)
    convs = [m for m in model.body if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and all(c.out_channels == 64 and c.stride == (2, 2) and c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.body) == 4
    assert model(torch.rand(7, 1, 28, 28)).shape == (7, 5)


def test_transductive_bn_uses_batch_statistics_in_eval_mode():
    model = Conv4(out_features=5, bn="transductive").eval()
    x = torch.rand(10, 1, 28, 28)
    # batch statistics: the output for the first five images depends on the other five
    assert not torch.allclose(model(x)[:5], model(torch.cat([x[:5], x[5:] * 3]))[:5])
    running = Conv4(out_features=5, bn="running").eval()
    assert torch.allclose(running(x)[:5], running(torch.cat([x[:5], x[5:] * 3]))[:5], atol=1e-6)


def test_mlp_for_sinusoid_is_1_40_40_1():
    model = build_model(compose_config().model, compose_config().dataset)
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes == [(40, 1), (40,), (40, 40), (40,), (1, 40), (1,)]


def test_conv4_on_sinusoid_is_rejected():
    cfg = compose_config(["model=conv4"])
    with pytest.raises(UserError, match="model=conv4 needs images"):
        build_model(cfg.model, cfg.dataset)


def test_mlp_runs_on_images():
    cfg = compose_config(["dataset=omniglot_5w1s", "model=mlp"])
    model = build_model(cfg.model, cfg.dataset)
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 5)
