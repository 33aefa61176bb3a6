"""ZipIt!: greedily merge correlated features, across models and within each model.

Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman, "ZipIt! Merging Models from Different Tasks
without Training", ICLR 2024 (Sec. 4; α and β from Sec. 4.3). Re-implemented from the paper
and the authors' ``match_tensors_zipit`` (github.com/gstoica27/ZipIt, matching_functions.py).

The N·C features of all models (reference block first) form clusters, initially singletons,
scored by the correlation matrix R (N·C × N·C, self-pairs excluded). Until C clusters remain,
the two clusters with the highest score merge:

* **α, repeated matching.** The merged cluster's score with a cluster k that shares a model
  with it is ``α · min(score(a, k), score(b, k))``: it may be matched again, at a discount
  (α ∈ (0, 1]). With α = 0 it is never matched again with such a cluster, so every cluster
  holds at most one feature per model (for N = 2: a one-to-one matching). With a cluster of
  other models only, the score is ``min(score(a, k), score(b, k))`` undiscounted: for N > 2
  that completes a cluster with the models it lacks rather than repeating a match, so N
  identical or permuted copies zip back into the model. (The authors' code discounts every
  score; for N = 2 the two rules agree, since every cluster shares a model with a merged one.)
* **β, same-model budget.** A merge is within-model when both clusters have the same origin
  (the model of their first feature, reference first, as in the authors' code). Each model may
  make ``⌊β · (N−1)·C / N⌋`` such merges, an equal share of a fraction β of all merges; then its
  within-model pairs are disabled. β = 0 gives cross-model matches only, β = 1 a free zip.
* **Completion.** The minimum spreads disabled pairs: once the budgets are spent, a cluster is
  barred from every cluster that shares its models, so for N > 2 the greedy can reach a state
  where every pair left is barred before C clusters remain (4 ResNet20 models do at the
  defaults). The best pair by the same scores without the α = 0 and β bars then merges (a
  ``relaxed`` merge, reported with a note), so the zip always reaches width C. (The authors'
  loop takes the arg-max of an all −∞ matrix there: cluster 0 with itself, dropping it.)

Each merged feature is the average of its cluster: with the unmerge matrix U (N·C × C,
``U[f, k] = 1`` when feature f is in cluster k) and the merge matrix ``M = Uᵀ / |cluster|``
(C × N·C), model i's blocks give ``Transform(matrix = N·M_i, inverse = U_i)``; averaging the
N transformed models yields ZipIt's merged writers ``Σ_i M_i W_i`` and readers ``W_i U_i``.
When every cluster holds one feature of each model (a one-to-one matching), the maps are
returned as permutations onto the reference's coordinates instead — the same merge, exactly.
Grouped spaces are zipped per group. Defaults α = 0.3, β = 0.5 were chosen on validation
(benchmarks/defaults_study.py; BENCHMARKS.md, "Measurements behind design choices"); the
authors' ``match_tensors_zipit`` uses β = 0.125.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from accord.apply import Transform
from accord.errors import MergeError
from accord.match._alignment import Alignment
from accord.match._common import (
    align_spaces,
    check_option,
    correlation,
    group_slices,
)
from accord.match.permutation import permutation_match
from accord.registry import Limits, Needs, Option, alignment
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics


@dataclass
class Zip:
    """The clusters of one zipped block and what the greedy merging did.

    ``within[r]`` counts the within-model merges of the model at layout position r.
    """

    clusters: list[list[int]]
    within: list[int]
    merges: dict[str, int] = field(default_factory=dict)
    merge_scores: list[float] = field(default_factory=list)


def zip_features(scores: Tensor, num_models: int, alpha: float, beta: float) -> Zip:
    """Greedy ZipIt! on a (N·B × N·B) correlation matrix laid out model by model.

    Returns B clusters of feature positions, sorted by their first position. α and β decide
    which pairs are allowed; when they allow none before B clusters remain (a same-model
    budget spent, or α = 0, can leave only clusters that share a model), the best pair by
    the scores without those limits merges (counted as ``relaxed``), so the zip always
    reaches the models' width.
    """
    total = scores.shape[0]
    block = total // num_models
    sims = scores.to(torch.float64).clone()
    sims.fill_diagonal_(-math.inf)
    # the same greedy scores without the α = 0 and β limits: the fallback when none is left
    relaxed = sims.clone()
    origin = [f // block for f in range(total)]
    members = {f: [f] for f in range(total)}
    # owners[k, m]: cluster k holds a feature of model m (rows of merged-away clusters clear)
    owners = torch.zeros(total, num_models, dtype=torch.bool)
    owners[torch.arange(total), torch.arange(total) // block] = True
    budget = math.floor(beta * (total - block) / num_models + 1e-9)
    zipped = Zip(
        [], [0] * num_models, {"cross_model": 0, "within_model": 0, "repeated": 0, "relaxed": 0}
    )
    for model in range(num_models):
        _close_budget(sims, origin, members, model, budget, zipped)
    while len(members) > block:
        best = int(sims.argmax())
        relax = bool(sims.view(-1)[best] == -math.inf)
        pick = relaxed if relax else sims
        a, b = sorted(divmod(int(relaxed.argmax()) if relax else best, total))
        zipped.merges["relaxed"] += int(relax)
        zipped.merge_scores.append(float(pick[a, b]))
        _count(zipped, origin, members, a, b)
        merged = torch.minimum(sims[a], sims[b])
        loose = torch.minimum(relaxed[a], relaxed[b])
        shared = (owners & (owners[a] | owners[b])).any(dim=1)
        if alpha > 0:
            merged[shared], loose[shared] = merged[shared] * alpha, loose[shared] * alpha
        else:
            merged[shared] = -math.inf
        for matrix, row in ((sims, merged), (relaxed, loose)):
            matrix[a], matrix[:, a] = row, row
            matrix[b], matrix[:, b] = -math.inf, -math.inf
            matrix[a, a] = -math.inf
        members[a] += members.pop(b)
        owners[a] |= owners[b]
        owners[b] = False
        if origin[a] == origin[b]:
            _close_budget(sims, origin, members, origin[a], budget, zipped)
    zipped.clusters = [sorted(members[k]) for k in sorted(members)]
    return zipped


def _count(zipped: Zip, origin: list[int], members: dict[int, list[int]], a: int, b: int) -> None:
    repeated = len(members[a]) > 1 or len(members[b]) > 1
    zipped.merges["repeated"] += int(repeated)
    if origin[a] == origin[b]:
        zipped.merges["within_model"] += 1
        zipped.within[origin[a]] += 1
    else:
        zipped.merges["cross_model"] += 1


def _close_budget(
    sims: Tensor,
    origin: list[int],
    members: dict[int, list[int]],
    model: int,
    budget: int,
    zipped: Zip,
) -> None:
    """Disable within-model pairs of ``model`` once it has spent its budget."""
    if zipped.within[model] < budget:
        return
    own = torch.tensor([k for k in members if origin[k] == model], dtype=torch.long)
    if own.numel():
        sims[own[:, None], own[None, :]] = -math.inf


def _layout(num_models: int, reference: int) -> list[int]:
    """Model order of the zipped layout: reference first, the others by index."""
    return [reference] + [m for m in range(num_models) if m != reference]


def _group_correlations(
    space: FeatureSpace, stats: SpaceStatistics, order: list[int]
) -> list[Tensor]:
    """Per group, the (N·B × N·B) correlations of its features in every model, laid out model
    by model in ``order``, with zero-variance features made to zip only with each other."""
    blocks = [[correlation(stats, m, n, space.name) for n in order] for m in order]
    variances = [torch.diagonal(stats.covariance(m, m)) for m in order]
    out = []
    for part in group_slices(space.size, space.groups):
        scores = torch.cat([torch.cat([b[part, part] for b in row], dim=1) for row in blocks])
        out.append(_isolate_dead(scores, [v[part] for v in variances]))
    return out


def _isolate_dead(scores: Tensor, variances: list[Tensor], tol: float = 1e-10) -> Tensor:
    """Scores where a zero-variance feature (a ReLU unit that never fires) pairs only with
    zero-variance features of other models: their correlation is undefined, and zipping one
    with a live feature would change the function."""
    dead = torch.cat([v <= tol * v.max().clamp_min(1e-300) for v in variances])
    if not dead.any():
        return scores
    model = torch.cat([torch.full((v.numel(),), m) for m, v in enumerate(variances)])
    scores = scores.clone()
    scores[dead, :] = -1.0
    scores[:, dead] = -1.0
    across = dead[:, None] & dead[None, :] & (model[:, None] != model[None, :])
    scores[across] = 1.0
    return scores


def _one_to_one(zips: list[Zip], num_models: int, block: int) -> bool:
    """Whether every cluster holds exactly one feature of each model."""
    wanted = set(range(num_models))
    return all(
        len(c) == num_models and {f // block for f in c} == wanted for z in zips for c in z.clusters
    )


def _permutations(zips: list[Zip], order: list[int], block: int) -> list[Transform]:
    """One-to-one clusters as permutations: merged feature k is cluster k of its group, whose
    reference feature is k, so the reference gets the identity."""
    size = block * len(zips)
    perms = [torch.empty(size, dtype=torch.long) for _ in order]
    for g, zipped in enumerate(zips):
        for k, cluster in enumerate(zipped.clusters):
            for f in cluster:
                perms[order[f // block]][g * block + k] = g * block + f % block
    return [Transform.from_permutation(p) for p in perms]


def _merge_maps(zips: list[Zip], order: list[int], block: int) -> list[Transform]:
    """``Transform(N·M_i, U_i)`` per model from the clusters (block-diagonal over groups)."""
    size, num_models = block * len(zips), len(order)
    unmerge = [torch.zeros(size, size, dtype=torch.float64) for _ in order]
    counts = torch.zeros(size, dtype=torch.float64)
    for g, zipped in enumerate(zips):
        for k, cluster in enumerate(zipped.clusters):
            counts[g * block + k] = len(cluster)
            for f in cluster:
                unmerge[order[f // block]][g * block + f % block, g * block + k] = 1.0
    # M_i = U_iᵀ / |cluster|: each merged feature is the average of its cluster's features.
    return [Transform(num_models * u.T / counts[:, None], u) for u in unmerge]


def _zip_space(
    space: FeatureSpace,
    stats: SpaceStatistics,
    reference: int,
    num_models: int,
    alpha: float,
    beta: float,
) -> tuple[list[Transform], dict[str, Any]]:
    """ZipIt! in one space: each model's transform and the space's report."""
    order = _layout(num_models, reference)
    block = space.size // space.groups
    zips = [
        zip_features(scores, num_models, alpha, beta)
        for scores in _group_correlations(space, stats, order)
    ]
    merges = {key: sum(z.merges[key] for z in zips) for key in zips[0].merges}
    merged = [c for z in zips for c in z.merge_scores]
    notes = []
    if merges["relaxed"]:
        notes.append(
            f"{merges['relaxed']} merge(s) past the alpha/beta limits, which left no allowed "
            f"pair before {block} clusters per group"
        )
    report: dict[str, Any] = {
        "method": "zipit",
        "notes": notes,
        "models": {
            order[r]: {"within_model_merges": sum(z.within[r] for z in zips)}
            for r in range(num_models)
        },
        "merges": merges,
        "mean_merge_score": sum(merged) / len(merged) if merged else 1.0,
        "one_to_one": _one_to_one(zips, num_models, block),
    }
    if report["one_to_one"]:
        return _permutations(zips, order, block), report
    if space.maps not in ("permutation", "orthogonal"):
        return _merge_maps(zips, order, block), report
    return _fallback(space, stats, reference, num_models, report)


def _fallback(
    space: FeatureSpace,
    stats: SpaceStatistics,
    reference: int,
    num_models: int,
    report: dict[str, Any],
) -> tuple[list[Transform], dict[str, Any]]:
    """Activation matching where ZipIt's many-to-one merge is not an admissible map."""
    note = (
        f"fell back to permutation: ZipIt's merge is not one-to-one ({report['merges']}) and "
        f"the space admits {space.maps} maps only"
    )
    transforms = [Transform.identity(space.size) for _ in range(num_models)]
    models: dict[int, dict[str, Any]] = {}
    for i in range(num_models):
        if i != reference:
            matched = permutation_match(space, stats, reference, i, note)
            transforms[i], models[i] = matched.transform, matched.scores
    return transforms, {**report, "method": "permutation", "notes": [note], "models": models}


@alignment(
    "zipit",
    paper="Stoica et al., ZipIt! Merging Models from Different Tasks without Training, ICLR 2024",
    label="ZipIt!",
    options=(
        Option(
            "alpha",
            float,
            0.3,
            "discount of a merged feature's correlations",
            Limits(0, 1),
            grid=(0.0, 0.1, 0.3, 0.5, 1.0),
            why="it discounts a repeated match's score: 0 never repeats a match, 1 repeats it "
            "at full score",
        ),
        Option(
            "beta",
            float,
            0.5,
            "fraction of merges within a model",
            Limits(0, 1),
            grid=(0.0, 0.125, 0.5, 1.0),
            why="it is the share of all merges made within one model: 0 none, 1 a free zip",
        ),
    ),
    needs=Needs(data=True, all_pairs=True),
    compare=3,
)
def match_zipit(
    spec: Spec,
    statistics: Statistics,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
    *,
    alpha: float,
    beta: float,
) -> Alignment:
    """ZipIt! in every free space with statistics (merged width = original width C).

    ``alpha`` ∈ [0, 1]: discount of a merged feature's correlations (0: no repeated matches).
    ``beta`` ∈ [0, 1]: fraction of merges that may be within a model. N > 2 models need the
    correlations of every pair of models (statistics collected with ``pairs="all"``).

    Report per space: ``merges`` (counts of cross-model, within-model, repeated and relaxed
    merges: those past the α/β limits, which left no allowed pair before width C),
    ``mean_merge_score`` (mean score of the merges made: the correlation, α-discounted for
    repeated ones), ``one_to_one`` (returned as permutations) and, per model,
    ``within_model_merges``.
    """
    check_option("alpha", alpha, low=0.0, high=1.0)
    check_option("beta", beta, low=0.0, high=1.0)
    num_models = len(states)
    if num_models > 2 and statistics.pairs != "all":
        raise MergeError(
            f"zipit merges the features of all {num_models} models jointly and needs the "
            "cross-covariance of every pair of models: collect statistics with pairs='all'"
        )

    def zip_space(
        space: FeatureSpace, stats: SpaceStatistics
    ) -> tuple[dict[int, Transform], dict[str, Any]]:
        maps, report = _zip_space(space, stats, reference, num_models, alpha, beta)
        return dict(enumerate(maps)), report

    return align_spaces(spec, statistics, num_models, zip_space, reference, "zipit")
