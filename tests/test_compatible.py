"""The one compatibility check of tensor-wise merges (accord.compatible), and its two callers:
the vision merge's check_compatible and the LLM checkpoints' merge."""

from __future__ import annotations

import pytest
import torch

import accord
from accord.compatible import TensorShapes, check_same_tensors
from accord.errors import ModelError
from accord.merge import check_compatible


def _shapes(label: str, **shapes: tuple[int, ...]) -> TensorShapes:
    return TensorShapes(label, shapes, lambda name: f"{label}/{name.split('_')[0]}.bin")


def test_the_first_disagreeing_tensor_is_named_with_where_it_is() -> None:
    a = _shapes("a", w_1=(2, 3), b_1=(2,), w_2=(4, 2))
    check_same_tensors([a, _shapes("b", w_1=(2, 3), b_1=(2,), w_2=(4, 2))])
    with pytest.raises(accord.MergeError, match=r"tensor 'b_1' is in a/b\.bin but not in c$"):
        check_same_tensors([a, _shapes("b", **a.shapes), _shapes("c", w_1=(2, 3), w_2=(4, 2))])
    with pytest.raises(
        accord.MergeError, match=r"'w_2' has shape \(4, 3\) in b/w\.bin but \(4, 2\) in a/w\.bin"
    ):
        check_same_tensors([a, _shapes("b", w_1=(2, 3), b_1=(2,), w_2=(4, 3))])
    with pytest.raises(ModelError, match=r"^parameter 'x' is in b/x\.bin but not in a; convert$"):
        check_same_tensors(
            [a, _shapes("b", **a.shapes, x=(1,))],
            what="parameter",
            remedy="convert",
            error=ModelError,
        )


def test_a_missing_tensor_is_named_before_an_extra_one() -> None:
    a = TensorShapes("a", {"x": (1,), "y": (1,)})
    with pytest.raises(accord.MergeError, match="'y' is in a but not in b"):
        check_same_tensors([a, TensorShapes("b", {"z": (1,), "x": (1,)})])


def test_vision_models_are_checked_by_it_then_by_dtype() -> None:
    a = accord.build_model("mlp", width=8, depth=1)
    b = accord.build_model("mlp", width=9, depth=1)
    with pytest.raises(accord.MergeError, match=r"parameter 'layers\.1\.weight' has shape"):
        check_compatible([a, b], ["a.pt", "b.pt"])
    with pytest.raises(accord.MergeError, match=r"in model 1 \(b\.pt\) but torch\.float32"):
        check_compatible(
            [a, accord.build_model("mlp", width=8, depth=1).to(torch.float64)], ["a.pt", "b.pt"]
        )
