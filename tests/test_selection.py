"""Merge-aware checkpoint selection: diagnostics from formulas, the choice by merged
validation accuracy, and ``accord select``."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import accord
from accord.analysis import selection
from accord.analysis.selection import (
    _candidates,
    merged_task_vector,
    predictions,
    select_checkpoints,
    task_vector_diagnostics,
)
from accord.cli import main
from accord.combine._options import SCALE, TASK_VECTORS
from accord.registry import (
    ALIGNMENTS,
    COMBINERS,
    Limits,
    Option,
    alignment,
    combiner,
    task_vector_combiners,
)

TINY = {"width": 16, "depth": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[accord.DataSplits, Path, list[Path]]:
    torch.set_num_threads(1)
    store = tmp_path_factory.mktemp("store")
    data = accord.load_dataset("digits")
    common = {"arch": "mlp", "dataset": "digits", "model": TINY}
    base = accord.train_model_set(
        accord.ModelSetRequest(seeds=(0,), train=accord.TrainConfig(epochs=1), **common),
        store / "base",
        progress=False,
        data=data,
    )[0]
    experts = accord.train_model_set(
        accord.ModelSetRequest(
            seeds=(0, 1),
            split="classes",
            init=str(base.path),
            keep=accord.Keep(1, "epoch"),
            train=accord.TrainConfig(epochs=3, lr=0.02, batch_size=64),
            **common,
        ),
        store / "experts",
        progress=False,
        data=data,
    )
    return data, base.path, [e.path for e in experts]


def test_diagnostics_match_their_formulas() -> None:
    base = {"w": torch.zeros(4), "count": torch.tensor(3)}
    one = {"w": torch.tensor([1.0, -1.0, 0.0, 2.0]), "count": torch.tensor(5)}
    two = {"w": torch.tensor([-1.0, -1.0, 3.0, 0.0]), "count": torch.tensor(5)}
    found = task_vector_diagnostics(base, [one, two], density=1.0)
    assert found["task_vector_norms"] == pytest.approx([math.sqrt(6), math.sqrt(11)])
    assert found["mean_cosine"] == pytest.approx(0.0 / (math.sqrt(6) * math.sqrt(11)))
    # entries kept by both: 0 (signs differ) and 1 (agree)
    assert found["sign_conflict"] == pytest.approx(0.5)
    # density 0.5 keeps two entries each, ties broken by position: (1, 0, 0, 2) and
    # (−1, 0, 3, 0); the one entry both keep has opposite signs
    trimmed = task_vector_diagnostics(base, [one, two], density=0.5)
    assert trimmed["sign_conflict"] == pytest.approx(1.0)
    merged = merged_task_vector(base, [one, two], "task_arithmetic")
    assert set(merged) == {"w"}  # integer buffers are not task vectors
    torch.testing.assert_close(merged["w"], torch.tensor([0.0, -2.0, 3.0, 2.0]))
    ties = merged_task_vector(base, [one, two], "ties", {"density": 1.0})
    # elected signs: +0 → +, −, +, +; disjoint means: 1, −1, 3, 2
    torch.testing.assert_close(ties["w"], torch.tensor([1.0, -1.0, 3.0, 2.0]))


def test_predictions_give_argmax_and_el2n_from_known_logits() -> None:
    images = torch.zeros(3, 1, 1, 2)
    images[:, 0, 0, 0] = torch.tensor([1.0, 2.0, 3.0])
    data = accord.data.Dataset(images, torch.tensor([0, 1, 1]))
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))  # logits (0, x)
    correct, el2n = predictions(model, data)
    assert correct.tolist() == [False, True, True]
    p = torch.sigmoid(torch.tensor([1.0, 2.0, 3.0]))  # softmax of (0, x) at class 1
    expected = torch.stack([p[0] * 2**0.5, (1 - p[1]) * 2**0.5, (1 - p[2]) * 2**0.5])
    torch.testing.assert_close(el2n, expected)


def test_selection_chooses_by_merged_validation_never_test(trained) -> None:
    data, base, experts = trained
    selection = select_checkpoints(
        experts, data, method="task_arithmetic", base=base, scales=(0.5, 1)
    )
    assert len(selection.rows) == 3  # epochs 1, 2 and the final model
    vals = [r["merged_val_accuracy"] for r in selection.rows]
    assert selection.chosen == vals.index(max(vals))
    for row in selection.rows:
        assert row["scale"] in (0.5, 1.0)
        assert row["merged_val_accuracy"] == max(row["scales_val_accuracy"].values())
        assert len(row["hard"]["merged_accuracy"]) == 2 and 0 <= row["sign_conflict"] <= 1
    steps = [r["steps"] for r in selection.rows]
    assert steps == sorted(steps) and len({tuple(s) for s in steps}) == 3
    # scrambling the test labels changes the test column only, never the choice
    scrambled = dataclasses.replace(
        data, test=dataclasses.replace(data.test, labels=data.test.labels.flip(0))
    )
    again = select_checkpoints(
        experts, scrambled, method="task_arithmetic", base=base, scales=(0.5, 1)
    )
    assert again.chosen == selection.chosen
    assert [r["merged_val_accuracy"] for r in again.rows] == pytest.approx(vals)


def test_grids_and_errors(trained) -> None:
    data, base, experts = trained
    loaded = [accord.training_steps(e) for e in experts]
    from accord.analysis.selection import expert_from_store

    as_experts = [expert_from_store(e, data) for e in experts]
    assert len(_candidates(as_experts, "all")) == 9
    assert _candidates(as_experts, "aligned") == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(accord.ConfigError, match="grid='all'"):
        select_checkpoints([loaded[0], loaded[1][:2]], data, method="ties", base=base)
    with pytest.raises(accord.ConfigError, match="'ties' merges task vectors: give the base"):
        select_checkpoints(experts, data, method="ties")
    with pytest.raises(accord.ConfigError, match="task_arithmetic"):
        select_checkpoints(experts, data, method="task-arithmetic", base=base)
    # experts trained apart: an alignment method, no base, so no task-vector diagnostics
    aligned = select_checkpoints(as_experts, data, method="permutation")
    assert len(aligned.rows) == 3 and "sign_conflict" not in aligned.rows[0]
    assert aligned.rows[0]["scale"] is None
    # each expert's own classes are the split's: disjoint, together all ten
    classes = [set(e.classes.tolist()) for e in as_experts]
    assert not classes[0] & classes[1] and classes[0] | classes[1] == set(range(10))


def test_cli_select_writes_table_json_and_figure(trained, tmp_path: Path, capsys) -> None:
    _, base, experts = trained
    out = tmp_path / "sel"
    args = [
        "select",
        *map(str, experts),
        "--method",
        "ties",
        "--base",
        str(base),
        "--out",
        str(out),
    ]
    assert main(args) == 0
    assert "chosen: steps" in capsys.readouterr().out
    document = json.loads((out / "selection.json").read_text())
    assert document["method"] == "ties" and len(document["rows"]) == 3
    assert (out / "selection.png").stat().st_size > 0 and (out / "selection.md").is_file()


@pytest.mark.parametrize(
    ("method", "given", "message"),
    [
        ("cca", {"options": {"ridge": -1}}, "method 'cca': ridge=-1: expected 0 < ridge (it is"),
        ("zipit", {"options": {"alpah": 0.5}}, "'alpah' (did you mean 'alpha'?)"),
        ("ties", {"base": "b", "density": 0}, "ties': density=0: expected 0 < density <= 1 (it"),
        ("ties", {"base": "b", "options": {"scale": 2}}, "scale of 'ties' is λ"),
        ("ties", {"base": "b", "options": {"density": 0.5}}, "density is select_checkpoints'"),
        (
            "dare",
            {"base": "b", "options": {"drop_rate": 1.0}},
            "'dare': drop_rate=1.0: expected 0 <= drop_rate < 1 (it is a probability",
        ),
        ("dare", {}, "method 'dare' merges task vectors: give the base"),
        ("task-arithmetic", {"base": "b"}, "did you mean 'task_arithmetic'"),
    ],
)
def test_the_method_and_its_options_are_checked_before_any_work(
    method: str, given: dict, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("checkpoints were read before the method was checked")

    monkeypatch.setattr(selection, "expert_from_store", no_work)
    monkeypatch.setattr(selection, "load_checkpoint", no_work)
    with pytest.raises(accord.ConfigError) as error:
        select_checkpoints(["one", "two"], None, method=method, **given)  # type: ignore[arg-type]
    assert message in str(error.value)


def test_a_newly_registered_combiner_or_alignment_is_selectable() -> None:
    """selection.py names no method: a combiner of task vectors registered anywhere sweeps λ
    around the base, an alignment merges by accord.merge, their options checked alike."""

    def doubled(deltas, *, scale, gain):  # type: ignore[no-untyped-def]
        return scale * gain * sum(deltas)

    def aligned(spec, statistics, states, reference, *, sweeps):  # type: ignore[no-untyped-def]
        raise AssertionError("not run: only checked")

    gain = Option("gain", float, 2.0, "-", Limits(0, None, low_open=True), why="a gain")
    combiner("gained_sum", paper="-", label="-", options=(SCALE, gain), needs=TASK_VECTORS)(doubled)
    sweeps = Option("sweeps", int, 1, "-", Limits(1))
    alignment("sweeping", paper="-", label="-", options=(sweeps,))(aligned)
    try:
        base = {"w": torch.zeros(3)}
        one, two = {"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([0.0, -1.0, 1.0])}
        merged = merged_task_vector(base, [one, two], "gained_sum", {"gain": 3.0})
        torch.testing.assert_close(merged["w"], torch.tensor([3.0, 3.0, 12.0]))
        for method, options, message in (
            (
                "gained_sum",
                {"gain": -1},
                "method 'gained_sum': gain=-1: expected 0 < gain (a gain)",
            ),
            ("sweeping", {"sweeps": 0}, "method 'sweeping': sweeps=0: expected 1 <= sweeps"),
        ):
            with pytest.raises(accord.ConfigError, match=re.escape(message)):
                select_checkpoints(["a", "b"], None, method=method, base="b", options=options)  # type: ignore[arg-type]
        assert "gained_sum" in task_vector_combiners()
    finally:
        COMBINERS.pop("gained_sum", None)
        ALIGNMENTS.pop("sweeping", None)


def test_any_combiner_of_task_vectors_selects_with_its_options(trained) -> None:
    data, base, experts = trained
    chosen = select_checkpoints(
        experts, data, method="dare", base=base, scales=(0.5, 1.0), options={"drop_rate": 0.5}
    )
    assert len(chosen.rows) == 3 and chosen.config["options"] == {"drop_rate": 0.5}
    assert all(row["scale"] in (0.5, 1.0) and "sign_conflict" in row for row in chosen.rows)
    again = select_checkpoints(
        experts, data, method="dare", base=base, scales=(0.5, 1.0), options={"drop_rate": 0.5}
    )
    assert [r["merged_val_accuracy"] for r in again.rows] == [
        r["merged_val_accuracy"] for r in chosen.rows
    ]  # the drops are seeded per tensor
