"""Property tests of accord.trace on random MLP, CNN and residual architectures.

For every generated network the traced spec must keep the function under random maps of
its free spaces, and a spec with one reader removed from a free space must be caught.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from accord.check import check_spec
from accord.errors import SpecError
from accord.spec import AxisRef, Spec
from accord.trace import trace

pytestmark = pytest.mark.usefixtures("single_thread")

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.Tanh, nn.Identity)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
SIZE = 6


class Residual(nn.Module):
    """``activation(x + body(x))``."""

    def __init__(self, body: nn.Module, activation: nn.Module) -> None:
        super().__init__()
        self.body, self.activation = body, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x + self.body(x))


class Chain(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


widths = st.integers(1, 5)
# Weights come from torch's generator: seeding it from a draw makes failures reproducible.
seeds = st.integers(0, 2**16)
activations = st.sampled_from(ACTIVATIONS).map(lambda cls: cls())


@st.composite
def mlps(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(draw(seeds))
    fan_in = 2 * SIZE * SIZE
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(draw(st.integers(1, 3))):
        width = draw(widths)
        if draw(st.booleans()) and width == fan_in:
            body = nn.Sequential(
                nn.Linear(width, width), draw(activations), nn.Linear(width, width)
            )
            layers.append(Residual(body, draw(activations)))
        else:
            layers += [nn.Linear(fan_in, width), draw(activations)]
        fan_in = width
    layers.append(nn.Linear(fan_in, 3))
    return Chain(layers), torch.randn(8, 2, SIZE, SIZE)


def _conv(draw: st.DrawFn, cin: int, cout: int) -> list[nn.Module]:
    kernel = draw(st.sampled_from((1, 3)))
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2)]
    if draw(st.booleans()):
        norm = nn.BatchNorm2d(cout)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
        layers.append(norm)
    return layers


@st.composite
def cnns(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(draw(seeds))
    channels, size = 2, SIZE
    layers: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 3))):
        width = draw(widths)
        layers += [*_conv(draw, channels, width), draw(activations)]
        if size >= 2 and draw(st.booleans()):
            layers.append(draw(st.sampled_from(POOLS))(2))
            size //= 2
        channels = width
    layers += [nn.Flatten(), nn.Linear(channels * size * size, 3)]
    return Chain(layers), torch.randn(2, 2, SIZE, SIZE)


@st.composite
def resnets(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(draw(seeds))
    width = draw(widths)
    layers: list[nn.Module] = [*_conv(draw, 2, width), draw(activations)]
    for _ in range(draw(st.integers(1, 3))):
        body = [*_conv(draw, width, width), draw(activations), *_conv(draw, width, width)]
        layers.append(Residual(nn.Sequential(*body), draw(activations)))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)]
    return Chain(layers), torch.randn(2, 2, SIZE, SIZE)


networks = st.one_of(mlps(), cnns(), resnets())


@settings(max_examples=25, deadline=None)
@given(networks)
def test_traced_specs_keep_the_function(network: tuple[nn.Module, torch.Tensor]) -> None:
    model, x = network
    spec = trace(model, x)
    assert [s.name for s in spec if not s.free] == ["input", "output"]
    check_spec(spec, model, x)


@settings(max_examples=25, deadline=None)
@given(networks, st.data())
def test_a_missing_reader_is_caught(network: tuple[nn.Module, torch.Tensor], data) -> None:
    model, x = network
    spec = trace(model, x)
    # Size 3 or more: a random permutation of 2 features is the identity half of the time.
    candidates = [s for s in spec.free_spaces if s.readers and s.size >= 3]
    assume(candidates)
    space = data.draw(st.sampled_from(candidates))
    dropped = data.draw(st.integers(0, len(space.readers) - 1))
    assume(_matters(model, x, space.size, space.readers[dropped]))
    readers = space.readers[:dropped] + space.readers[dropped + 1 :]
    broken = Spec([dataclasses.replace(s, readers=readers) if s is space else s for s in spec])

    def caught(seed: int) -> bool:
        try:
            check_spec(broken, model, x, seed=seed)
        except SpecError as exc:
            assert repr(space.name) in str(exc)
            return True
        return False

    assert any(caught(seed) for seed in range(8))


def _matters(model: nn.Module, x: torch.Tensor, size: int, ref: AxisRef) -> bool:
    """Whether every non-identity permutation of the reader's features changes the output.

    Only then must any random map of the space reveal the missing reader: behind a dead ReLU,
    or where a later ReLU is dead on these inputs whatever the order, no map can.
    """
    state = model.state_dict()
    weight = state[ref.tensor]
    span = weight.narrow(ref.axis, ref.offset, size * ref.block)
    blocks = span.unflatten(ref.axis, (size, ref.block))
    with torch.no_grad():
        want = model.eval()(x)
    for order in itertools.permutations(range(size)):
        if list(order) == list(range(size)):
            continue
        moved = weight.clone()
        permuted = blocks.index_select(ref.axis, torch.tensor(order)).flatten(
            ref.axis, ref.axis + 1
        )
        moved.narrow(ref.axis, ref.offset, size * ref.block).copy_(permuted)
        changed = copy.deepcopy(model)
        changed.load_state_dict({**state, ref.tensor: moved})
        with torch.no_grad():
            change = (changed.eval()(x) - want).abs().max() / want.abs().max().clamp_min(1e-12)
        # Far above check's tolerance, so that the change shows whatever the rounding.
        if change <= 1e-3:
            return False
    return True
