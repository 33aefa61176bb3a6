"""Tests of the model zoo: shapes, configs, seeding, errors, known parameter counts, tracing."""

from __future__ import annotations

import doctest
import json
import math
import operator

import numpy as np
import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

import accord.zoo
from accord.errors import ModelError
from accord.zoo import MODELS, build_model, model_config
from accord.zoo.resnet import BasicBlock
from accord.zoo.vit import Attention

# (in_channels, image_size, num_classes) every model must handle.
SHAPES = [(1, 28, 10), (3, 32, 100), (1, 8, 10)]


def _cases() -> list[tuple[str, int, int, int, dict[str, int]]]:
    cases = []
    for in_channels, image_size, num_classes in SHAPES:
        for name in MODELS:
            extras: list[dict[str, int]] = [{}]
            if name == "vit":
                extras = [{"patch_size": 4}] + ([{"patch_size": 2}] if image_size == 8 else [])
            cases += [(name, in_channels, image_size, num_classes, extra) for extra in extras]
    return cases


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count(model: nn.Module, kind: type[nn.Module]) -> int:
    return sum(isinstance(module, kind) for module in model.modules())


def test_models_are_the_five_sorted_names() -> None:
    assert MODELS == ("mlp", "resnet20", "vgg11", "vgg16", "vit")
    assert accord.zoo.__all__ == sorted(accord.zoo.__all__)


def test_module_docstring_example_runs() -> None:
    result = doctest.testmod(accord.zoo)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(("name", "in_channels", "image_size", "num_classes", "extra"), _cases())
def test_forward_gives_batch_by_classes(
    name: str, in_channels: int, image_size: int, num_classes: int, extra: dict[str, int]
) -> None:
    model = build_model(
        name, in_channels=in_channels, image_size=image_size, num_classes=num_classes, **extra
    )
    out = model(torch.randn(3, in_channels, image_size, image_size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_every_model_has_the_common_keys_with_their_defaults(name: str) -> None:
    config = model_config(build_model(name))
    assert config["name"] == name
    assert (config["in_channels"], config["image_size"], config["num_classes"]) == (3, 32, 10)


def test_default_configs_are_complete() -> None:
    assert model_config(build_model("mlp")) == {
        "name": "mlp",
        **{"in_channels": 3, "image_size": 32, "num_classes": 10, "width": 128, "depth": 3},
    }
    assert model_config(build_model("vit")) == {
        "name": "vit",
        **{"in_channels": 3, "image_size": 32, "num_classes": 10},
        **{"patch_size": 4, "dim": 64, "depth": 2, "heads": 4, "mlp_ratio": 2.0},
    }
    assert model_config(build_model("vgg16"))["batch_norm"] is False
    assert model_config(build_model("resnet20"))["width"] == 1


def test_mlp_layers_follow_width_and_depth() -> None:
    model = build_model("mlp", in_channels=1, image_size=28, width=32, depth=2)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 32), (32, 32), (32, 10)]
    assert _count(model, nn.ReLU) == 2
    assert _count(model, nn.Flatten) == 1


def _resnet20_params(in_channels: int, width: int, num_classes: int) -> int:
    """ResNet20 parameters counted by hand: bias-free convs, BN (γ, β), projection shortcuts."""
    c1, c2, c3 = 16 * width, 32 * width, 64 * width
    stem = 9 * in_channels * c1 + 2 * c1

    def block(cin: int, cout: int) -> int:
        return 9 * cin * cout + 9 * cout * cout + 4 * cout

    def projection(cin: int, cout: int) -> int:
        return cin * cout + 2 * cout

    stages = 3 * block(c1, c1)
    stages += block(c1, c2) + projection(c1, c2) + 2 * block(c2, c2)
    stages += block(c2, c3) + projection(c2, c3) + 2 * block(c3, c3)
    return stem + stages + c3 * num_classes + num_classes


def test_resnet20_has_the_known_parameter_count() -> None:
    assert _n_params(build_model("resnet20")) == 272_474 == _resnet20_params(3, 1, 10)
    assert _n_params(build_model("resnet20", in_channels=1)) == _resnet20_params(1, 1, 10)


def test_resnet20_width_two_doubles_the_stage_channels() -> None:
    model = build_model("resnet20", width=2, num_classes=100)
    stages = [model.layer1, model.layer2, model.layer3]
    assert [stage[-1].conv2.out_channels for stage in stages] == [32, 64, 128]
    assert _n_params(model) == _resnet20_params(3, 2, 100)


def test_resnet20_projects_exactly_at_stage_changes() -> None:
    model = build_model("resnet20")
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, BasicBlock)}
    assert len(blocks) == 9
    projected = {
        name for name, block in blocks.items() if not isinstance(block.shortcut, nn.Identity)
    }
    assert projected == {"layer2.0", "layer3.0"}
    for name in projected:
        conv, bn = blocks[name].shortcut
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(bn, nn.BatchNorm2d)


def test_resnet20_uses_a_separate_relu_per_use() -> None:
    model = build_model("resnet20")
    relus = [m for _, m in model.named_modules(remove_duplicate=False) if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 9
    assert len({id(m) for m in relus}) == len(relus)


def _vgg_conv_params(channels: list[int], in_channels: int) -> int:
    total, fan_in = 0, in_channels
    for out in channels:
        total += 9 * fan_in * out + out
        fan_in = out
    return total


def test_vgg11_width_scales_channels_and_parameters() -> None:
    full = build_model("vgg11")
    vgg11_channels = [64, 128, 256, 256, 512, 512, 512, 512]
    assert _n_params(full) == _vgg_conv_params(vgg11_channels, 3) + 512 * 10 + 10 == 9_225_610
    quarter = build_model("vgg11", width=0.25)
    convs = [m for m in quarter.modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [c // 4 for c in vgg11_channels]
    assert _n_params(quarter) == _vgg_conv_params([c // 4 for c in vgg11_channels], 3) + 1290


@pytest.mark.parametrize(("name", "convs"), [("vgg11", 8), ("vgg16", 13)])
def test_vgg_batch_norm_flag_adds_one_norm_per_conv(name: str, convs: int) -> None:
    plain, normed = build_model(name), build_model(name, batch_norm=True)
    assert _count(plain, nn.Conv2d) == _count(normed, nn.Conv2d) == convs
    assert _count(plain, nn.BatchNorm2d) == 0
    assert _count(normed, nn.BatchNorm2d) == convs
    assert isinstance(normed.features, nn.Sequential)


@pytest.mark.parametrize(("image_size", "pools", "side"), [(32, 5, 1), (28, 4, 1), (8, 3, 1)])
def test_vgg_skips_pools_that_would_empty_the_map(image_size: int, pools: int, side: int) -> None:
    model = build_model("vgg16", image_size=image_size, width=0.125)
    assert _count(model, nn.MaxPool2d) == pools
    assert model.classifier[-1].in_features == 64 * side * side


def test_vit_attention_matches_the_softmax_formula() -> None:
    torch.manual_seed(0)
    attention = Attention(dim=12, heads=3)
    x = torch.randn(2, 5, 12)
    attention_inputs = (attention.q, attention.k, attention.v)
    q, k, v = (layer(x).reshape(2, 5, 3, 4).transpose(1, 2) for layer in attention_inputs)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 5, 12))
    torch.testing.assert_close(attention(x), expected)
    assert (attention.heads, attention.head_dim) == (3, 4)


def test_vit_embeddings_have_the_documented_shapes() -> None:
    model = build_model("vit", image_size=28, patch_size=4, dim=32, heads=2, mlp_ratio=1.5)
    assert model.cls_token.shape == (1, 1, 32)
    assert model.pos_embed.shape == (1, 7 * 7 + 1, 32)
    assert model.blocks[0].mlp[0].out_features == 48
    assert isinstance(model.blocks[0].mlp[1], nn.GELU)


CONFIGS = [
    ("mlp", {"width": 16, "depth": 1, "in_channels": 1, "image_size": 8}),
    ("vgg11", {"width": 0.25, "batch_norm": True, "num_classes": 7}),
    ("vgg16", {"width": 0.125, "image_size": 28, "in_channels": 1}),
    ("resnet20", {"width": 2, "num_classes": 100}),
    ("vit", {"patch_size": 2, "image_size": 8, "dim": 24, "heads": 3, "depth": 1}),
]


@pytest.mark.parametrize(("name", "config"), CONFIGS)
def test_model_config_rebuilds_the_same_architecture(name: str, config: dict) -> None:
    model = build_model(name, **config)
    saved = json.loads(json.dumps(model_config(model)))
    rebuilt = build_model(**saved)
    shapes = {key: tensor.shape for key, tensor in model.state_dict().items()}
    assert {key: tensor.shape for key, tensor in rebuilt.state_dict().items()} == shapes
    assert model_config(rebuilt) == model_config(model)


def test_model_config_is_a_copy() -> None:
    model = build_model("mlp")
    model_config(model)["width"] = 7
    assert model_config(model)["width"] == 128


def test_model_config_rejects_models_from_elsewhere() -> None:
    with pytest.raises(ModelError, match="build_model"):
        model_config(nn.Linear(2, 2))


def test_numpy_scalars_become_plain_config_values() -> None:
    config = model_config(build_model("vgg11", width=np.float32(0.5), num_classes=np.int64(3)))
    assert type(config["width"]) is float and type(config["num_classes"]) is int


@pytest.mark.parametrize("name", MODELS)
def test_same_seed_gives_identical_weights(name: str) -> None:
    torch.manual_seed(3)
    first = build_model(name).state_dict()
    torch.manual_seed(3)
    second = build_model(name).state_dict()
    torch.manual_seed(4)
    other = build_model(name).state_dict()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_unknown_model_lists_the_valid_names() -> None:
    with pytest.raises(ModelError, match="did you mean 'resnet20'") as error:
        build_model("resnet2O")
    assert all(name in str(error.value) for name in MODELS)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("transformer")


def test_unknown_keys_are_named_with_the_accepted_keys() -> None:
    with pytest.raises(ModelError) as error:
        build_model("mlp", widht=3, colour=True)
    message = str(error.value)
    assert "'widht'" in message and "did you mean 'width'" in message and "'colour'" in message
    keys = "class_embeddings, depth, image_size, in_channels, num_classes, width"
    assert f"accepted keys: {keys}" in message
    with pytest.raises(ModelError, match="batch_norm"):
        build_model("resnet20", batch_norm=True)


@pytest.mark.parametrize(
    ("name", "config", "fragment"),
    [
        ("mlp", {"depth": "3"}, "depth='3' must be an integer"),
        ("mlp", {"width": 2.5}, "width=2.5 must be an integer"),
        ("vgg11", {"width": -1.0}, "width=-1.0 must be positive"),
        ("vgg11", {"width": float("nan")}, "must be positive"),
        ("vgg16", {"batch_norm": 1}, "batch_norm=1 must be True or False"),
        ("resnet20", {"in_channels": True}, "in_channels=True must be an integer"),
        ("vit", {"patch_size": 5}, "patch_size=5 must divide image_size=32"),
        ("vit", {"heads": 5}, "heads=5 must divide dim=64"),
    ],
)
def test_invalid_values_are_rejected(name: str, config: dict, fragment: str) -> None:
    with pytest.raises(ModelError) as error:
        build_model(name, **config)
    assert fragment in str(error.value)


def test_every_config_error_is_reported_at_once() -> None:
    with pytest.raises(ModelError) as error:
        build_model("vgg11", width=0, depht=2, batch_norm="yes")
    message = str(error.value)
    assert "width=0" in message and "'depht'" in message and "batch_norm='yes'" in message


@pytest.mark.parametrize(("name", "config"), CONFIGS)
def test_symbolic_trace_reproduces_the_outputs(name: str, config: dict) -> None:
    torch.manual_seed(0)
    model = build_model(name, **config).eval()
    traced = fx.symbolic_trace(model)
    size = model_config(model)
    x = torch.randn(4, size["in_channels"], size["image_size"], size["image_size"])
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


def test_traced_resnet_shows_the_residual_adds_and_vit_the_attention() -> None:
    resnet = fx.symbolic_trace(build_model("resnet20"))
    adds = [node for node in resnet.graph.nodes if node.target is operator.add]
    assert len(adds) == 9
    vit = fx.symbolic_trace(build_model("vit"))
    sdpa = [n for n in vit.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == 2


def test_vgg_starts_from_xavier_uniform_with_the_relu_gain() -> None:
    torch.manual_seed(0)
    model = build_model("vgg11", width=0.5, xavier_init=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            weight = module.weight.detach()
            fan_in = weight[0].numel()
            fan_out = weight.shape[0] * weight[0, 0].numel()
            bound = math.sqrt(2.0) * math.sqrt(6.0 / (fan_in + fan_out))
            assert float(weight.abs().max()) <= bound * (1 + 1e-6)  # float32 rounding
            assert float(weight.abs().max()) > 0.9 * bound  # uniform: it reaches the bound
            assert torch.count_nonzero(module.bias) == 0
    plain = build_model("vgg11", width=0.5)  # PyTorch's init by default
    assert torch.count_nonzero(plain.features[0].bias) > 0
