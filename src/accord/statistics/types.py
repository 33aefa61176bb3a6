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
STATISTICS_FORMAT = 1


@dataclass
class SpaceStatistics:
    """Statistics of one space over ``count`` samples for N models.

    ``mean[i]`` is model i's feature mean (C,); ``blocks[(i, j)]`` with ``i <= j`` is
    ``Cov(x_i, x_j)`` (C × C, unbiased). Always present: ``(i, i)`` for every model and the
    pairs of every model with the reference; every pair when collected with ``pairs="all"``.
    """

    count: int
    mean: torch.Tensor
    blocks: dict[Pair, torch.Tensor]

    @property
    def size(self) -> int:
        return int(self.mean.shape[1])

    @property
    def num_models(self) -> int:
        return int(self.mean.shape[0])

    def covariance(self, i: int, j: int) -> torch.Tensor:
        """``Cov(x_i, x_j)``: rows are model i's features, columns model j's."""
        if (i, j) in self.blocks:
            return self.blocks[(i, j)]
        if (j, i) in self.blocks:
            return self.blocks[(j, i)].T
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
        std_i = torch.diagonal(self.covariance(i, i)).clamp_min(0).sqrt()
        std_j = torch.diagonal(self.covariance(j, j)).clamp_min(0).sqrt()
        return self.covariance(i, j) / (std_i[:, None] * std_j[None, :]).clamp_min(1e-12)


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
        "key"}], "norms": [...]}``; ``key`` is the tensors' prefix.
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
                meta[kind].append({"name": name, "count": stats.count, "key": key})
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
        if meta.get("format") != STATISTICS_FORMAT:
            raise StatisticsError(
                f"{path} has statistics format {meta.get('format')!r}; this accord reads "
                f"format {STATISTICS_FORMAT}: collect the statistics again"
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
        group[entry["name"]] = SpaceStatistics(int(entry["count"]), tensors[f"{key}.mean"], blocks)
    return group
