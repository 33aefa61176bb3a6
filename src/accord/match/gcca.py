"""Joint CCA: the canonical variates of all N models from one solve (generalised CCA, MAXVAR).

Star merging aligns every model to one reference pair by pair, so the canonical directions
are those shared with the reference, and the merge favours it. Generalised CCA
(Kettenring, "Canonical analysis of several sets of variables", Biometrika 1971; MAXVAR)
finds shared variates for all models at once. With
each model's features whitened, ``z_i = Σ_i'^(-1/2) (x_i − μ_i)`` (``Σ_i' = Σ_i + g_i·I``,
``g_i = r·trace(Σ_i)/C`` as in CCA Merge), the shared variates are the top C principal
components of the concatenated ``z = [z_1; …; z_N]``, each z_i taken as white, as CCA does:

    M: NC × NC, blocks M_ij = Σ_i'^(-1/2) Σ_ij Σ_j'^(-1/2), M_ii = I;   M V = V Λ   (top C)

Each model's whitened features are carried onto the shared variates by the orthogonal map
that fits them best (Procrustes on ``Cov(z_i, g) = V_i Λ^(1/2)``): ``Q_i = polar(V_i Λ^(1/2))``,
so ``c_i = Q_iᵀ z_i`` are model i's canonical variates. For N = 2 the eigenvectors
are ``[u_k; v_k]/√2`` of CCA's SVD ``K = U S Vᵀ`` (``Λ = 1 + S``), so ``Q_1 = U``, ``Q_2 = V``.

The canonical variates are whitened; the merged network's ReLUs need neuron-like
coordinates. Model i's neurons load on the canonical variates with ``L_i = Σ_i'^(1/2) Q_i``;
the shared space is expressed in model 0's neurons, ``L = L_0``. (Bases that mix the models'
neurons, an average of neurons matched to each other or per shared neuron the matched neuron
closest to the others, treat the models' canonical frames as one, though they agree only
where the canonical correlations are high: the basis comes out ill-conditioned and the merge
of Fashion-MNIST VGG11s lost nearly all accuracy. One model's neurons per space, the model
whose neurons lie most in the shared directions, did no better than model 0's on average.)
Model i's map into the shared space and back are

    T_i = L Q_iᵀ Σ_i'^(-1/2),      T_i⁻¹ = Σ_i'^(1/2) Q_i L⁻¹

so model 0's map is the identity, but every model's canonical variates come from one joint
solve in which no model is the reference. For N = 2, ``T_1 = Σ_0'^(1/2) U Vᵀ Σ_1'^(-1/2)``
is CCA Merge's map (the diagonal blocks of M are taken to be I, as CCA takes them).

Features with zero variance (ReLU units that never fire) carry nothing to correlate and are
paired one to one outside the solve, as CCA Merge does. Directions the statistics leave
undetermined (``λ − 1``, for N = 2 the canonical correlation, below
:data:`accord.match.cca.UNDETERMINED` of the largest: linearly dependent or nearly constant
features, whose whitened correlations the ridge shrinks to rounding level) form a cluster of
eigenvalues at 1 in which eigh mixes the models' features arbitrarily. They are left out of
the polar factors, and each model's rotation there is the one that pairs its features with
model 0's by activation matching (:func:`accord.match.cca.tied_polar` with
:func:`accord.match.cca.matching_target`), CCA Merge's tie-break, so N = 2 is still its map.

Spaces admitting permutations only fall back to activation matching, orthogonal ones to
CCA's Procrustes map, both onto the reference (star), and the report says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from accord.apply import Transform
from accord.match._alignment import Alignment
from accord.match._common import (
    Matched,
    align_spaces,
    covariance,
    group_slices,
)
from accord.match.cca import (
    RIDGE_WHY,
    UNDETERMINED,
    cca_match,
    check_conditioning,
    check_ridge,
    matching_target,
    nearest_pairing,
    ridges,
    spd_roots,
    tied_polar,
)
from accord.match.permutation import permutation_match
from accord.registry import POSITIVE, Needs, Option, alignment
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics


def _paired_with_first(
    covariances: Sequence[Sequence[Tensor]],
    roots: Sequence[Tensor],
    inverse_roots: Sequence[Tensor],
    first: Tensor,
    i: int,
) -> Tensor:
    """The rotation ``Q_i`` that pairs model i's features with model 0's as CCA's tie-break
    does: ``Q_0 Q_iᵀ`` is :func:`accord.match.cca.matching_target` in whitened coordinates
    (:func:`accord.match.cca.cca_map`)."""
    pairing = matching_target(covariances[0][0], covariances[i][i], covariances[0][i])
    return (inverse_roots[0] @ pairing @ roots[i]).T @ first


def gcca_block(
    covariances: Sequence[Sequence[Tensor]], ridge: float
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """``(T_i, T_i⁻¹ per model, Λ/N)`` of MAXVAR on one block of live features.

    ``covariances[i][j]`` is ``Cov(x_i, x_j)`` (C × C). ``Λ/N`` is each shared direction's
    share of variance common to the models (1: perfectly shared), descending.
    """
    count, size = len(covariances), covariances[0][0].shape[0]
    eye = torch.eye(size, dtype=torch.float64)
    roots, inverse_roots = [], []
    for i in range(count):
        g = ridges(covariances[i][i], covariances[i][i], ridge, None)[0]
        root, inverse_root = spd_roots(covariances[i][i] + g * eye)
        roots.append(root)
        inverse_roots.append(inverse_root)
    # the diagonal blocks are the identity, as CCA takes the whitened features to be
    blocks = [
        [
            eye if i == j else inverse_roots[i] @ covariances[i][j] @ inverse_roots[j]
            for j in range(count)
        ]
        for i in range(count)
    ]
    joint = torch.cat([torch.cat(row, dim=1) for row in blocks], dim=0)
    values, vectors = torch.linalg.eigh((joint + joint.T) / 2)
    values, vectors = values.flip(0)[:size].clamp_min(0), vectors.flip(1)[:, :size]
    # undetermined directions (module docstring) out of the polar factors, whose tie-break
    # then pairs every model's features there with model 0's, as CCA's does
    excess = (values - 1).clamp_min(0)
    determined = excess > UNDETERMINED * excess.max()
    weighted = vectors * (values.sqrt() * determined)
    rotations = [tied_polar(weighted[:size], None)[0]]
    for i in range(1, count):
        target = partial(_paired_with_first, covariances, roots, inverse_roots, rotations[0], i)
        rotations.append(tied_polar(weighted[i * size : (i + 1) * size], target)[0])
    # model 0's neurons as the coordinates (module docstring)
    shared = roots[0] @ rotations[0]
    shared_inverse = torch.linalg.inv(shared)
    maps = [shared @ q.T @ w for q, w in zip(rotations, inverse_roots, strict=True)]
    inverses = [r @ q @ shared_inverse for r, q in zip(roots, rotations, strict=True)]
    return maps, inverses, values / count


def _least_variable_dead(variance: Tensor, count: int | None = None, tol: float = 1e-10) -> Tensor:
    """Features with (numerically) zero variance, the ``count`` least variable of them."""
    dead = torch.nonzero(variance <= tol * variance.max().clamp_min(1e-300)).flatten()
    dead = dead[torch.argsort(variance[dead], stable=True)]
    return dead[:count].sort().values


def _dead_pairs(covariances: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """Each model's dead features, ordered to pair with model 0's by
    :func:`accord.match.cca.nearest_pairing`; as many for every model (the smallest count)."""
    variances = [torch.diagonal(covariances[i][i]) for i in range(len(covariances))]
    count = min(_least_variable_dead(v).numel() for v in variances)
    dead = [_least_variable_dead(v, count) for v in variances]
    first = dead[0]
    pairs = [first]
    for i in range(1, len(covariances)):
        own = dead[i]
        order = nearest_pairing(
            covariances[0][0][first][:, first],
            covariances[i][i][own][:, own],
            covariances[0][i][first][:, own],
        )
        pairs.append(own[order])
    return pairs


def joint_block(
    covariances: Sequence[Sequence[Tensor]], ridge: float
) -> tuple[list[Tensor], list[Tensor], Tensor, int]:
    """``(T_i, T_i⁻¹, shared variance, dead)`` of one block, dead features paired outside."""
    count, size = len(covariances), covariances[0][0].shape[0]
    dead = _dead_pairs(covariances)
    live = []
    for indices in dead:
        keep = torch.ones(size, dtype=torch.bool)
        keep[indices] = False
        live.append(torch.nonzero(keep).flatten())
    maps = [torch.zeros(size, size, dtype=torch.float64) for _ in range(count)]
    inverses = [torch.zeros(size, size, dtype=torch.float64) for _ in range(count)]
    shared = torch.zeros(0, dtype=torch.float64)
    if live[0].numel():
        block = [
            [covariances[i][j][live[i]][:, live[j]] for j in range(count)] for i in range(count)
        ]
        live_maps, live_inverses, shared = gcca_block(block, ridge)
        for i in range(count):
            # shared coordinates: the live and dead positions of model 0 (a labelling)
            maps[i][live[0][:, None], live[i][None, :]] = live_maps[i]
            inverses[i][live[i][:, None], live[0][None, :]] = live_inverses[i]
    for i in range(count):
        maps[i][dead[0], dead[i]] = 1.0
        inverses[i][dead[i], dead[0]] = 1.0
    return maps, inverses, shared, int(dead[0].numel())


def _star(
    space: FeatureSpace, stats: SpaceStatistics, reference: int, count: int, ridge: float
) -> list[Matched]:
    """Every model onto the reference: the fall-back where dense joint maps are not allowed."""
    matched = []
    for i in range(count):
        if i == reference:
            matched.append(Matched("identity", Transform.identity(space.size), {}))
        elif space.maps == "permutation":
            note = "fell back to permutation: the space admits permutations only"
            matched.append(permutation_match(space, stats, reference, i, note))
        else:
            matched.append(cca_match(space, stats, reference, i, ridge=ridge, absolute_ridge=None))
    return matched


def gcca_match(
    space: FeatureSpace, stats: SpaceStatistics, reference: int, count: int, ridge: float
) -> list[Matched]:
    """Every model's map into the shared space of one space (block-diagonal when grouped).

    Report per model: ``shared_variance`` (each shared direction's share of variance common to
    all models, descending) and its mean.
    """
    if space.maps in ("permutation", "orthogonal"):
        return _star(space, stats, reference, count, ridge)
    full = [[covariance(stats, i, j, space.name) for j in range(count)] for i in range(count)]
    maps: list[list[Tensor]] = [[] for _ in range(count)]
    inverses: list[list[Tensor]] = [[] for _ in range(count)]
    shares, dead = [], 0
    for part in group_slices(space.size, space.groups):
        block = [[full[i][j][part, part] for j in range(count)] for i in range(count)]
        block_maps, block_inverses, share, block_dead = joint_block(block, ridge)
        dead += block_dead
        shares.append(share)
        for i in range(count):
            check_conditioning(space.name, block_maps[i], ridge, None)
            maps[i].append(block_maps[i])
            inverses[i].append(block_inverses[i])
    share = torch.cat(shares).sort(descending=True).values
    scores = {
        "shared_variance": share.tolist(),
        "mean_shared_variance": float(share.mean()) if share.numel() else None,
    }
    note = f"{dead} features with zero variance paired one to one, outside GCCA" if dead else ""
    return [
        Matched(
            "gcca",
            Transform(torch.block_diag(*maps[i]), torch.block_diag(*inverses[i])),
            scores,
            note,
        )
        for i in range(count)
    ]


@alignment(
    "gcca",
    paper="Kettenring, Canonical analysis of several sets of variables, Biometrika 1971 "
    "(MAXVAR), for CCA Merge of N models in one joint solve",
    label="joint CCA (GCCA)",
    options=(
        Option(
            "ridge",
            float,
            1.0,
            "scale-relative regulariser, as CCA's",
            POSITIVE,
            grid=(1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 10.0),
            why=RIDGE_WHY,
        ),
    ),
    needs=Needs(data=True, all_pairs=True),
)
def match_gcca(
    spec: Spec,
    statistics: Statistics,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
    *,
    ridge: float,
) -> Alignment:
    """Map every model into the shared canonical space of one generalised-CCA solve,
    expressed in model 0's neurons (model 0's maps are identities).

    ``ridge`` (r > 0): scale-relative regulariser ``g_i = r·trace(Σ_i)/C`` per model.
    ``reference`` anchors only the fall-backs of spaces that admit permutations or
    orthogonal maps only.
    """
    check_ridge("ridge", ridge)
    count = len(states)

    def joint(
        space: FeatureSpace, stats: SpaceStatistics
    ) -> tuple[dict[int, Transform], dict[str, Any]]:
        matched = gcca_match(space, stats, reference, count, ridge=ridge)
        methods = sorted({m.method for m in matched if m.method != "identity"}) or ["identity"]
        return dict(enumerate(m.transform for m in matched)), {
            "method": "+".join(methods),
            "notes": sorted({m.note for m in matched if m.note}),
            "models": {i: m.scores for i, m in enumerate(matched) if m.scores},
        }

    return align_spaces(spec, statistics, count, joint, reference, "gcca")
