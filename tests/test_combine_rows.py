"""Row-block merging gives the whole-tensor results bit for bit (odd sizes, block sizes that do
not divide the rows, bf16 task vectors full of ties), and keeps the output lazy."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from accord.combine import _sparse
from accord.combine._rows import row_spans
from accord.combine._state_dicts import (
    combine_rows,
    combine_tensor,
    compute_dtype,
    per_model,
)
from accord.registry import COMBINERS, lookup, resolve_options

CASES = [
    ("linear", {"weight": [0.3, 0.5, 0.2], "normalize": True}),
    ("linear", {"weight": [1.5, -0.25, 1.0], "normalize": False}),
    ("task_arithmetic", {"weight": [0.7, 1.3, -0.4], "scale": 0.9}),
    ("task_arithmetic", {"weight": [0.5, 0.5, 1.0], "normalize": True}),
    ("ties", {"density": [0.2, 0.5, 0.9]}),
    ("ties", {"density": [0.005, 1.0, 0.31], "weight": [0.5, 1.0, 2.0], "normalize": False}),
    ("ties", {"density": 0.05, "scale": 1.7}),
    ("dare", {"drop_rate": [0.9, 0.0, 0.5], "weight": [1.0, 0.4, 0.6]}),
    ("dare", {"drop_rate": 0.3, "rescale": "none"}),
    ("dare_ties", {"drop_rate": [0.5, 0.7, 0.2]}),
]


def _models(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """A base and three fine-tunes: base + small noise, stored in ``dtype`` (bf16: many
    task-vector entries tie at the same magnitude)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tuned = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(3)]
    return [t.to(dtype) for t in [base, *tuned]]


def _whole(
    name: str, record: Any, options: dict[str, Any], tensors: list[torch.Tensor], seed: int = 11
) -> Any:
    """The merge of the whole tensors, as before row blocks: tensors[0] is the base."""
    base, *models = (compute_dtype(t) for t in tensors)
    if record.needs.base == "no":
        return combine_tensor(record, name, models, options, seed=seed)
    deltas = (m - base for m in models)
    return combine_tensor(record, name, deltas, options, seed=seed).add_(base)


def _blocked(
    name: str, record: Any, options: dict[str, Any], tensors: list[torch.Tensor], entries: int
) -> torch.Tensor:
    base, *models = tensors

    def rows(t: torch.Tensor) -> Any:
        return lambda start, stop: compute_dtype(t[start:stop])

    blocks = combine_rows(
        record,
        name,
        tuple(base.shape),
        [rows(m) for m in models],
        options,
        base=None if record.needs.base == "no" else rows(base),
        seed=11,
        block_entries=entries,
    )
    assert blocks is not None
    return torch.cat(list(blocks))


@pytest.mark.parametrize(("method", "given"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_row_blocks_equal_the_whole_tensor(
    method: str, given: dict[str, Any], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sparse, "_CHUNK", 50)  # several histogram chunks inside a block too
    record = lookup("combine", method)
    options = per_model(record, resolve_options(record, given), 3)
    for shape, seed in (((37, 13), 0), ((101,), 1), ((9, 5, 3), 2)):
        tensors = _models(shape, dtype, seed)
        whole = _whole("layer.weight", record, options, tensors)
        for entries in (1, 12, 40, 13 * 5 + 1, 10_000):
            blocked = _blocked("layer.weight", record, options, tensors, entries)
            assert blocked.dtype == whole.dtype
            assert torch.equal(blocked, whole), (method, shape, entries)
            # the sign of zeros too: a byte-level comparison of the stored output
            assert torch.equal(blocked.to(dtype).view(-1), whole.to(dtype).view(-1))


def test_ties_ties_at_the_threshold_are_filled_in_row_order() -> None:
    # every entry ties: the first k in row-major order are kept, across blocks
    tensors = [torch.zeros(7, 3), torch.ones(7, 3), -torch.ones(7, 3), torch.ones(7, 3)]
    record = lookup("combine", "ties")
    options = per_model(record, resolve_options(record, {"density": [0.5, 0.25, 0.1]}), 3)
    for entries in (1, 2, 4, 5):
        blocked = _blocked("w", record, options, tensors, entries)
        assert torch.equal(blocked, _whole("w", record, options, tensors))
    kept = blocked.reshape(-1) != 0
    assert kept[:10].all() and not kept[10:].any()  # model 0 keeps ⌊0.5 · 21⌋ = 10 entries


def test_methods_that_need_the_whole_tensor_have_no_row_form() -> None:
    for method, given in (("ties", {"rescale": "l1"}), ("dare", {"rescale": "l1"})):
        record = lookup("combine", method)
        options = per_model(record, resolve_options(record, given), 2)
        assert combine_rows(record, "w", (4, 4), [], options) is None
    average = lookup("combine", "average")
    assert combine_rows(average, "w", (4, 4), [], {}) is None
    linear = lookup("combine", "linear")
    options = per_model(linear, resolve_options(linear, {}), 2)
    assert combine_rows(linear, "w", (), [], options) is None  # a scalar has no rows


def test_row_spans_cover_the_rows_once() -> None:
    assert row_spans((10, 3), 7) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert row_spans((3, 100), 7) == [(0, 1), (1, 2), (2, 3)]  # a row when rows exceed a block
    assert row_spans((5,), 100) == [(0, 5)]
    assert row_spans((0, 4), 7) == [(0, 0)]


@pytest.mark.parametrize(
    ("method", "given"),
    [
        ("ties", {"density": 0.3}),
        ("task_arithmetic", {"weight": 0.6}),
        ("dare_ties", {"drop_rate": 0.6}),
        ("linear", {}),
    ],
)
def test_llm_merge_by_row_blocks_writes_the_whole_tensor_merge(
    method: str, given: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accord.combine import _rows
    from accord.llm import load_state_and_config, save_checkpoint
    from accord.llm.merge import merge_checkpoints

    shapes = {"embed.weight": (53, 7), "layer.weight": (11, 9), "norm.weight": (9,)}
    config = {"architectures": ["ToyForCausalLM"], "model_type": "toy"}
    folders = []
    for i in range(3):
        state = {}
        for j, (name, shape) in enumerate(shapes.items()):
            state[name] = _models(shape, torch.bfloat16, seed=j)[i]
        state["position_ids"] = torch.arange(5)
        folders.append(save_checkpoint(tmp_path / f"m{i}", state, config))
    base, *models = folders
    task_vectors = method != "linear"
    monkeypatch.setattr(_rows, "BLOCK_ENTRIES", 10)  # 53 x 7 embedding: 53 one-row blocks
    out = merge_checkpoints(
        models if task_vectors else folders,
        tmp_path / "out",
        method=method,
        base=base if task_vectors else None,
        parameters=given,
        seed=5,
    )
    merged, _ = load_state_and_config(out)
    record = lookup("combine", method)
    options = per_model(record, resolve_options(record, given), 2 if task_vectors else 3)
    for j, (name, shape) in enumerate(shapes.items()):
        tensors = _models(shape, torch.bfloat16, seed=j)[:3]
        if not task_vectors:  # linear merges the three checkpoints; _whole drops tensors[0]
            tensors = [tensors[0], *tensors]
        expected = _whole(name, record, options, tensors, seed=5).to(torch.bfloat16)
        assert torch.equal(merged[name].view(torch.int16), expected.view(torch.int16)), name
    assert torch.equal(merged["position_ids"], torch.arange(5))


ROWWISE = sorted(name for name, record in COMBINERS.items() if record.rowwise is not None)


def test_the_elementwise_combiners_keep_their_row_forms() -> None:
    # a subset, so that a new combiner with a row form adds no line here (each is checked below)
    assert {"dare", "dare_ties", "linear", "task_arithmetic", "ties"} <= set(ROWWISE)


@pytest.mark.parametrize("method", ROWWISE)
def test_every_row_form_equals_its_combiner_with_default_options(method: str) -> None:
    record = COMBINERS[method]
    options = per_model(record, resolve_options(record, {}), 3)
    tensors = _models((23, 6), torch.bfloat16, seed=4)
    whole = _whole("w", record, options, tensors)
    assert torch.equal(_blocked("w", record, options, tensors, 17), whole)
