"""Partial merging (accord.merge(..., stop_at=k), accord.partial): the ensemble at k = 0, the
full merge at k = all, permuted twins exact at every k, and the cost of what is kept."""

from __future__ import annotations

import itertools

import pytest
import torch

import accord
from accord.batchnorm import has_batchnorm
from accord.errors import MergeError
from accord.trace.programs import shared_exports

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "vgg11-bn": ("vgg11", {"width": 0.0625, "batch_norm": True}),
    "vgg11": ("vgg11", {"width": 0.0625}),
    "resnet20": ("resnet20", {"width": 0.25}),
}


def _models(key: str, count: int) -> tuple[list[torch.nn.Module], list]:
    arch, config = CONFIGS[key]
    torch.manual_seed(0)
    models = [
        accord.build_model(arch, in_channels=1, image_size=8, **config).eval() for _ in range(count)
    ]
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(96, 1, 8, 8, generator=generator)
    data = [(inputs, torch.randint(0, 10, (96,), generator=generator))]
    for model in models:
        if has_batchnorm(model):
            accord.reset_batchnorm(model, data)
    return models, data


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_the_ends_are_the_ensemble_and_the_full_merge(key: str) -> None:
    models, data = _models(key, 3)
    inputs = data[0][0]
    ensemble = torch.stack([m(inputs) for m in models]).mean(0)
    nothing = accord.merge(models, data, stop_at=0)
    torch.testing.assert_close(nothing.model(inputs), ensemble, atol=1e-6, rtol=0)
    one = accord.parameters_kept(models[0])
    assert nothing.report["partial"]["parameters"] == 3 * one
    full = accord.merge(models, data)
    spaces = len(full.spec.free_spaces)
    everything = accord.merge(models, data, stop_at=spaces)
    torch.testing.assert_close(everything.model(inputs), full.model(inputs), atol=1e-5, rtol=0)
    assert everything.report["partial"]["parameters"] == one


@pytest.mark.parametrize("key", ["vgg11-bn", "resnet20"])
def test_the_cost_falls_as_the_trunk_grows_and_the_trunk_is_shared(key: str) -> None:
    models, data = _models(key, 2)
    kept = []
    with shared_exports():  # one export for all the merges of one architecture
        spec = accord.trace(models[0], data[0][0][:2])
        for k in range(len(spec.free_spaces) + 1):
            model = accord.merge(models, data, "permutation", spec, stop_at=k).model
            kept.append(accord.parameters_kept(model))
            for name in model.trunk:
                branches = model.branches
                assert branches[0].get_submodule(name) is branches[1].get_submodule(name)
    assert all(a >= b for a, b in itertools.pairwise(kept))
    assert kept[0] > kept[-1]


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_permuted_twins_give_the_model_at_every_k(key: str) -> None:
    models, data = _models(key, 1)
    model = models[0]
    spec = accord.trace(model, data[0][0][:2])
    twins = [model, accord.randomly_permuted(model, spec, seed=3)]
    inputs = data[0][0]
    with shared_exports():
        for k in range(len(spec.free_spaces) + 1):
            result = accord.merge(twins, data, "permutation", spec, stop_at=k)
            torch.testing.assert_close(result.model(inputs), model(inputs), atol=1e-5, rtol=1e-5)


def test_bad_requests_name_the_remedy() -> None:
    models, data = _models("vgg11", 2)
    with pytest.raises(MergeError, match=r"stop_at=99: .* from 0 \(the ensemble\) to 8"):
        accord.merge(models, data, stop_at=99)
    with pytest.raises(MergeError, match="fixed options"):
        accord.merge(models, data, stop_at=1, options="auto", validation=data)
    with pytest.raises(MergeError, match="tensorwise combiner"):
        accord.merge(models, data, "npmerge", stop_at=1)
