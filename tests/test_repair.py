"""REPAIR under dense maps: the targets are the models' own statistics carried by their maps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import accord
from accord.repair import _writer_modules


def _outputs(model: torch.nn.Module, module: str, inputs: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` when ``model`` runs on ``inputs``."""
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[module].register_forward_hook(
        lambda _m, _i, output: seen.append(output.detach())
    )
    with torch.no_grad():
        model(inputs)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("batches", [1, 4])
def test_repair_targets_under_a_dense_map_are_the_mapped_statistics_of_each_model(
    batches: int,
) -> None:
    """After CCA + REPAIR, every merged channel of every hidden layer has mean avg_i (T_i μ_i)
    and std avg_i sqrt(diag(T_i Σ_i T_iᵀ)), from each model's own pre-activations y_i (the
    samples of T_i y_i), and not the statistics of the aligned models, which a dense map
    before a ReLU makes compute another function. Exact over the whole data however it is
    batched: each layer is measured with the layers before it repaired."""
    torch.manual_seed(0)
    models = [
        accord.build_model("mlp", width=12, depth=2, in_channels=1, image_size=4) for _ in range(2)
    ]
    inputs = torch.randn(400, 1, 4, 4)
    labels = torch.zeros(400, dtype=torch.long)
    data = list(zip(inputs.chunk(batches), labels.chunk(batches), strict=True))
    result = accord.merge(models, data, method="cca", repair="repair")
    assert result.report["dense_spaces"]
    drift = 0.0
    for space in ("layers.1", "layers.3"):
        mapped = [
            _outputs(model, space, inputs).double() @ transforms[space].matrix.T
            for model, transforms in zip(models, result.transforms, strict=True)
        ]
        target_mean = torch.stack([z.mean(0) for z in mapped]).mean(0)
        target_std = torch.stack([z.std(0, unbiased=False) for z in mapped]).mean(0)
        merged = _outputs(result.model, space, inputs).double()
        torch.testing.assert_close(merged.mean(0), target_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged.std(0, unbiased=False), target_std, rtol=1e-4, atol=1e-4)
        endpoint = copy.deepcopy(models[0])
        endpoint.load_state_dict(result.aligned[1])
        measured = _outputs(endpoint, space, inputs).double().std(0, unbiased=False)
        drift = max(drift, float((measured - target_std).abs().max()))
    # the aligned model's deeper channels drifted: the targets above are not its statistics
    assert drift > 1e-3


def test_repair_of_convolutions_meets_the_permuted_targets_and_keeps_the_weight_layout() -> None:
    """A VGG without BatchNorm, permutation + REPAIR over 3 batches: every merged convolution
    channel has the average of the models' own statistics, permuted. The measuring passes
    run channels-last on the CPU, and each rescale lands in the weights as given."""
    torch.manual_seed(0)
    config = {"width": 0.0625, "in_channels": 1, "image_size": 8}
    models = [accord.build_model("vgg11", **config).eval() for _ in range(2)]
    inputs = torch.randn(300, 1, 8, 8)
    data = [(x, torch.zeros(len(x), dtype=torch.long)) for x in inputs.split(100)]
    result = accord.merge(models, data, method="permutation", repair="repair")
    writers = _writer_modules(result.model, result.spec)
    convolutions = [n for n in writers if isinstance(result.model.get_submodule(n), nn.Conv2d)]
    assert len(convolutions) >= 4
    for name in convolutions:
        space = writers[name]
        targets = []
        for model, maps in zip(models, result.transforms, strict=True):
            own = _outputs(model, name, inputs).transpose(0, 1).flatten(1).double()
            order = maps[space].permutation
            targets.append((own.mean(1)[order], own.std(1, unbiased=False)[order]))
        merged = _outputs(result.model, name, inputs).transpose(0, 1).flatten(1).double()
        target_mean = torch.stack([m for m, _ in targets]).mean(0)
        target_std = torch.stack([s for _, s in targets]).mean(0)
        torch.testing.assert_close(merged.mean(1), target_mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(merged.std(1, unbiased=False), target_std, rtol=1e-4, atol=1e-4)
        given = models[0].get_submodule(name).weight  # the layout every model's weights have
        assert result.model.get_submodule(name).weight.stride() == given.stride()
