"""The contract every registered merge method passes, driven by the registries.

Every alignment (:data:`accord.ALIGNMENTS`, averaged) and every combiner that
:func:`accord.merge` runs (:data:`accord.COMBINERS` without a base, on its default alignment)
is covered here without editing this file: merging
one model, a model with itself or with identical copies returns it; inputs are never
modified; reruns are bit-identical; outputs are finite; and an aligning method brings
randomly permuted copies back onto the model, on random architectures and seeds
(hypothesis) as well as on the zoo's.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import accord
from accord.batchnorm import has_batchnorm
from accord.trace.programs import shared_exports
from test_trace_property import networks


@pytest.fixture
def one_export() -> Iterator[None]:
    """A test's twins and merges share one export per architecture (the merge's own sharing,
    test_programs.py, widened to the whole test): merges are what these tests check."""
    with shared_exports():
        yield


pytestmark = pytest.mark.usefixtures("single_thread", "one_export")

# Options that keep a method short here (NP Merge: one epoch of training).
SHORT = {"npmerge": {"epochs": 1}}
COMBINING = [name for name, r in sorted(accord.COMBINERS.items()) if r.needs.base != "yes"]
METHODS = {name: SHORT.get(name, {}) for name in [*sorted(accord.ALIGNMENTS), *COMBINING]}
ALIGNING = [name for name, info in sorted(accord.ALIGNMENTS.items()) if info.aligns] + [
    name for name in COMBINING if accord.ALIGNMENTS[accord.COMBINERS[name].default_align].aligns
]
ZOO = {
    "mlp": {"width": 12, "depth": 2, "in_channels": 1, "image_size": 6},
    "vgg11-bn": {"width": 0.0625, "batch_norm": True, "in_channels": 1, "image_size": 8},
    "resnet20": {"width": 0.25, "in_channels": 1, "image_size": 8},
}
TOLERANCE = 1e-5


def _calibration(inputs_shape: tuple[int, ...], samples: int = 256) -> list:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(samples, *inputs_shape, generator=generator)
    labels = torch.randint(0, 3, (samples,), generator=generator)
    return [(inputs, labels)]


def _prepared(model: nn.Module, data: list) -> nn.Module:
    """The model with BatchNorm statistics of ``data`` (one batch), so a BatchNorm reset on
    that data leaves its function unchanged and the merge can be compared with it exactly."""
    model = model.eval()
    return accord.reset_batchnorm(model, data) if has_batchnorm(model) else model


def _zoo(name: str) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    config = ZOO[name]
    model = accord.build_model(name.removesuffix("-bn"), **config)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    data = _calibration((config["in_channels"], config["image_size"], config["image_size"]))
    return _prepared(model, data), data


def _difference(a: nn.Module, b: nn.Module, inputs: torch.Tensor) -> float:
    """Largest logit difference relative to the largest logit, both models run in float64.

    The contract is about the function the merged weights define. A float32 forward adds
    rounding of its own that BatchNorm multiplies by γ/√(var + eps): up to 316 on a channel
    that is constant on the data (behind a dead ReLU). No statistic tells such channels apart,
    so a twin's order of them is not undone (any order computes the function) and the merged
    constants differ from the model's, with them the float32 rounding: by 1.4e-5 of the
    logits on a random architecture, where float64 gives 1e-14.
    """
    a, b = copy.deepcopy(a).double(), copy.deepcopy(b).double()
    with torch.no_grad():
        want, got = a.eval()(inputs.double()), b.eval()(inputs.double())
    return float((want - got).abs().max() / want.abs().max().clamp_min(1e-12))


def _merges(method: str, count: int) -> bool:
    """Whether ``method`` merges ``count`` models (SLERP: exactly two)."""
    record = accord.ALIGNMENTS.get(method) or accord.COMBINERS[method]
    return record.needs.model_count_problem(method, count) is None


def _merge(models: list[nn.Module], data: list, method: str) -> accord.MergeResult:
    return accord.merge(models, data, method=method, **METHODS[method])


def _twins(model: nn.Module, data: list, count: int, seed: int) -> list[nn.Module]:
    spec = accord.trace(model, data[0][0][:2])
    twins = [accord.randomly_permuted(model, spec, seed=seed + k) for k in range(count)]
    for twin in twins:
        assert _difference(model, twin, data[0][0]) < 1e-5  # the same function
    return twins


@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_identical_copies_give_the_model_back(method: str, arch: str) -> None:
    model, data = _zoo(arch)
    for count in [c for c in (2, 3) if _merges(method, c)]:
        copies = [copy.deepcopy(model) for _ in range(count)]
        merged = _merge(copies, data, method).model
        assert _difference(model, merged, data[0][0]) <= TOLERANCE


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_model_gives_the_model_back(method: str) -> None:
    model, data = _zoo("vgg11-bn")
    merged = _merge([model], data, method).model
    assert merged is not model
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_inputs_are_kept_reruns_are_identical_outputs_finite(method: str) -> None:
    model, data = _zoo("resnet20")
    other = _prepared(accord.build_model("resnet20", **ZOO["resnet20"]), data)
    before = [copy.deepcopy(m.state_dict()) for m in (model, other)]
    first = _merge([model, other], data, method).model.state_dict()
    second = _merge([model, other], data, method).model.state_dict()
    for m, state in zip((model, other), before, strict=True):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(first[k], v) for k, v in second.items())
    assert all(bool(torch.isfinite(v).all()) for v in first.values() if v.is_floating_point())


@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("method", ALIGNING)
def test_permuted_copies_of_zoo_models_are_brought_back(method: str, arch: str) -> None:
    model, data = _zoo(arch)
    for seed, count in [(s, c) for s, c in ((0, 1), (9, 2)) if _merges(method, c + 1)]:
        merged = _merge([model, *_twins(model, data, count, seed)], data, method).model
        assert _difference(model, merged, data[0][0]) <= TOLERANCE, (seed, count)


@pytest.mark.parametrize("method", ALIGNING)
# 20 random architectures per method: each example exports its architecture once (the
# one_export fixture), its main cost
@settings(max_examples=20, deadline=None)
@given(network=networks, seed=st.integers(0, 2**16), count=st.integers(1, 2))
def test_permuted_copies_of_random_architectures_are_brought_back(
    method: str, network: tuple[nn.Module, torch.Tensor], seed: int, count: int
) -> None:
    assume(_merges(method, count + 1))
    model, example = network
    data = _calibration(tuple(example.shape[1:]))
    model = _prepared(model, data)
    merged = _merge([model, *_twins(model, data, count, seed)], data, method).model
    assert _difference(model, merged, data[0][0]) <= TOLERANCE
