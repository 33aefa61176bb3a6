"""The compatibility check shared by every merge made tensor by tensor (vision models, LLM
checkpoints): the same tensor names, with the same shapes, in every model, and an error naming
the first tensor that disagrees and where it is. What else must agree (the models' class, the
dtypes, a family's config) each side checks itself."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from accord.errors import MergeError


@dataclass(frozen=True)
class TensorShapes:
    """One model's tensors as the check sees them: ``label`` names the model, ``shapes`` maps
    each tensor's name to its shape (in the model's order), and ``where`` names what holds a
    tensor, e.g. its file (by default the label)."""

    label: str
    shapes: Mapping[str, tuple[int, ...]]
    where: Callable[[str], str] | None = None

    @classmethod
    def of_state(cls, label: str, state: Mapping[str, Any]) -> TensorShapes:
        """The shapes of the tensors of ``state`` (a state dict), labelled ``label``."""
        return cls(label, {name: tuple(tensor.shape) for name, tensor in state.items()})

    def location(self, name: str) -> str:
        return self.where(name) if self.where is not None else self.label


def check_same_tensors(
    models: Sequence[TensorShapes],
    *,
    what: str = "tensor",
    remedy: str = "",
    error: type[Exception] = MergeError,
) -> None:
    """``error`` for the first model that disagrees with ``models[0]``: naming the first of
    ``models[0]``'s tensors (in its order) that the model lacks or holds with another shape,
    else the first tensor it holds that ``models[0]`` lacks. ``what`` is what a tensor is
    called in the message ("parameter", "tensor") and ``remedy`` ends it."""
    first, *others = models
    tail = f"; {remedy}" if remedy else ""
    for model in others:
        for name, shape in first.shapes.items():
            if name not in model.shapes:
                raise error(
                    f"{what} {name!r} is in {first.location(name)} but not in {model.label}{tail}"
                )
            if tuple(model.shapes[name]) != tuple(shape):
                raise error(
                    f"{what} {name!r} has shape {tuple(model.shapes[name])} in "
                    f"{model.location(name)} but {tuple(shape)} in {first.location(name)}{tail}"
                )
        extra = next((name for name in model.shapes if name not in first.shapes), None)
        if extra is not None:
            raise error(
                f"{what} {extra!r} is in {model.location(extra)} but not in {first.label}{tail}"
            )
