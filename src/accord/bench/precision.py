"""How exact the statistics are: float64 shifted sums against a naive float32 E[xxᵀ] − μμᵀ.

On the activations of one model, per feature space (all its observation points pooled, every
spatial position one sample, exactly as :func:`accord.collect_statistics` counts them):

* the reference is an exact two-pass float64 covariance (mean first, then centred products);
* ``accord_float64`` is ``collect_statistics``' covariance (float64, shifted, one pass);
* ``accord_float32`` is the same with ``precision="float32"`` (each chunk's products in
  float32, summed in float64);
* ``naive_float32`` accumulates ``Σx`` and ``Σxxᵀ`` in float32 over the same batches and
  returns ``(Σxxᵀ − n·μμᵀ)/(n − 1)`` in float32.

Errors: normwise ``‖C − C_ref‖_F / ‖C_ref‖_F`` and the largest relative error of a variance
(the diagonal; features whose reference variance is below 1e-12 of the largest are skipped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

import accord
from accord.statistics.collect import observed_samples
from accord.trace.observe import observed_model
from accord.trace.programs import shared_exports

Rows = dict[str, torch.Tensor]


def _space_rows(spec: accord.Spec, observed: dict[str, torch.Tensor]) -> Rows:
    """Each observed space's samples × features rows, its observation points pooled, each
    point's samples as :func:`accord.collect_statistics` takes them (its part of the node's
    features, the rows of its expert summed back into every token)."""
    rows = {}
    for space in spec.spaces:
        if space.free and space.observe:
            width = space.size * space.observed_block
            seen = [(observed_samples(p, width, observed), p.axis) for p in space.observe]
            parts = [tensor.movedim(axis, -1).reshape(-1, width) for tensor, axis in seen]
            rows[space.name] = torch.cat(parts)
    return rows


def _passes(
    model: torch.nn.Module, spec: accord.Spec, batches: Sequence[Any], progress: bool
) -> Callable[[], Any]:
    nodes = [node for s in spec.spaces if s.free for p in s.observe for node in p.nodes]
    example = batches[0][0]
    graph = observed_model(
        model, nodes, example, graph=spec.graph, leaf_modules=spec.leaf_modules
    ).eval()

    @torch.no_grad()
    def rows() -> Any:
        for inputs, _ in tqdm(batches, desc="precision", leave=False, disable=not progress):
            yield _space_rows(spec, graph(inputs)[1])

    return rows


def _errors(estimate: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    estimate = estimate.to(torch.float64)
    normwise = torch.linalg.matrix_norm(estimate - reference) / torch.linalg.matrix_norm(reference)
    variance = torch.diagonal(reference)
    live = variance > 1e-12 * variance.max().clamp_min(1e-300)
    diagonal = (torch.diagonal(estimate) - variance).abs()[live] / variance[live]
    return {"normwise": float(normwise), "variance": float(diagonal.max()) if live.any() else 0.0}


def covariances(rows: Callable[[], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(reference float64 two-pass, naive float32)`` covariances of every space."""
    total64: dict[str, torch.Tensor] = {}
    sums32: dict[str, list[torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for batch in rows():
        for name, x in batch.items():
            x32 = x.to(torch.float32)
            if name not in counts:
                counts[name], total64[name] = 0, torch.zeros(x.shape[1], dtype=torch.float64)
                sums32[name] = [torch.zeros(x.shape[1]), torch.zeros(x.shape[1], x.shape[1])]
            counts[name] += len(x)
            total64[name] += x.to(torch.float64).sum(0)
            sums32[name][0] += x32.sum(0)
            sums32[name][1] += x32.T @ x32
    means = {name: total64[name] / counts[name] for name in counts}
    centred = {name: torch.zeros(len(m), len(m), dtype=torch.float64) for name, m in means.items()}
    for batch in rows():
        for name, x in batch.items():
            deviation = x.to(torch.float64) - means[name]
            centred[name] += deviation.T @ deviation
    reference = {name: centred[name] / (counts[name] - 1) for name in counts}
    naive = {}
    for name, (total, products) in sums32.items():
        n = counts[name]
        mean = total / n
        naive[name] = (products - n * torch.outer(mean, mean)) / (n - 1)
    return reference, naive


@shared_exports()  # the trace and every pass read one exported program
def precision_check(
    dataset: str, arch: str, width: float, samples: int, progress: bool = False
) -> dict[str, Any]:
    """Accord's (both precisions) and naive float32 covariance errors of a seed-0 model's
    spaces."""
    data = accord.load_dataset(dataset)
    torch.manual_seed(0)
    model = accord.build_model(
        arch,
        width=width,
        in_channels=data.in_channels,
        image_size=data.image_size,
        num_classes=data.num_classes,
    ).eval()
    images = data.train.images[:samples]
    batches = [(x, None) for x in images.split(256)]
    spec = accord.trace(model, images[:2])
    stats = {
        precision: accord.collect_statistics(
            # the model as given: the same activations as the references, so only the
            # accumulation differs
            [model],
            batches,
            spec,
            progress=False,
            precision=precision,
            channels_last=False,
            fuse_batchnorms=False,
        )
        for precision in ("float64", "float32")
    }
    reference, naive = covariances(_passes(model, spec, batches, progress))
    spaces = []
    for name, exact in reference.items():
        spaces.append(
            {
                "space": name,
                "features": len(exact),
                "samples": stats["float64"].spaces[name].count,
                "accord_float64": _errors(stats["float64"].spaces[name].covariance(0, 0), exact),
                "accord_float32": _errors(stats["float32"].spaces[name].covariance(0, 0), exact),
                "naive_float32": _errors(naive[name], exact),
            }
        )
    worst = {
        kind: {error: max(s[kind][error] for s in spaces) for error in ("normwise", "variance")}
        for kind in ("accord_float64", "accord_float32", "naive_float32")
    }
    return {"arch": arch, "width": width, "inputs": samples, "max": worst, "spaces": spaces}
