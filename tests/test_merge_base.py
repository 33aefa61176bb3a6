"""accord.merge with base=: the combiners that merge task vectors (their record says they need
a base) on fine-tuned copies of one vision model, checked against merge_state_dicts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import accord

NEED_BASE = sorted(name for name, r in accord.COMBINERS.items() if r.needs.base == "yes")


def _fine_tunes() -> tuple[nn.Module, list[nn.Module], list[tuple[torch.Tensor, torch.Tensor]]]:
    """A tiny zoo model, two copies of it with perturbed weights, and a batch of its inputs."""
    torch.manual_seed(0)
    base = accord.build_model("mlp", width=8, depth=1, in_channels=1, image_size=4)
    tuned = []
    for _ in range(2):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        tuned.append(model)
    data = [(torch.randn(8, 1, 4, 4), torch.zeros(8, dtype=torch.long))]
    return base, tuned, data


def test_ties_with_a_base_merges_the_aligned_task_vectors() -> None:
    base, tuned, data = _fine_tunes()
    result = accord.merge(
        tuned, data, align="identity", combine="ties", base=base, repair="none", density=0.5
    )
    states = [model.state_dict() for model in tuned]
    expected = accord.merge_state_dicts(states, "ties", base=base.state_dict(), density=0.5)
    merged = result.model.state_dict()
    assert merged.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7)
    # TIES keeps half of each task vector: the merge is neither model nor the base
    assert not torch.allclose(merged["layers.1.weight"], base.state_dict()["layers.1.weight"])
    # a state dict serves as the base as well as the module
    again = accord.merge(
        tuned,
        data,
        align="identity",
        combine="ties",
        base=base.state_dict(),
        repair="none",
        density=0.5,
    )
    for name, tensor in again.model.state_dict().items():
        torch.testing.assert_close(tensor, merged[name])


@pytest.mark.parametrize("name", NEED_BASE)
def test_every_combiner_that_needs_a_base_takes_it(name: str) -> None:
    base, tuned, data = _fine_tunes()
    result = accord.merge(tuned, data, align="identity", combine=name, base=base, repair="none")
    states = [model.state_dict() for model in tuned]
    expected = accord.merge_state_dicts(states, name, base=base.state_dict())
    for key, tensor in expected.items():
        torch.testing.assert_close(result.model.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)


def test_a_missing_or_unwanted_base_names_the_combiner() -> None:
    base, tuned, data = _fine_tunes()
    assert "ties" in NEED_BASE and "dare" in NEED_BASE
    for name in NEED_BASE:
        with pytest.raises(accord.MergeError, match=f"combine='{name}' merges task vectors"):
            accord.merge(tuned, data, align="identity", combine=name)
    with pytest.raises(accord.MergeError, match="combine='average' has no task vectors"):
        accord.merge(tuned, data, align="identity", base=base)


def test_a_base_of_another_model_is_refused_before_any_work() -> None:
    base, tuned, data = _fine_tunes()
    other = accord.build_model("mlp", width=9, depth=1, in_channels=1, image_size=4)
    with pytest.raises(
        accord.MergeError, match=r"parameter 'layers\.1\.weight' has shape \(9, 16\) in the base"
    ):
        accord.merge(tuned, data, align="identity", combine="ties", base=other)
    with pytest.raises(accord.MergeError, match=r"is torch\.float64 in the base"):
        accord.merge(
            tuned, data, align="identity", combine="ties", base=copy.deepcopy(base).double()
        )
    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(accord.MergeError, match="the base"):
        accord.merge(tuned, data, align="identity", combine="ties", base=broken)
    with pytest.raises(accord.MergeError, match="the base is a Linear"):
        accord.merge(tuned, data, align="identity", combine="ties", base=nn.Linear(2, 2))


def test_tuned_options_keep_the_base() -> None:
    base, tuned, data = _fine_tunes()
    result = accord.merge(
        tuned,
        data,
        align="identity",
        combine="ties",
        base=base,
        repair="none",
        validation=data,
        options="auto",
    )
    density = result.report["combine_options"]["density"]
    assert density in accord.COMBINERS["ties"].grid()["density"]
    states = [model.state_dict() for model in tuned]
    expected = accord.merge_state_dicts(states, "ties", base=base.state_dict(), density=density)
    for key, tensor in expected.items():
        torch.testing.assert_close(result.model.state_dict()[key], tensor, rtol=1e-6, atol=1e-7)
