"""SCE, the merge of FuseChat (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024,
arXiv:2408.07990): Select, Calculate, Erase, per tensor, over the task vectors ``τ_1 … τ_n``.

- Select: keep the positions whose variance across the task vectors,
  ``v_p = (1/n) Σ_i (τ_{i,p} − mean_i τ_{i,p})²``, is among the top ``⌊select_topk · m⌋`` of
  the ``m`` positions where it is nonzero (ties by position), in every task vector; zero the
  others (``select_topk = 1``, mergekit's default, keeps all);
- Calculate: weigh each selected task vector by its share of the squared magnitude,
  ``w_i = ‖τ̂_i‖² / Σ_j ‖τ̂_j‖²`` (equal weights where every ``τ̂_i`` is 0);
- Erase: elect the sign of ``Σ_i τ̂_i`` per entry (+ where it is 0) and drop the entries of the
  other sign;
- merge: ``Σ_i w_i m_i τ̂_i / Σ_i w_i m_i`` with ``m_i`` the kept entries (0 where none is).

mergekit's names: ``sce``, with ``select_topk`` (and ``int8_mask``, a memory switch without
effect on the result); it reads no weights. Two deliberate differences from mergekit: it falls
back to equal weights whenever ``Σ_j mean(τ̂_j²) < 1e-6``, which the small task vectors of LLM
fine-tunes (entries around 1e-3) often are, where accord follows the formula down to 0; and it
divides by ``max(Σ_i w_i m_i, 1e-6)``, where accord divides by the sum itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from accord.combine._options import TASK_VECTORS, check_value
from accord.combine._sparse import disjoint_merge, elect_sign, largest_mask
from accord.registry import FRACTION, Option, combiner

SELECT_TOPK = Option(
    "select_topk", float, 1.0, "fraction of highest-variance entries kept", FRACTION
)


def sce(deltas: Iterable[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """The merged task vector (see the module docs).

    >>> sce([torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])])  # weights 5/7, 2/7
    tensor([1.7143, 1.0000])
    """
    check_value(SELECT_TOPK, select_topk)
    deltas = list(deltas)
    if not deltas:
        raise ValueError("no task vectors to merge")
    if select_topk < 1:
        variance = torch.stack(deltas).var(dim=0, correction=0)
        selected = largest_mask(variance, int(select_topk * int((variance != 0).sum())))
        deltas = [delta * selected for delta in deltas]
    norms = [float(torch.linalg.vector_norm(delta, dtype=torch.float64)) for delta in deltas]
    energies = [norm**2 for norm in norms]
    total = sum(energies)
    weights = [e / total for e in energies] if total > 0 else [1 / len(deltas)] * len(deltas)
    sign = elect_sign(deltas)
    weighted = [delta * weight for delta, weight in zip(deltas, weights, strict=True)]
    return disjoint_merge(weighted, sign, weights)


@combiner(
    "sce",
    paper="Wan et al., 2024 (FuseChat, arXiv:2408.07990)",
    label="SCE",
    options=(SELECT_TOPK,),
    needs=TASK_VECTORS,
)
def combine_sce(deltas: Iterable[Tensor], *, select_topk: float) -> Tensor:
    """The record's function: :func:`sce` of the task vectors."""
    return sce(deltas, select_topk=select_topk)
