"""Evaluation: accuracy and loss as a plain forward computes them, the models left as given."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import accord


def test_evaluation_matches_a_plain_forward_and_leaves_the_weights_as_given() -> None:
    """The passes run convolutions channels-last on the CPU: the same logits up to rounding,
    and every weight its own memory, in the layout it had."""
    torch.manual_seed(0)
    config = {"width": 0.0625, "batch_norm": True, "in_channels": 1, "image_size": 8}
    models = [accord.build_model("vgg11", **config).train() for _ in range(2)]
    inputs, labels = torch.randn(300, 1, 8, 8), torch.randint(0, 10, (300,))
    data = list(zip(inputs.split(100), labels.split(100), strict=True))
    weights = [[(p, p.data_ptr(), p.stride()) for p in m.parameters()] for m in models]
    with torch.no_grad():
        logits = [m.eval()(inputs) for m in models]
    for model in models:
        model.train()
    logits.append(torch.stack(logits).mean(0))
    expected = [
        (float((out.argmax(1) == labels).float().mean()), float(F.cross_entropy(out, labels)))
        for out in logits
    ]
    each, ensemble = accord.evaluate_with_ensemble(models, data)
    found = [accord.evaluate(models[0], data), *each, ensemble]
    for got, (accuracy, loss) in zip(found, [expected[0], *expected], strict=True):
        assert got.count == 300 and got.accuracy == pytest.approx(accuracy, abs=1 / 300)
        assert got.loss == pytest.approx(loss, rel=1e-5)
    for model, held in zip(models, weights, strict=True):
        assert model.training  # its mode given back
        for parameter, address, stride in held:
            assert parameter.data_ptr() == address and parameter.stride() == stride
