"""The statistics of N models' feature spaces: means and covariance blocks, in float64, and
their save / load (safetensors + JSON)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from accord._finite import first_non_finite
from accord._io import write_with
from accord.errors import StatisticsError

if TYPE_CHECKING:
    pass

Pair = tuple[int, int]
# 2: a space of blocks keeps only its entrywise covariances (SpaceStatistics.block); format 1,
# which kept every space's full covariances, still loads
STATISTICS_FORMAT = 2
READABLE_FORMATS = (1, 2)


@dataclass
class SpaceStatistics:
    """Statistics of one space over ``count`` samples for N models.

    ``mean[i]`` is model i's mean of the space's observed entries (``size`` of them);
    ``blocks[(i, j)]`` with ``i <= j`` is ``Cov(x_i, x_j)`` (size × size, unbiased). Always
    present: ``(i, i)`` for every model and the pairs of every model with the reference; every
    pair when collected with ``pairs="all"``.

    ``block`` > 1: each of the space's ``size / block`` features owns ``block`` consecutive
    entries (a whole attention head) that only ever move together, so entry k of one feature
    only ever meets entry k of another, and only those covariances are kept: ``blocks[(i, j)]``
    is then (block, F, F) with ``[k, c, d] = Cov(x_i[c·block + k], x_j[d·block + k])``
    (:meth:`entry_covariance`), ``block`` times fewer values than the full covariance.
    """

    count: int
    mean: torch.Tensor
    blocks: dict[Pair, torch.Tensor]
    block: int = 1

    @property
    def size(self) -> int:
        """Observed entries per model (features × block)."""
        return int(self.mean.shape[1])

    @property
    def num_models(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self, i: int, j: int) -> torch.Tensor:
        """``Cov(x_i, x_j)``: rows are model i's features, columns model j's."""
        if self.block != 1:
            raise StatisticsError(
                f"these statistics keep, for features of {self.block} entries each, only the "
                "covariances of entries at one position of two features: use "
                "entry_covariance, or collect them with a spec whose space is observed entry "
                "by entry"
            )
        return self._stored(i, j)

    def entry_covariance(self, i: int, j: int, block: int) -> torch.Tensor:
        """(block, F, F): ``[k, c, d] = Cov(x_i[c·block + k], x_j[d·block + k])``, the
        covariances of entry k of model i's feature c and of model j's feature d, where each
        of the F features owns ``block`` consecutive entries; from the stored ones (``block``
        equal to :attr:`block`) or taken out of full covariances (:attr:`block` 1)."""
        stored = self._stored(i, j)
        if self.block == 1 and len(stored) % block == 0:
            features = len(stored) // block
            full = stored.reshape(features, block, features, block)
            return full.diagonal(dim1=1, dim2=3).movedim(-1, 0)
        if self.block != block:
            raise StatisticsError(
                f"statistics of {self.size} entries in blocks of {self.block} cannot give the "
                f"covariances of blocks of {block}; collect them with this spec"
            )
        return stored

    def _stored(self, i: int, j: int) -> torch.Tensor:
        """The stored block of models i, j (the transposed block of j, i when only it is)."""
        if (i, j) in self.blocks:
            return self.blocks[(i, j)]
        if (j, i) in self.blocks:
            return self.blocks[(j, i)].mT
        raise KeyError(
            f"the covariance of models {i} and {j} was not collected; collect with pairs='all'"
        )

    def non_finite(self) -> tuple[str, str] | None:
        """``(which tensor, what is wrong)`` for the first mean or covariance block holding
        NaN or inf, else None."""
        blocks = {f"Cov(model {i}, model {j})": b for (i, j), b in self.blocks.items()}
        return first_non_finite({"the means": self.mean, **blocks})

    def correlation(self, i: int, j: int) -> torch.Tensor:
        """Pearson correlation of model i's features (rows) with model j's (columns); a feature
        without variance (a ReLU unit that never fires) correlates with nothing."""
        return _correlation(self.covariance(i, i), self.covariance(j, j), self.covariance(i, j))

    def entry_correlation(self, i: int, j: int, block: int) -> torch.Tensor:
        """(block, F, F): the Pearson correlations of :meth:`entry_covariance`'s entries, the
        same values as :meth:`correlation` of full statistics holds at those entries."""
        return _correlation(
            self.entry_covariance(i, i, block),
            self.entry_covariance(j, j, block),
            self.entry_covariance(i, j, block),
        )


def _correlation(own_i: torch.Tensor, own_j: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """``cross`` divided by the standard deviations on the diagonals of ``own_i`` (rows) and
    ``own_j`` (columns), matrix by matrix; a product of deviations below 1e-12 counts as 1e-12."""
    std_i = torch.diagonal(own_i, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    std_j = torch.diagonal(own_j, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    return cross / (std_i[..., :, None] * std_j[..., None, :]).clamp_min(1e-12)


@dataclass
class Statistics:
    """Per-space statistics (``spaces``) and per-BatchNorm output statistics (``norms``).

    ``norms[name]`` holds each model's statistics of that BatchNorm's output (within-model
    blocks only): what the merged BatchNorm is given when maps are dense (DESIGN.md §4).
    """

    spaces: dict[str, SpaceStatistics]
    num_models: int
    reference: int = 0
    pairs: str = "reference"
    norms: dict[str, SpaceStatistics] = field(default_factory=dict)
    precision: str = "float64"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write one safetensors file, atomically (suggested suffix ``.safetensors``).

        Tensors (float64): ``s{k}.mean`` and ``s{k}.cov.{i}.{j}`` for the k-th space,
        ``n{k}.…`` for the k-th norm. The header's ``__metadata__["accord"]`` is JSON:
        ``{"format", "num_models", "reference", "pairs", "precision", "spaces": [{"name", "count",
        "key", "block"}], "norms": [...]}``; ``key`` is the tensors' prefix, ``block`` the
        entries per feature (:class:`SpaceStatistics`; a space of blocks keeps (block, F, F)
        tensors).
        """
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {
            "format": STATISTICS_FORMAT,
            "num_models": self.num_models,
            "reference": self.reference,
            "pairs": self.pairs,
            "precision": self.precision,
        }
        for kind, prefix, group in (("spaces", "s", self.spaces), ("norms", "n", self.norms)):
            meta[kind] = []
            for k, (name, stats) in enumerate(group.items()):
                key = f"{prefix}{k}"
                entry = {"name": name, "count": stats.count, "key": key, "block": stats.block}
                meta[kind].append(entry)
                tensors[f"{key}.mean"] = stats.mean.detach().cpu().contiguous()
                for (i, j), block in stats.blocks.items():
                    tensors[f"{key}.cov.{i}.{j}"] = block.detach().cpu().contiguous()
        header = {"accord": json.dumps(meta)}
        write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Statistics:
        """Read statistics written by :meth:`save` (tensors on the CPU)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise StatisticsError(f"statistics file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["accord"])
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except (KeyError, OSError, ValueError, SafetensorError) as exc:
            raise StatisticsError(
                f"{path} is not a statistics file written by Statistics.save ({exc!r})"
            ) from exc
        if meta.get("format") not in READABLE_FORMATS:
            raise StatisticsError(
                f"{path} has statistics format {meta.get('format')!r}; this accord reads "
                f"formats {', '.join(map(str, READABLE_FORMATS))}: collect the statistics again"
            )
        groups = {kind: _load_group(meta[kind], tensors) for kind in ("spaces", "norms")}
        return cls(
            spaces=groups["spaces"],
            num_models=int(meta["num_models"]),
            reference=int(meta["reference"]),
            pairs=str(meta["pairs"]),
            norms=groups["norms"],
            precision=str(meta.get("precision", "float64")),
        )


def _load_group(
    entries: list[dict[str, Any]], tensors: Mapping[str, torch.Tensor]
) -> dict[str, SpaceStatistics]:
    group = {}
    for entry in entries:
        key = entry["key"]
        blocks = {}
        for name, tensor in tensors.items():
            if name.startswith(f"{key}.cov."):
                i, j = name[len(key) + 5 :].split(".")
                blocks[(int(i), int(j))] = tensor
        group[entry["name"]] = SpaceStatistics(
            int(entry["count"]), tensors[f"{key}.mean"], blocks, int(entry.get("block", 1))
        )
    return group
