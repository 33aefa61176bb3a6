"""Model Stock (Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models",
ECCV 2024, arXiv:2403.19522).

With ``k ≥ 2`` fine-tuned models ``θ_i`` of one base ``θ_0`` and their task vectors
``τ_i = θ_i − θ_0``, the merge interpolates between the base and the fine-tuned average with a
ratio found from the geometry alone::

    cos θ = mean over pairs i < j of  τ_i·τ_j / max(‖τ_i‖ ‖τ_j‖, 1e-6)   (clamped to [−1, 1])
    t     = k cos θ / (1 + (k − 1) cos θ)
    θ_H   = t · mean_i θ_i + (1 − t) · θ_0  =  θ_0 + t · mean_i τ_i

per tensor, or per row with ``filter_wise`` (each vector along the last axis; a 1-D tensor is
one row). The paper states ``t`` for one angle; the mean of the pairwise cosines and the 1e-6
floor are mergekit's (``model_stock``, its parameter ``filter_wise``, default false). A tensor
that no model changed has ``cos θ = 0`` and keeps the base. Where the task vectors point apart
(``cos θ = −1/(k − 1)``) ``t`` is unbounded and the result not finite, which the merge reports
with the tensor's name.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from accord.registry import Needs, Option, combiner

_NORM_FLOOR = 1e-6  # mergekit's floor of ‖τ_i‖ ‖τ_j‖: unchanged tensors give cos 0, not 0/0


def model_stock(deltas: Iterable[Tensor], *, filter_wise: bool = False) -> Tensor:
    """The merged task vector ``t · mean_i τ_i`` (see the module docs).

    >>> model_stock([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])  # cos 0: the base
    tensor([0., 0.])
    """
    deltas = list(deltas)
    k = len(deltas)
    if k < 2:
        raise ValueError(f"model stock needs at least 2 task vectors, got {k}")
    shape = deltas[0].shape
    width = shape[-1] if filter_wise and len(shape) > 0 else -1
    rows = [delta.reshape(-1, width) if width != -1 else delta.reshape(1, -1) for delta in deltas]
    # float64 sums keep the cosine exact enough for t, whose denominator can be near 0
    norms = [torch.linalg.vector_norm(row, dim=1, dtype=torch.float64) for row in rows]
    cosines = [
        (
            (rows[i] * rows[j]).sum(dim=1, dtype=torch.float64)
            / (norms[i] * norms[j]).clamp(min=_NORM_FLOOR)
        ).clamp(-1.0, 1.0)
        for i in range(k)
        for j in range(i + 1, k)
    ]
    cos = torch.stack(cosines).mean(dim=0)
    t = (k * cos / (1 + (k - 1) * cos)).unsqueeze(1)
    mean = sum(rows) / k
    return (t.to(mean.dtype) * mean).reshape(shape)


@combiner(
    "model_stock",
    paper="Jang et al., ECCV 2024 (Model Stock, arXiv:2403.19522)",
    label="Model Stock",
    options=(Option("filter_wise", bool, False, "one ratio per row"),),
    needs=Needs(base="yes", min_models=2),
)
def combine_model_stock(deltas: Iterable[Tensor], *, filter_wise: bool) -> Tensor:
    """The record's function: :func:`model_stock` of the task vectors."""
    return model_stock(deltas, filter_wise=filter_wise)
