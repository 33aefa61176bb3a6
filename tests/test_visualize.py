"""Feature visualisation of matched units: top inputs, agreement, act-max and grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import accord
from accord.analysis.visualize import (
    ROLES,
    ImagePrior,
    _probe,
    _tiles,
    activation_maximisation,
    agreement,
    grid_image,
    live_units,
    top_examples,
    unit_activations,
    visualize_models,
)
from accord.cli import main


@pytest.fixture(scope="module")
def digits() -> accord.DataSplits:
    return accord.load_dataset("digits")


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return accord.build_model("mlp", width=12, depth=2, in_channels=1, image_size=8).eval()


def test_top_examples_are_the_argmax_with_ties_by_index() -> None:
    activations = torch.tensor([[1.0, 5.0], [3.0, 5.0], [2.0, 0.0], [-1.0, 5.0]])
    assert top_examples(activations, 3).tolist() == [[1, 2, 0], [0, 1, 3]]
    assert top_examples(activations, 1).tolist() == [[1], [0]]


def test_agreement_counts_shared_top_inputs_of_live_units() -> None:
    merged = torch.tensor([[0, 1], [2, 3]])
    parent = torch.tensor([[1, 0], [2, 4]])
    assert agreement(merged, [parent]) == pytest.approx((1.0 + 0.5) / 2)
    assert agreement(merged, [parent, merged]) == pytest.approx((1.0 + 0.5 + 1 + 1) / 4)
    only_second = [torch.tensor([False, True])]
    assert agreement(merged, [parent], only_second) == pytest.approx(0.5)
    assert agreement(merged, [parent], [torch.tensor([False, False])]) is None
    assert live_units(torch.tensor([[1.0, 2.0], [1.0, 3.0]])).tolist() == [False, True]


@pytest.mark.parametrize("method", ["permutation", "cca"])
def test_a_model_and_its_permuted_twin_agree_perfectly(method: str, digits) -> None:
    model = _mlp()
    spec = accord.trace(model, digits.train.images[:2])
    twin = accord.randomly_permuted(model, spec, seed=3).eval()
    examples = digits.val.subset(torch.arange(120))
    visuals = visualize_models(
        model, twin, digits.train, examples, method=method, k=2, top=5, steps=2
    )
    assert [v.space for v in visuals] == [s.name for s in spec.free_spaces]
    for visual in visuals:
        assert visual.agreement == pytest.approx(1.0)
        live = visual.live["A"]
        torch.testing.assert_close(
            visual.correlations[live], torch.ones(int(live.sum()), dtype=torch.float64)
        )
        for role in ROLES:
            torch.testing.assert_close(visual.top[role], visual.top["A"])
            assert len(visual.images[role]) == len(visual.units)
        assert len(visual.units) == 4 and len(set(visual.units)) == 4


def test_top_examples_are_those_of_the_unit_activations(digits) -> None:
    model = _mlp(1)
    spec = accord.trace(model, digits.train.images[:2])
    space = spec.free_spaces[0]
    probe = _probe(spec, space, torch.eye(space.size, dtype=torch.float64))
    examples = digits.val.subset(torch.arange(50))
    acts = unit_activations(model, probe, examples)
    with torch.no_grad():  # the first hidden layer by hand: ReLU(W x + b)
        hidden = torch.relu(model.layers[1](examples.images.flatten(1))).double()
    torch.testing.assert_close(acts, hidden, rtol=1e-5, atol=1e-6)
    top = top_examples(acts, 4)
    for unit in range(space.size):
        assert acts[top[unit, 0], unit] == acts[:, unit].max()


def test_activation_maximisation_raises_the_unit_above_the_data(digits) -> None:
    model = _mlp(2)
    spec = accord.trace(model, digits.train.images[:2])
    space = spec.free_spaces[0]
    probe = _probe(spec, space, torch.eye(space.size, dtype=torch.float64))
    acts = unit_activations(model, probe, digits.val)
    unit = int(live_units(acts).nonzero()[0])
    prior = ImagePrior.of(digits.val)
    image = activation_maximisation(model, probe, unit, (1, 8, 8), prior, steps=64)
    assert image.shape == (1, 8, 8)
    assert float(image.min()) >= float(prior.low.min()) - 1e-6
    assert float(image.max()) <= float(prior.high.max()) + 1e-6
    reached = unit_activations(
        model, probe, accord.data.Dataset(image[None], torch.zeros(1).long())
    )
    assert float(reached[0, unit]) > float(acts[:, unit].mean())


def test_grid_places_tiles_row_by_row_with_blank_gaps() -> None:
    tiles = [[torch.full((1, 2, 3), 0.1 * (1 + r * 3 + c)) for c in range(3)] for r in range(2)]
    tiles[1][1] = None
    grid = grid_image(tiles, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3)
    for r in range(2):
        for c in range(3):
            top, left = 1 + r * 3, 1 + c * 4
            block = grid[top : top + 2, left : left + 3]
            expected = 1.0 if (r, c) == (1, 1) else 0.1 * (1 + r * 3 + c)
            np.testing.assert_allclose(block, expected, rtol=1e-6)
    assert (grid[0] == 1).all() and (grid[:, 0] == 1).all()  # the padding is white


def test_space_grid_has_one_row_per_unit_and_three_groups(digits) -> None:
    model = _mlp()
    spec = accord.trace(model, digits.train.images[:2])
    twin = accord.randomly_permuted(model, spec, seed=1).eval()
    examples = digits.val.subset(torch.arange(60))
    (visual,) = visualize_models(
        model, twin, digits.train, examples, spaces=["layers.1"], k=2, top=3, steps=1
    )
    rows = _tiles(visual, examples, ImagePrior.of(examples))
    assert len(rows) == len(visual.units)
    for row in rows:
        assert len(row) == 3 * (3 + 1) + 2  # per role: 3 inputs and act-max; 2 gaps
        assert row[4] is None and row[9] is None
    with pytest.raises(accord.ConfigError, match=r"layers\.1"):
        visualize_models(model, twin, digits.train, examples, spaces=["nope"], steps=1)


def test_cli_visualize_writes_one_png_per_space(tmp_path: Path, capsys) -> None:
    common = ["--arch", "mlp", "--dataset", "digits", "--width", "12", "--depth", "2"]
    args = ["train", *common, "--seeds", "0,1", "--epochs", "1", "--quiet"]
    assert main([*args, "--store", str(tmp_path / "store")]) == 0
    a, b = accord.list_checkpoints(tmp_path / "store")
    out = tmp_path / "vis"
    assert main(["visualize", str(a), str(b), "--steps", "4", "--k", "2", "--out", str(out)]) == 0
    assert "top-input agreement" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "layers.1.png",
        "layers.3.png",
        "visualize.json",
    ]
    summary = json.loads((out / "visualize.json").read_text())
    assert set(summary) == {"layers.1", "layers.3"}
    assert 0 <= summary["layers.1"]["agreement"] <= 1


@given(
    arrays(
        np.float64, st.tuples(st.integers(1, 12), st.integers(1, 5)), elements=st.integers(-3, 3)
    ),
    st.integers(1, 12),
)
def test_top_examples_are_sorted_and_agree_with_themselves(values: np.ndarray, count: int) -> None:
    activations = torch.from_numpy(values)
    count = min(count, len(activations))
    top = top_examples(activations, count)
    for unit in range(activations.shape[1]):
        chosen = activations[top[unit], unit]
        assert bool((chosen[:-1] >= chosen[1:]).all())  # largest first
        rest = np.setdiff1d(np.arange(len(activations)), top[unit].numpy())
        assert len(rest) == 0 or float(activations[rest, unit].max()) <= float(chosen[-1])
    assert agreement(top, [top]) == 1.0
