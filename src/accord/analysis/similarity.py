"""Layer-by-layer similarity of two networks: mean canonical correlation and linear CKA.

For every pair (layer ℓ of A, layer m of B) both measures are computed on the same inputs
(the validation split). A layer is an observation point of the traced spec (post-activation
by default, DESIGN.md §3) plus the logits. Each input gives one feature vector per layer: the
activation averaged over spatial positions or tokens, so that layers of different resolution
can be compared. With X (n × p) and Y (n × q) those vectors, centred:

* **mean CCA**: the mean of the min(p, q) canonical correlations, the singular values of
  ``Sxx'^(-1/2) Sxy Syy'^(-1/2)`` with a small scale-relative ridge ``S' = S + r·trace(S)/C·I``
  (features with zero variance, such as dead ReLUs, are dropped first). Invariant to any
  invertible linear map of either side.
* **linear CKA** (Kornblith et al., ICML 2019): ``‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)``.

Caveats (Davari et al., 2023, "Reliability of CKA as a Similarity Measure in Deep Learning";
Kornblith et al., 2019): CKA is invariant to orthogonal maps and isotropic scaling only, not
to general invertible linear maps, so two layers that carry the same information in different
linear coordinates can score well below 1; it is sensitive to outliers and can be moved a lot
by shifting a small subset of points. Mean CCA, for its part, is biased upward when the number
of inputs is not much larger than p + q. Report CKA next to CCA, never alone.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from accord._io import write_json, write_text, write_with
from accord._table import format_table
from accord.checkpoint import load_checkpoint
from accord.data import Dataset, load_dataset, make_loader
from accord.match.cca import spd_roots
from accord.store import checkpoint_dataset
from accord.trace import trace
from accord.trace.observe import observed_model
from accord.trace.programs import shared_exports

CAVEATS = (
    "Linear CKA is invariant to orthogonal maps and isotropic scaling only, not to general "
    "invertible linear maps (mean CCA is), so layers holding the same information in other "
    "linear coordinates can score well below 1. It is sensitive to outliers and to shifting a "
    "subset of points (Davari et al., 2023, Reliability of CKA as a Similarity Measure in Deep "
    "Learning). Mean CCA is biased upward when the number of inputs is not much larger than "
    "the two layers' widths combined. Read CKA next to CCA, never alone."
)
LOGITS = "logits"
DEFAULT_RIDGE = 1e-6


def centre(x: Tensor) -> Tensor:
    x = x.to(torch.float64)
    return x - x.mean(0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of feature matrices ``x`` (n × p) and ``y`` (n × q), rows paired by input.

    >>> x = torch.randn(100, 5, dtype=torch.float64)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    x, y = centre(x), centre(y)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    return float(cross / (torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)))


def _live(x: Tensor, tol: float = 1e-10) -> Tensor:
    """The columns of centred ``x`` whose variance is not (numerically) zero."""
    variance = (x * x).sum(0)
    return x[:, variance > tol * variance.max().clamp_min(1e-300)]


@dataclass(frozen=True)
class Prepared:
    """One layer's features, prepared once for all its pairs.

    ``whitened = X_live · Sxx'^(-1/2) / sqrt(n − 1)`` so that a pair's CCA matrix
    ``Sxx'^(-1/2) Sxy Syy'^(-1/2)`` is ``whitened_xᵀ whitened_y``; ``gram_norm = ‖XᵀX‖_F``.
    """

    centred: Tensor
    whitened: Tensor
    gram_norm: float


def prepare(x: Tensor, ridge: float = DEFAULT_RIDGE) -> Prepared:
    """Centre ``x`` (n × p), drop constant features, whiten with ridge ``r·trace(S)/C``."""
    centred = centre(x)
    live = _live(centred)
    scale = max(len(live) - 1, 1)
    if live.shape[1]:
        sxx = live.T @ live / scale
        eye = torch.eye(len(sxx), dtype=torch.float64)
        _, inverse_root = spd_roots(sxx + ridge * sxx.trace() / len(sxx) * eye)
        whitened = live @ inverse_root / scale**0.5
    else:
        whitened = live
    return Prepared(centred, whitened, float(torch.linalg.matrix_norm(centred.T @ centred)))


def pair_similarity(a: Prepared, b: Prepared) -> tuple[float, float]:
    """``(mean CCA, linear CKA)`` of two prepared layers (mean CCA 0 if one is constant)."""
    if a.whitened.shape[1] and b.whitened.shape[1]:
        correlations = torch.linalg.svdvals(a.whitened.T @ b.whitened).clamp(0, 1)
        cca = float(correlations.mean())
    else:
        cca = 0.0
    cross = float(torch.linalg.matrix_norm(b.centred.T @ a.centred)) ** 2
    denominator = a.gram_norm * b.gram_norm
    return cca, cross / denominator if denominator > 0 else 0.0


def canonical_correlations(x: Tensor, y: Tensor, ridge: float = DEFAULT_RIDGE) -> Tensor:
    """The canonical correlations of ``x`` (n × p) and ``y`` (n × q), descending.

    Ridge ``r·trace(S)/C`` on each side's covariance; constant features are dropped first.
    """
    a, b = prepare(x, ridge), prepare(y, ridge)
    if not (a.whitened.shape[1] and b.whitened.shape[1]):
        return torch.zeros(0, dtype=torch.float64)
    return torch.linalg.svdvals(a.whitened.T @ b.whitened).clamp(0, 1)


def mean_cca(x: Tensor, y: Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    """The mean of the canonical correlations of ``x`` and ``y`` (0 if either is constant)."""
    return pair_similarity(prepare(x, ridge), prepare(y, ridge))[0]


@torch.no_grad()
@shared_exports()  # the trace and the observed graph read one exported program
def layer_features(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Tensor]:
    """Per layer (graph order, then ``"logits"``): one row per input, spatially averaged.

    Layers are the observation nodes of ``accord.trace(model, first batch)``; each feature
    axis is moved last and every other non-batch axis is averaged. Nodes observed on the rows
    of one expert (a mixture of experts' tokens sorted by expert) hold no row per input:
    they are left out, with a warning.
    """
    batches = iter(data)
    first = next(batches)
    example = first[0][:2]
    spec = trace(model, example)
    points = [point for space in spec.spaces for point in space.observe]
    picked = sorted({point.node for point in points if point.picks_rows})
    if picked:
        warnings.warn(
            f"layer_features: node(s) {picked} left out: they are observed on the tokens "
            "routed to one expert (Observation.rows), not one row per input",
            stacklevel=3,
        )
    axes = {point.node: point.axis for point in points if point.node not in picked}
    graph = observed_model(
        model, axes, example, graph=spec.graph, leaf_modules=spec.leaf_modules
    ).to(device)
    graph.eval()
    order = [n.name for n in graph.module.graph.nodes if n.name in axes]
    rows: dict[str, list[Tensor]] = {name: [] for name in [*order, LOGITS]}
    for inputs, *_ in tqdm([first, *batches], desc="features", leave=False, disable=not progress):
        logits, observed = graph(inputs.to(device))
        for name in order:
            tensor = observed[name].movedim(axes[name], -1)
            rows[name].append(tensor.reshape(len(tensor), -1, tensor.shape[-1]).mean(1).cpu())
        rows[LOGITS].append(logits.cpu())
    return {name: torch.cat(parts).to(torch.float64) for name, parts in rows.items()}


@dataclass
class Similarity:
    """Mean CCA and linear CKA of every (layer of A, layer of B) pair, on ``samples`` inputs."""

    layers_a: list[str]
    layers_b: list[str]
    cca: Tensor
    cka: Tensor
    samples: int

    def diagonal(self) -> list[list[Any]]:
        """Rows ``[layer of A, layer of B, mean CCA, CKA]`` for layer k of A with layer k of B."""
        count = min(len(self.layers_a), len(self.layers_b))
        return [
            [self.layers_a[k], self.layers_b[k], float(self.cca[k, k]), float(self.cka[k, k])]
            for k in range(count)
        ]


def compare_layers(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Dataset,
    *,
    samples: int | None = 2000,
    ridge: float = DEFAULT_RIDGE,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Similarity:
    """Mean CCA and linear CKA between every layer of ``model_a`` and every layer of ``model_b``
    on the first ``samples`` examples of ``data`` (see the module docstring and its caveats)."""
    if samples is not None and samples < len(data):
        data = data.subset(torch.arange(samples))
    loader = make_loader(data, batch_size=batch_size)
    features_a = layer_features(model_a, loader, device=device, progress=progress)
    features_b = layer_features(model_b, loader, device=device, progress=progress)
    cca = torch.zeros(len(features_a), len(features_b), dtype=torch.float64)
    cka = torch.zeros_like(cca)
    prepared_a = [prepare(x, ridge) for x in features_a.values()]
    prepared_b = [prepare(y, ridge) for y in features_b.values()]
    for i, a in enumerate(tqdm(prepared_a, desc="layer pairs", leave=False, disable=not progress)):
        for j, b in enumerate(prepared_b):
            cca[i, j], cka[i, j] = pair_similarity(a, b)
    return Similarity(list(features_a), list(features_b), cca, cka, len(data))


def heatmap(
    matrix: Tensor, rows: list[str], columns: list[str], path: str | os.PathLike[str], title: str
) -> None:
    """``matrix`` (rows: layers of A, columns: layers of B) as a PNG heatmap on [0, 1]."""
    from matplotlib.figure import Figure

    size = 2.5 + 0.28 * max(len(rows), len(columns))
    figure = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(matrix.numpy(), vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)), rows, fontsize=6)
    ax.set_xlabel("layer of model B")
    ax.set_ylabel("layer of model A")
    ax.set_title(title, fontsize=9)
    figure.colorbar(image, ax=ax, shrink=0.8)
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


def write_similarity(
    similarity: Similarity, out: str | os.PathLike[str], names: tuple[str, str], dataset: str
) -> dict[str, Path]:
    """Write ``cca.png``, ``cka.png``, ``similarity.md`` and ``similarity.json`` under ``out``."""
    root = Path(out)
    paths = {kind: root / f"{kind}.png" for kind in ("cca", "cka")}
    layers = (similarity.layers_a, similarity.layers_b)
    heatmap(similarity.cca, *layers, paths["cca"], "mean canonical correlation (ridge CCA)")
    heatmap(similarity.cka, *layers, paths["cka"], "linear CKA (read next to CCA)")
    table = format_table(
        ["layer of A", "layer of B", "mean CCA", "linear CKA"], similarity.diagonal(), True
    )
    lines = [
        "# Layer similarity",
        "",
        f"- model A: `{names[0]}`",
        f"- model B: `{names[1]}`",
        f"- data: the validation split of {dataset}, {similarity.samples} inputs; one feature "
        "vector per input and layer (activations averaged over spatial positions / tokens)",
        "",
        "## Layer k of A against layer k of B",
        "",
        table,
        "",
        "![mean CCA](cca.png) ![linear CKA](cka.png)",
        "",
        "## Caveats",
        "",
        CAVEATS,
    ]
    paths["markdown"] = root / "similarity.md"
    write_text(paths["markdown"], "\n".join(lines) + "\n")
    paths["json"] = root / "similarity.json"
    write_json(
        paths["json"],
        {
            "models": list(names),
            "dataset": dataset,
            "samples": similarity.samples,
            "layers_a": similarity.layers_a,
            "layers_b": similarity.layers_b,
            "mean_cca": similarity.cca.tolist(),
            "linear_cka": similarity.cka.tolist(),
            "caveats": CAVEATS,
        },
    )
    return paths


def analyze_checkpoints(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    data_dir: str | None = None,
    samples: int | None = 2000,
    out: str | os.PathLike[str] = "analysis",
    device: str = "cpu",
    progress: bool = True,
) -> Similarity:
    """Compare two stored checkpoints on the validation split of their dataset (or of
    ``dataset``) and write the heatmaps, tables and JSON under ``out``."""
    checkpoints = [load_checkpoint(path_a, device=device), load_checkpoint(path_b, device=device)]
    if dataset is None:
        data = checkpoint_dataset(checkpoints, data_dir)
    else:
        data = load_dataset(dataset, data_dir)
    similarity = compare_layers(
        checkpoints[0].model,
        checkpoints[1].model,
        data.val,
        samples=samples,
        device=device,
        progress=progress,
    )
    write_similarity(similarity, out, (str(path_a), str(path_b)), data.name)
    return similarity


def add_analyze_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``accord analyze MODEL_A MODEL_B`` to the ``accord`` subparsers ``sub``."""
    p = sub.add_parser(
        "analyze",
        help="layer-by-layer similarity of two checkpoints (mean CCA and linear CKA)",
        description=__doc__.split("\n\n")[0] + " " + CAVEATS,
    )
    p.add_argument("model_a", help="checkpoint folder (accord train)")
    p.add_argument("model_b", help="checkpoint folder (accord train)")
    p.add_argument("--data", default=None, help="dataset name (default: the checkpoints' own)")
    p.add_argument("--data-dir", default=None, help="folder with the dataset's files")
    p.add_argument("--samples", type=int, default=2000, help="validation inputs [%(default)s]")
    p.add_argument("--out", default="analysis", help="output folder [%(default)s]")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_analyze)
    return p


def _cmd_analyze(args: argparse.Namespace) -> int:
    similarity = analyze_checkpoints(
        args.model_a,
        args.model_b,
        dataset=args.data,
        data_dir=args.data_dir,
        samples=args.samples,
        out=args.out,
        device=args.device,
        progress=not args.quiet,
    )
    headers = ["layer of A", "layer of B", "mean CCA", "linear CKA"]
    print(format_table(headers, similarity.diagonal()))
    print(f"\nCaveats: {CAVEATS}")
    print(f"written to {args.out} (cca.png, cka.png, similarity.md, similarity.json)")
    return 0
