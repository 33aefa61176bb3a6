"""Batches that count how often each one is drawn, whatever iterates them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class CountedBatches:
    """A re-iterable list of batches; ``drawn[k]`` is how many times batch k was yielded."""

    def __init__(self, batches: Iterable[Any]) -> None:
        self.batches = list(batches)
        self.drawn = [0] * len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.batches):
            self.drawn[index] += 1
            yield batch
