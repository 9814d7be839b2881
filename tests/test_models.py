"""sctune.core.models: built-in shapes, the paper's CIFAR ResNets, torchvision names, dropout, the registry."""

import math

import pytest
import torch
from torch import nn

from sctune.core.config import ConfigError
from sctune.core.models import BasicBlock, CifarResNet, build_model, register_model
from sctune.core.tasks import MODELS

# name -> an input shape the model is meant for
BUILTIN_INPUTS = {
    "digits_cnn": (1, 8, 8),
    "mnist1d_cnn": (1, 40),
    "mlp": (1, 8, 8),
    "resnet20": (3, 32, 32),
    "resnet56": (3, 32, 32),
    "resnet110": (3, 32, 32),
}


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(MODELS, "entries", dict(MODELS.entries))
    return MODELS.entries


def test_builtins_listed():
    names = MODELS.names()
    assert set(BUILTIN_INPUTS) <= set(names)
    assert "torchvision:<name>" in names


@pytest.mark.parametrize("name", sorted(BUILTIN_INPUTS))
def test_builtin_forward_shape(name):
    shape = BUILTIN_INPUTS[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, input_shape=shape).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_mnist1d_cnn_other_lengths():
    for length in (37, 64):
        model = build_model("mnist1d_cnn", num_classes=10, input_shape=(2, length)).eval()
        assert model(torch.randn(3, 2, length)).shape == (3, 10)


@pytest.mark.parametrize("name", sorted(BUILTIN_INPUTS))
def test_builtin_dropout_knob(name):
    model = build_model(name, num_classes=5, input_shape=BUILTIN_INPUTS[name], dropout=0.3)
    probs = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert probs and all(p == 0.3 for p in probs)
    # with dropout in train mode two passes differ; in eval mode they agree
    x = torch.randn(4, *BUILTIN_INPUTS[name])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        for m in model.modules():  # keep BN out of it: only dropout is random
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(("depth", "blocks", "approx_params"), [(20, 9, 0.27e6), (56, 27, 0.85e6), (110, 54, 1.7e6)])
def test_cifar_resnet_depths(depth, blocks, approx_params):
    model = build_model(f"resnet{depth}", num_classes=10, input_shape=(3, 32, 32))
    assert isinstance(model, CifarResNet)
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == blocks
    # He et al. 2016 Table 6: 0.27M / 0.85M / 1.7M (option A); option B projections add ~3k.
    assert _n_params(model) == pytest.approx(approx_params, rel=0.03)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == depth - 1  # depth = 3x3 convs + the final linear layer
    assert {c.out_channels for c in convs} == {16, 32, 64}


def test_cifar_resnet_downsampling_and_channels():
    model = CifarResNet(20, num_classes=3, in_channels=1).eval()
    feats = model.layers(model.stem(torch.randn(1, 1, 32, 32)))
    assert feats.shape == (1, 64, 8, 8)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("depth", [21, 2, 0])
def test_cifar_resnet_bad_depth(depth):
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(depth)


def test_torchvision_resnet18():
    model = build_model("torchvision:resnet18", num_classes=7, input_shape=(3, 32, 32))
    assert model.fc.out_features == 7
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    with_dropout = build_model("torchvision:resnet18", num_classes=7, input_shape=(3, 32, 32), dropout=0.2)
    assert isinstance(with_dropout.fc, nn.Sequential)
    assert isinstance(with_dropout.fc[0], nn.Dropout) and with_dropout.fc[0].p == 0.2
    assert with_dropout.fc[1].out_features == 7
    assert with_dropout.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("name", ["resnet57", "torchvision:not_a_model", "digits-cnn"])
def test_unknown_model(name):
    with pytest.raises(ConfigError) as info:
        build_model(name, num_classes=10, input_shape=(3, 32, 32))
    assert info.value.path == "task.model"


def test_register_model(registry):
    @register_model("tiny")
    def tiny(num_classes, input_shape, dropout=0.0):
        return nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(math.prod(input_shape), num_classes))

    assert "tiny" in MODELS.names()
    model = build_model("tiny", num_classes=3, input_shape=[2, 2], dropout=0.1)
    assert model(torch.randn(5, 2, 2)).shape == (5, 3)
    assert model[1].p == 0.1
    with pytest.raises(ValueError, match="already registered"):
        register_model("tiny", tiny)
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet56", tiny)
    register_model("tiny", lambda nc, shape, dropout: nn.Linear(1, nc), overwrite=True)
    assert isinstance(build_model("tiny", num_classes=2, input_shape=(1,)), nn.Linear)


def test_registry_fixture_isolated():
    assert "tiny" not in MODELS.names()
