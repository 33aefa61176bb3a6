"""What a matcher returns. Matchers register with :func:`accord.registry.alignment`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accord.apply import Transform


@dataclass(frozen=True)
class Alignment:
    """What a matcher found: one transform per model and free space, and what it did.

    ``transforms[i][space]`` maps model i's features of ``space`` into the merged coordinates
    (for star methods, the reference's coordinates, so the reference gets identities).
    ``report[space]`` says which method was actually used (``"method"``), why it differs from
    the one asked for (``"notes"``) and its scores per aligned model (``"models"``).
    """

    transforms: list[dict[str, Transform]]
    report: dict[str, dict[str, Any]]
