"""Identity matching: every model keeps its coordinates, so merging is direct averaging."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from accord.match._alignment import Alignment
from accord.match._common import identity_transforms
from accord.registry import alignment
from accord.spec import Spec
from accord.statistics import Statistics


@alignment(
    "identity",
    paper="direct weight averaging (no alignment)",
    label="direct average (identity)",
    permutations=True,
    aligns=False,
    compare=0,
)
def match_identity(
    spec: Spec,
    statistics: Statistics | None,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
) -> Alignment:
    """Identity transforms for every free space of every model: ``T = T⁻¹ = I``.

    The baseline every alignment method is measured against: averaging unaligned networks
    trained from different initialisations usually lands in a high-loss region.
    """
    report = {s.name: {"method": "identity", "notes": [], "models": {}} for s in spec.free_spaces}
    return Alignment(identity_transforms(spec, len(states)), report)
