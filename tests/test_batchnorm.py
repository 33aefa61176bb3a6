"""accord.batchnorm: folding keeps the function, the targets follow their formulas, the reset
recomputes running statistics, and bad input names what is wrong."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import accord
from accord.batchnorm import (
    batchnorm_as_writers,
    batchnorm_targets,
    fold_batchnorms,
    has_batchnorm,
    require_folded,
    reset_batchnorm,
)
from accord.errors import MergeError, SpecError
from accord.statistics import SpaceStatistics, Statistics


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 2),
    )
    norm = model[1]
    with torch.no_grad():  # statistics and affine parameters far from the identity
        norm.running_mean.uniform_(-2, 2)
        norm.running_var.uniform_(0.5, 3)
        norm.weight.uniform_(0.5, 2)
        norm.bias.uniform_(-1, 1)
    return model.eval()


def test_folding_keeps_the_function_and_leaves_an_identity_batchnorm() -> None:
    model = _model()
    inputs = torch.randn(6, 3, 5, 5)
    spec = accord.trace(model, inputs[:2])
    folded = copy.deepcopy(model)
    state = fold_batchnorms(model, spec)
    folded.load_state_dict(state)
    torch.testing.assert_close(folded(inputs), model(inputs), rtol=1e-5, atol=1e-5)
    assert torch.equal(state["1.weight"], torch.ones(4))
    assert torch.equal(state["1.running_mean"], torch.zeros(4))
    assert torch.equal(state["0.bias"], torch.zeros(4))
    require_folded(state, "1", "0")  # folded: no error
    with pytest.raises(SpecError, match="BatchNorm '1' must be folded"):
        require_folded(model.state_dict(), "1", "0")
    torch.testing.assert_close(model[0].bias, _model()[0].bias)  # the input is kept


def test_the_transform_route_moves_gamma_and_beta_to_the_writers() -> None:
    model = _model()
    spec = accord.trace(model, torch.randn(2, 3, 5, 5))
    moved = batchnorm_as_writers(spec, ["0"])["0"]
    assert moved.batchnorms == ()
    assert {"1.weight", "1.bias"} <= {r.tensor for r in moved.writers}
    assert not any(
        r.tensor.startswith("1.") and r.tensor[2:] in ("weight", "bias") for r in moved.elementwise
    )


def test_targets_are_the_weighted_transformed_statistics() -> None:
    model = _model()
    spec = accord.trace(model, torch.randn(2, 3, 5, 5))
    means = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 0.0, -1.0, 2.0]], dtype=torch.float64)
    variances = torch.tensor([[1.0, 4.0, 9.0, 16.0], [3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    blocks = {(i, i): torch.diag(variances[i]) for i in range(2)}
    statistics = Statistics({}, 2, norms={"1": SpaceStatistics(100, means, blocks)})
    swap = torch.eye(4, dtype=torch.float64)[[1, 0, 2, 3]]  # model 1's map swaps channels 0, 1
    maps = {"0": [torch.eye(4, dtype=torch.float64), swap]}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batchnorm_targets(spec, maps, statistics, state, {"1": 0.5})
    mean = (means[0] + swap @ means[1]) / 2
    variance = (variances[0] + swap @ variances[1]) / 2
    torch.testing.assert_close(state["1.bias"], mean.float())
    torch.testing.assert_close(state["1.weight"], (variance + 0.5).sqrt().float())
    batchnorm_targets(spec, maps, statistics, state, {"1": 0.5}, weights=[0.0, 1.0])
    torch.testing.assert_close(state["1.bias"], (swap @ means[1]).float())
    with pytest.raises(MergeError, match="no statistics for BatchNorm '1'"):
        batchnorm_targets(spec, maps, Statistics({}, 2), state, {"1": 0.5})


def test_reset_recomputes_the_running_statistics() -> None:
    model = _model()
    momentum = model[1].momentum
    inputs = torch.randn(2, 16, 3, 5, 5)
    reset_batchnorm(model, [(batch, None) for batch in inputs])
    features = torch.stack([model[0](batch) for batch in inputs])  # (batch, N, C, H, W)
    batch_means = features.mean((1, 3, 4))
    batch_variances = features.transpose(1, 2).flatten(2).var(2)  # unbiased, as BatchNorm's
    with torch.no_grad():
        torch.testing.assert_close(model[1].running_mean, batch_means.mean(0))
        torch.testing.assert_close(model[1].running_var, batch_variances.mean(0))
    assert model[1].momentum == momentum and not model.training
    assert has_batchnorm(model) and not has_batchnorm(nn.Linear(2, 2))
    with pytest.raises(MergeError, match="the data given was empty"):
        reset_batchnorm(model, [])
