"""Weight matching and MergeMany: permutations found from the weights alone, no data.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo Permutation Symmetries",
ICLR 2023 (Algorithm 1, weight matching; Algorithm 3, MergeMany).

Two models. For a space s with C features the score of matching reference feature ``c`` with
model i's feature ``d`` is, summed over every writer, reader and elementwise axis of s,

    L_s[c, d] = Σ_refs ⟨ θ_ref[slice c], θ̃_i[slice d] ⟩

where a slice is the feature's entries along the axis (a block of ``block`` entries from
``offset``; all other axes included; readers' slices are columns) and θ̃_i is model i with the
current permutations of every other axis of the tensor applied. BatchNorm tensors are left out
of the score (they are still permuted with their space): their running statistics describe
the data, not what was learned, and their scale (pre-BatchNorm variances reach 10²) swamped
the weights' inner products, while γ ≈ 1 and β ≈ 0 favour no pairing (the merged accuracies
that decided it are in BENCHMARKS.md, "Measurements behind design choices").

The permutation maximising ``Σ_c L_s[c, π(c)]`` is found by the Hungarian algorithm (within
each group for grouped spaces); spaces are visited in a random order (``seed``) until a full
sweep changes nothing, or ``max_iter`` sweeps. The ascent starts twice, from the identity and
from pairing features by their sorted parameter values (which a permuted copy shares exactly),
and the start reaching the higher total ``Σ ⟨θ_ref, π(θ_i)⟩`` is kept.

N > 2 models (MergeMany): starting from every model weight-matched to the first, each model in
turn, in a random order, is weight-matched to the mean of the others (already permuted),
until a round changes no permutation (at most ``max_iter`` rounds). The consensus coordinates
are then re-expressed in the reference's: ``π_i ← π_i ∘ π_ref⁻¹``, so the reference's maps are
identities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from accord.apply import Transform, permute_axis, sub_tensor
from accord.errors import MergeError
from accord.match._alignment import Alignment
from accord.match._common import assign, check_integer
from accord.registry import Limits, Option, alignment
from accord.spec import AxisRef, FeatureSpace, Spec
from accord.statistics import Statistics

State = dict[str, Tensor]
Perms = dict[str, Tensor]
Axes = dict[str, list[tuple[FeatureSpace, AxisRef]]]


NORM_STATISTICS = ("running_mean", "running_var")


def _scored_spaces(spec: Spec) -> list[FeatureSpace]:
    """The free spaces with only the refs that enter the score: no BatchNorm tensors."""
    norms = {bn.norm for space in spec.free_spaces for bn in space.batchnorms}

    def scored(refs: tuple[AxisRef, ...]) -> tuple[AxisRef, ...]:
        return tuple(
            ref
            for ref in refs
            if ref.tensor.rpartition(".")[0] not in norms
            and ref.tensor.rpartition(".")[2] not in NORM_STATISTICS
        )

    return [
        replace(
            s,
            writers=scored(s.writers),
            readers=scored(s.readers),
            elementwise=scored(s.elementwise),
        )
        for s in spec.free_spaces
    ]


def _slices(tensor: Tensor, ref: AxisRef, size: int) -> Tensor:
    """(C, rest): row c holds every entry of feature c along ``ref``'s axis (in its slice
    ``ref.at`` alone, where it names one)."""
    tensor, ref = sub_tensor(tensor, ref)
    moved = tensor.movedim(ref.axis % tensor.dim(), 0)
    return moved[ref.offset : ref.offset + size * ref.block].reshape(size, -1)


def _score(space: FeatureSpace, target: State, model: State, perms: Perms, axes: Axes) -> Tensor:
    """``L_s`` (C × C, rows target features, columns model features); see the module docs."""
    score = torch.zeros(space.size, space.size, dtype=torch.float64)
    for ref in space.refs:
        tensor = model[ref.tensor]
        for other_space, other in axes[ref.tensor]:
            if other != ref:
                tensor = permute_axis(tensor, other, other_space.size, perms[other_space.name])
        score += _slices(target[ref.tensor], ref, space.size) @ _slices(tensor, ref, space.size).T
    return score


def _match_pair(
    target: State,
    model: State,
    spaces: list[FeatureSpace],
    axes: Axes,
    perms: Perms,
    rng: np.random.Generator,
    max_iter: int,
) -> Perms:
    """Coordinate ascent on ``Σ_s Σ_c L_s[c, π_s(c)]`` from ``perms``; returns new perms."""
    perms = dict(perms)
    for _ in range(max_iter):
        improved = False
        for index in rng.permutation(len(spaces)):
            space = spaces[index]
            score = _score(space, target, model, perms, axes)
            rows = torch.arange(space.size)
            new = assign(score, space.groups)
            old_value = float(score[rows, perms[space.name]].sum())
            gain = float(score[rows, new].sum()) - old_value
            # A relative threshold: rounding must not count as progress, or it never stops.
            if gain > 1e-12 * max(1.0, abs(old_value)):
                perms[space.name] = new
                improved = True
        if not improved:
            break
    return perms


def _signature_start(target: State, model: State, spaces: list[FeatureSpace]) -> Perms:
    """Per space, the pairing of features whose sorted parameter values are nearest.

    Sorting a feature's entries along each of its axes forgets the order of every other
    space, so a model's permuted copy is paired exactly before any other space is solved:
    coordinate ascent from the identity can stall short of that (a local optimum)."""
    perms = {}
    for space in spaces:
        mine, theirs = [], []
        for ref in space.refs:
            mine.append(_slices(target[ref.tensor], ref, space.size).sort(dim=1).values)
            theirs.append(_slices(model[ref.tensor], ref, space.size).sort(dim=1).values)
        distance = torch.cdist(torch.cat(mine, dim=1), torch.cat(theirs, dim=1))
        perms[space.name] = assign(-distance, space.groups)
    return perms


def _agreement(target: State, model: State, spaces: list[FeatureSpace], perms: Perms) -> float:
    """``Σ_tensors ⟨θ_target, π(θ_model)⟩``: the objective weight matching maximises."""
    aligned = _permuted(model, spaces, perms)
    return sum(
        float((target[k] * aligned[k]).sum()) for k in {r.tensor for s in spaces for r in s.refs}
    )


def _match_from_both_starts(
    target: State,
    model: State,
    spaces: list[FeatureSpace],
    axes: Axes,
    rng: np.random.Generator,
    max_iter: int,
) -> Perms:
    """:func:`_match_pair` from the identity and from :func:`_signature_start`; the better."""
    identity = {s.name: torch.arange(s.size) for s in spaces}
    starts = (identity, _signature_start(target, model, spaces))
    found = [_match_pair(target, model, spaces, axes, start, rng, max_iter) for start in starts]
    return max(found, key=lambda perms: _agreement(target, model, spaces, perms))


def _permuted(state: State, spaces: list[FeatureSpace], perms: Perms) -> State:
    out = dict(state)
    for space in spaces:
        for ref in space.refs:
            out[ref.tensor] = permute_axis(out[ref.tensor], ref, space.size, perms[space.name])
    return out


def _merge_many(
    states: list[State],
    spaces: list[FeatureSpace],
    axes: Axes,
    rng: np.random.Generator,
    max_iter: int,
) -> tuple[list[Perms], int]:
    """MergeMany: each model matched to the mean of the others until nothing changes, from
    every model weight-matched to the first."""
    perms = [{s.name: torch.arange(s.size) for s in spaces}]
    perms += [
        _match_from_both_starts(states[0], state, spaces, axes, rng, max_iter)
        for state in states[1:]
    ]
    for round_ in range(1, max_iter + 1):
        changed = False
        for i in rng.permutation(len(states)):
            others = [_permuted(states[j], spaces, perms[j]) for j in range(len(states)) if j != i]
            target = {key: torch.stack([o[key] for o in others]).mean(0) for key in axes}
            new = _match_pair(target, states[i], spaces, axes, perms[i], rng, max_iter)
            changed |= any(not torch.equal(new[s], perms[i][s]) for s in new)
            perms[i] = new
        if not changed:
            return perms, round_
    return perms, max_iter


def _relative_to(perms: list[Perms], reference: int) -> list[Perms]:
    """``π_i ∘ π_ref⁻¹``: reference feature e pairs with model i's ``π_i[π_ref⁻¹[e]]``."""
    inverse = {name: torch.argsort(p) for name, p in perms[reference].items()}
    return [{name: p[inverse[name]] for name, p in model.items()} for model in perms]


def _float64_states(states: Sequence[Mapping[str, Tensor]], axes: Axes) -> list[State]:
    out = []
    for index, state in enumerate(states):
        missing = sorted(name for name in axes if name not in state)
        if missing:
            raise MergeError(f"model {index}'s state dict lacks {missing}, named by the spec")
        out.append({name: state[name].detach().to(torch.float64) for name in axes})
    return out


def _cosine(space: FeatureSpace, target: State, model: State, perms: Perms, axes: Axes) -> float:
    """Cosine similarity of the space's parameters of ``target`` and the aligned ``model``."""
    score = _score(space, target, model, perms, axes)
    matched = float(score[torch.arange(space.size), perms[space.name]].sum())
    norm_t = sum(float(_slices(target[r.tensor], r, space.size).square().sum()) for r in space.refs)
    norm_m = sum(float(_slices(model[r.tensor], r, space.size).square().sum()) for r in space.refs)
    return matched / max((norm_t * norm_m) ** 0.5, 1e-300)


@alignment(
    "weight_matching",
    paper="Ainsworth et al., Git Re-Basin, ICLR 2023 (weight matching; MergeMany for N > 2)",
    label="weight matching",
    options=(
        Option("seed", int, 0, "seed of the random order of the coordinate ascent", Limits(0)),
        Option("max_iter", int, 100, "coordinate-ascent sweeps at most", Limits(1)),
    ),
    permutations=True,
    compare=2,
)
def match_weights(
    spec: Spec,
    statistics: Statistics | None,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
    *,
    seed: int,
    max_iter: int,
) -> Alignment:
    """Permutations of every free space from the weights; the reference keeps identities.

    Report per model: ``cosine_similarity`` of the space's parameters with the reference's
    after alignment. Deterministic for a given ``seed``.
    """
    check_integer("seed", seed, low=0)
    check_integer("max_iter", max_iter, low=1)
    spaces = _scored_spaces(spec)
    axes: Axes = {}
    for space in spaces:
        for ref in space.refs:
            axes.setdefault(ref.tensor, []).append((space, ref))
    models = _float64_states(states, axes)
    rng = np.random.default_rng(seed)
    identity = {s.name: torch.arange(s.size) for s in spaces}
    notes: list[str] = []
    if len(models) <= 2:
        perms = [dict(identity) for _ in models]
        for i in range(len(models)):
            if i != reference:
                target = models[reference]
                perms[i] = _match_from_both_starts(target, models[i], spaces, axes, rng, max_iter)
    else:
        consensus, rounds = _merge_many(models, spaces, axes, rng, max_iter)
        perms = _relative_to(consensus, reference)
        notes.append(f"MergeMany over {len(models)} models, {rounds} round(s)")
    return _alignment(spaces, models, perms, axes, reference, notes)


def _alignment(
    spaces: list[FeatureSpace],
    models: list[State],
    perms: list[Perms],
    axes: Axes,
    reference: int,
    notes: list[str],
) -> Alignment:
    transforms = [{n: Transform.from_permutation(p) for n, p in model.items()} for model in perms]
    report: dict[str, dict[str, Any]] = {}
    for space in spaces:
        scores = {
            i: {"cosine_similarity": _cosine(space, models[reference], models[i], perms[i], axes)}
            for i in range(len(models))
            if i != reference
        }
        report[space.name] = {"method": "weight_matching", "notes": list(notes), "models": scores}
    return Alignment(transforms, report)
