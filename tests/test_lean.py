"""Tests of accord.trace.lean: BatchNorms fused into the layer before them and in-place
operators give every observed node the value of the graph as exported."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from accord.trace.lean import fold_batchnorms, in_place, lean_bindings
from accord.trace.observe import call_after, observed_model, traced_module
from accord.trace.programs import shared_exports

pytestmark = pytest.mark.usefixtures("single_thread")
aten = torch.ops.aten


class Block(nn.Module):
    """Conv-BN-ReLU twice with a shortcut conv-BN, a ReLU whose input is read again after it,
    a BatchNorm after a convolution that something else reads too, and Linear-BatchNorm1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.short, self.bn_short = nn.Conv2d(3, 6, 1, bias=False), nn.BatchNorm2d(6)
        self.conv3, self.bn3 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6, affine=False)
        self.fc, self.bn_fc = nn.Linear(6, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + self.bn_short(self.short(x)))
        c = self.conv3(h)
        g = torch.relu(self.bn3(c)) + c  # conv3's output is read twice: no fold
        r = torch.relu(g)
        g = r + g  # relu's input is read after it: not in place
        return self.bn_fc(self.fc(g.mean((2, 3))))


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = Block()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.3, 3)
            if module.affine:
                module.weight.data.uniform_(-2, 2)
                module.bias.data.uniform_(-1, 1)
    return model.eval()


class _Cloner(nn.Module):
    """Keeps a copy of each observed output, as the statistics observer is done with it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, tensor: Any, node: str) -> None:
        self.seen[node] = tensor.clone()


def _lean(model: nn.Module, x: torch.Tensor, nodes: list[str]) -> tuple[Any, _Cloner, list]:
    module = traced_module(model, x)
    cloner = _Cloner()
    call_after(module, cloner, [(n, (n,)) for n in nodes], "Block")
    folds = fold_batchnorms(module, model)
    in_place(module, "accord_observer")
    return module, cloner, folds


def _targets(module: torch.fx.GraphModule) -> dict[str, Any]:
    return {n.name: n.target for n in module.graph.nodes if n.op == "call_function"}


def test_folds_and_in_place_ops_keep_every_observed_value() -> None:
    model, x = _model(0), torch.randn(5, 3, 6, 6)
    with torch.inference_mode():
        plain = traced_module(model, x)
        # every node but the layers: an observed layer's output is read twice, so no fold
        layers = (aten.conv2d.default, aten.linear.default)
        nodes = [
            n.name for n in plain.graph.nodes if n.op == "call_function" and n.target not in layers
        ]
        exact_model = observed_model(model, nodes, x)
        want_output, want = exact_model(x)
        module, cloner, folds = _lean(model, x, nodes)
        got_output = module(x)
    targets = _targets(module)
    norms = [n for n, t in targets.items() if t == aten.batch_norm.default]
    # three folds into convolutions and one into the linear layer; bn3 stays
    assert [f.name for f in folds] == ["bn1", "bn2", "bn_short", "bn_fc"] and norms == ["bn3"]
    assert {targets[f.name] for f in folds} == {aten.conv2d.default, aten.linear.default}
    assert aten.relu_.default in targets.values() and aten.add_.Tensor in targets.values()
    assert aten.relu.default in targets.values()  # the ReLU whose input is read later
    assert set(cloner.seen) == {n for n in nodes if n in targets}
    for name, value in cloner.seen.items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got_output, want_output, rtol=1e-5, atol=1e-5)


def test_folded_tensors_rebind_to_each_model() -> None:
    """One graph runs two models in turn with each one's folded tensors, as the statistics
    pass binds them."""
    models, x = [_model(0), _model(1)], torch.randn(4, 3, 6, 6)
    with shared_exports(), torch.inference_mode():
        module, _, folds = _lean(models[0], x, [])
        bound = [lean_bindings(module, folds, m) for m in models]
        for model in (models[1], models[0], models[1]):
            for slots, name, tensor in bound[models.index(model)]:
                slots[name] = tensor
            torch.testing.assert_close(module(x), model(x), rtol=1e-5, atol=1e-5)


def test_nothing_is_rewritten_where_the_input_is_read_later() -> None:
    class Twice(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x + 1
            return (torch.relu(y) + y) + (y + y)

    x = torch.randn(3, 4)
    module = traced_module(Twice(), x)
    assert in_place(module, "accord_observer") == 2
    # x is the input; y is read after the ReLU; y + y adds y to itself
    assert list(_targets(module).values()) == [
        aten.add.Tensor,
        aten.relu.default,
        aten.add_.Tensor,
        aten.add.Tensor,
        aten.add_.Tensor,
    ]
    with torch.inference_mode():
        torch.testing.assert_close(module(x), Twice()(x))
