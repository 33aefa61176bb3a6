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
import copy
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from accord._io import write_json, write_text, write_with
from accord._table import format_table
from accord.apply import Transform, apply_transforms
from accord.data import Dataset, load_dataset, make_loader
from accord.fx import observed_graph
from accord.match.cca import spd_roots
from accord.spec import FeatureSpace, Spec
from accord.store import checkpoint_dataset, load_checkpoint
from accord.trace import trace

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


def _centred(x: Tensor) -> Tensor:
    x = x.to(torch.float64)
    return x - x.mean(0, keepdim=True)


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA of feature matrices ``x`` (n × p) and ``y`` (n × q), rows paired by input.

    >>> x = torch.randn(100, 5, dtype=torch.float64)
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    x, y = _centred(x), _centred(y)
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
    centred = _centred(x)
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
def layer_features(
    model: nn.Module,
    data: Iterable[Any],
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Tensor]:
    """Per layer (graph order, then ``"logits"``): one row per input, spatially averaged.

    Layers are the observation nodes of ``accord.trace(model, first batch)``; each feature
    axis is moved last and every other non-batch axis is averaged.
    """
    batches = iter(data)
    first = next(batches)
    axes = {
        point.node: point.axis
        for space in trace(model, first[0][:2]).spaces
        for point in space.observe
    }
    graph = observed_graph(model, axes).to(device).eval()
    order = [n.name for n in graph.graph.nodes if n.name in axes]
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


def _mix(features: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """``new[c] = Σ_d matrix[c, d] · old[d]`` along ``axis`` of ``features``."""
    return (features.movedim(axis, -1) @ matrix.T).movedim(-1, axis)


def _attack_graph(model: nn.Module, spec: Spec, space: FeatureSpace, matrix: Tensor) -> nn.Module:
    """``model`` (float64) with ``A·h`` in place of the space's observed ``h`` and ``A⁻¹`` folded
    into the space's readers: the same function, the layer in other linear coordinates."""
    readers_only = replace(space, writers=(), elementwise=(), batchnorms=(), maps="linear")
    state = apply_transforms(
        model.state_dict(),
        Spec([readers_only], leaf_modules=spec.leaf_modules),
        {space.name: Transform.from_matrix(matrix)},
    )
    copy_ = copy.deepcopy(model)
    copy_.load_state_dict(state)
    point = space.observe[0]
    gm = observed_graph(copy_, [point.node], spec.leaf_modules)
    gm.register_buffer("cka_attack_map", matrix)
    node = next(n for n in gm.graph.nodes if n.name == point.node)
    with gm.graph.inserting_after(node):
        weights = gm.graph.get_attr("cka_attack_map")
    with gm.graph.inserting_after(weights):
        mixed = gm.graph.call_function(_mix, (node, weights, point.axis))
    node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
    gm.graph.lint()
    gm.recompile()
    return gm


def _run(graph: nn.Module, inputs: Tensor, node: str, axis: int) -> tuple[Tensor, Tensor]:
    """``(logits, spatially averaged features of node)`` of an observed graph, in float64."""
    with torch.no_grad():
        logits, observed = graph(inputs)
    tensor = observed[node].movedim(axis, -1)
    return logits, tensor.reshape(len(tensor), -1, tensor.shape[-1]).mean(1)


@dataclass
class CkaAttack:
    """An invertible map of one layer, absorbed by the next, tuned to a chosen linear CKA.

    ``cka_before`` is the layer against itself (1); ``cka_after`` the original features
    against the re-coordinated ones. ``curve_log_condition`` and ``curve_cka`` trace CKA
    against ``log10`` of the map's condition number, for :func:`plot_cka_attack`.
    """

    space: str
    node: str
    target: float
    cka_before: float
    cka_after: float
    mean_cca_after: float
    accuracy_before: float
    accuracy_after: float
    max_relative_logit_change: float
    condition_number: float
    samples: int
    curve_log_condition: list[float]
    curve_cka: list[float]


def _attack_map(features: Tensor) -> Callable[[float], Tensor]:
    """``t ↦ A = Q·diag(10^(t·u))·Qᵀ`` in the eigenbasis ``Q`` of the features' covariance, with
    ``u`` running from 1 on the weakest live direction to 0 on the strongest, so that
    cond(A) = 10^t and CKA falls as the weak directions grow to dominate the strong ones.
    Constant directions (dead units) are left alone: stretching them moves neither CKA nor CCA."""
    centred = _centred(features)
    values, vectors = torch.linalg.eigh(centred.T @ centred)
    live = values > 1e-10 * values.max().clamp_min(1e-300)
    exponents = torch.zeros_like(values)
    exponents[live] = torch.linspace(1.0, 0.0, int(live.sum()), dtype=torch.float64)
    return lambda t: vectors @ torch.diag(10.0 ** (t * exponents)) @ vectors.T


def cka_attack(
    model: nn.Module,
    data: Dataset,
    space: str,
    target: float,
    *,
    samples: int | None = 2000,
    max_condition: float = 1e8,
    rtol: float = 1e-5,
    batch_size: int = 256,
) -> tuple[CkaAttack, nn.Module]:
    """Drive linear CKA of feature space ``space`` to ``target`` without changing the function.

    The observed features ``h`` of ``space`` become ``A·h`` and the space's readers (the next
    layer) absorb ``A⁻¹``, so the logits are those of ``model`` up to rounding (checked against
    ``rtol``) and accuracy is unchanged; mean CCA stays 1 since it is invariant to invertible
    maps, CKA is not (Davari et al., 2023). The map's strength, ``log10`` of its condition number
    in ``[0, log10(max_condition)]``, is found by bisection. Runs on the CPU in float64 on the
    first ``samples`` examples of ``data``. Returns the report and the re-coordinated model (a
    GraphModule returning ``(logits, {observation node: features})``).
    """
    if samples is not None and samples < len(data):
        data = data.subset(torch.arange(samples))
    batches = list(make_loader(data, batch_size=batch_size))
    inputs = torch.cat([b[0] for b in batches]).to(torch.float64)
    labels = torch.cat([b[1] for b in batches])
    reference = copy.deepcopy(model).to("cpu", torch.float64).eval()
    spec = trace(reference, inputs[:2])
    by_name = {s.name: s for s in spec.spaces}
    chosen = by_name.get(space)
    usable = [s.name for s in spec.spaces if s.free and s.observe and s.readers]
    if chosen is None or chosen.name not in usable:
        raise ValueError(
            f"space {space!r} of {type(model).__name__} is not one whose features are observed "
            f"and read by a next layer; choose one of {usable}"
        )
    point = chosen.observe[0]
    logits, features = _run(
        observed_graph(reference, [point.node], spec.leaf_modules), inputs, point.node, point.axis
    )
    attack_map = _attack_map(features)
    strengths = torch.linspace(0.0, math.log10(max_condition), 81, dtype=torch.float64).tolist()
    curve = [linear_cka(features, features @ attack_map(t).T) for t in strengths]
    crossing = next((k for k in range(1, len(curve)) if curve[k] <= target), None)
    if not 0.0 < target < 1.0 or crossing is None:
        raise ValueError(
            f"target CKA {target} is out of reach for space {space!r}: maps of condition number "
            f"up to {max_condition:.0e} give CKA in [{min(curve):.4f}, 1]; choose a target in "
            "that range or raise max_condition"
        )
    low, high = strengths[crossing - 1], strengths[crossing]
    for _ in range(100):
        middle = (low + high) / 2
        if linear_cka(features, features @ attack_map(middle).T) > target:
            low = middle
        else:
            high = middle
    strength = (low + high) / 2
    matrix = attack_map(strength)
    attacked = _attack_graph(reference, spec, chosen, matrix)
    new_logits, new_features = _run(attacked, inputs, point.node, point.axis)
    change = float((new_logits - logits).norm() / logits.norm().clamp_min(1e-300))
    if change > rtol:
        raise ValueError(
            f"space {space!r}: absorbing the map into its readers changed the logits by "
            f"{change:.2e} relative (> {rtol:.0e}); its features pass through a non-linear step "
            "before the next layer, so this attack does not apply there; choose another space"
        )
    report = CkaAttack(
        space=space,
        node=point.node,
        target=target,
        cka_before=linear_cka(features, features),
        cka_after=linear_cka(features, new_features),
        mean_cca_after=mean_cca(features, new_features, ridge=0.0),
        accuracy_before=float((logits.argmax(1) == labels).double().mean()),
        accuracy_after=float((new_logits.argmax(1) == labels).double().mean()),
        max_relative_logit_change=float(
            ((new_logits - logits).norm(dim=1) / logits.norm(dim=1).clamp_min(1e-300)).max()
        ),
        condition_number=float(torch.linalg.cond(matrix)),
        samples=len(inputs),
        curve_log_condition=strengths,
        curve_cka=curve,
    )
    return report, attacked


def plot_cka_attack(report: CkaAttack, path: str | os.PathLike[str]) -> None:
    """CKA against the map's ``log10`` condition number, the target and the point reached."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.4), layout="constrained")
    ax = figure.subplots()
    ax.plot(report.curve_log_condition, report.curve_cka, color="tab:blue", label="linear CKA")
    ax.axhline(report.target, color="tab:red", linestyle="--", label=f"target {report.target:g}")
    ax.axhline(report.mean_cca_after, color="tab:green", linestyle=":", label="mean CCA")
    ax.plot([math.log10(report.condition_number)], [report.cka_after], "o", color="tab:red")
    ax.set_xlabel("log10 condition number of the map")
    ax.set_ylabel("similarity to the original layer")
    ax.set_ylim(0.0, 1.05)
    ax.set_title(
        f"{report.space}: same function (accuracy {report.accuracy_before:.3f} → "
        f"{report.accuracy_after:.3f}), CKA {report.cka_after:.3f}",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    write_with(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))


__all__ = [
    "CAVEATS",
    "CkaAttack",
    "Similarity",
    "add_analyze_parser",
    "analyze_checkpoints",
    "canonical_correlations",
    "cka_attack",
    "compare_layers",
    "layer_features",
    "linear_cka",
    "mean_cca",
    "pair_similarity",
    "plot_cka_attack",
    "prepare",
]
