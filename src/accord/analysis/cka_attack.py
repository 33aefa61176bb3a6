"""CKA's failure mode shown, not only written (Davari et al., 2023, "Reliability of CKA as a
Similarity Measure in Deep Learning"): an invertible map of one layer, absorbed by the next,
changes nothing the network computes yet drives linear CKA to any chosen value; mean CCA
stays 1.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from accord._io import write_with
from accord.analysis.similarity import centre, linear_cka, mean_cca
from accord.apply import Transform, apply_transforms
from accord.data import Dataset, make_loader
from accord.spec import FeatureSpace, Spec
from accord.trace import trace
from accord.trace.observe import ObservedModel, observed_model
from accord.trace.programs import shared_exports


def _mix(features: Tensor, matrix: Tensor, axis: int) -> Tensor:
    """``new[c] = Σ_d matrix[c, d] · old[d]`` along ``axis`` of ``features``."""
    return (features.movedim(axis, -1) @ matrix.T).movedim(-1, axis)


def _attack_graph(
    model: nn.Module, spec: Spec, space: FeatureSpace, matrix: Tensor, example: Tensor
) -> ObservedModel:
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
    observed = _observed(copy_, spec, point.node, example)
    gm = observed.module
    gm.register_buffer("cka_attack_map", matrix)
    node = next(n for n in gm.graph.nodes if n.name == point.node)
    with gm.graph.inserting_after(node):
        weights = gm.graph.get_attr("cka_attack_map")
    with gm.graph.inserting_after(weights):
        mixed = gm.graph.call_function(_mix, (node, weights, point.axis))
    node.replace_all_uses_with(mixed, delete_user_cb=lambda user: user is not mixed)
    gm.graph.lint()
    gm.recompile()
    return observed


def _observed(model: nn.Module, spec: Spec, node: str, example: Tensor) -> ObservedModel:
    """``model`` returning ``(logits, {node: features})``, on the graph of ``spec``."""
    return observed_model(
        model, [node], example, graph=spec.graph, leaf_modules=spec.leaf_modules
    ).eval()


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
    centred = centre(features)
    values, vectors = torch.linalg.eigh(centred.T @ centred)
    live = values > 1e-10 * values.max().clamp_min(1e-300)
    exponents = torch.zeros_like(values)
    exponents[live] = torch.linspace(1.0, 0.0, int(live.sum()), dtype=torch.float64)
    return lambda t: vectors @ torch.diag(10.0 ** (t * exponents)) @ vectors.T


@shared_exports()  # the trace and both observed graphs read one exported program
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
    :class:`accord.trace.observe.ObservedModel` returning ``(logits, {observation node:
    features})``).
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
    usable = [
        s.name
        for s in spec.spaces
        if s.free and s.observe and s.readers and not any(p.picks_rows for p in s.observe)
    ]
    if chosen is not None and any(p.picks_rows for p in chosen.observe):
        raise ValueError(
            f"space {space!r} of {type(model).__name__} is one expert's, observed on the tokens "
            "routed to it (Observation.rows): a map of its observed node would change every "
            f"expert's rows; choose one of {usable}"
        )
    if chosen is None or chosen.name not in usable:
        raise ValueError(
            f"space {space!r} of {type(model).__name__} is not one whose features are observed "
            f"and read by a next layer; choose one of {usable}"
        )
    point = chosen.observe[0]
    logits, features = _run(
        _observed(reference, spec, point.node, inputs[:2]), inputs, point.node, point.axis
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
    attacked = _attack_graph(reference, spec, chosen, matrix, inputs[:2])
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
