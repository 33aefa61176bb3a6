"""CCA Merge: map each model's features onto the reference's by canonical correlation analysis.

Horoi et al., "Harmony in Diversity: Merging Neural Networks with Canonical Correlation
Analysis", ICML 2024. With x the reference's features and y model i's (DESIGN.md §4):

    Sxx' = Sxx + g_x·I,   Syy' = Syy + g_y·I
    K = Sxx'^(-1/2) Sxy Syy'^(-1/2) = U S Vᵀ           (S: canonical correlations, descending)
    T = Sxx'^(1/2) U Vᵀ Syy'^(-1/2),    T⁻¹ = Syy'^(1/2) V Uᵀ Sxx'^(-1/2)

``T`` maps y's features into x's coordinates (writers get ``T``, readers ``T⁻¹``). If y = A x
exactly, then ``T = A⁻¹`` as g → 0 and all canonical correlations are 1.

Ridge. By default ``g`` is scale-relative, computed for each side from its own covariance:
``g_x = r·trace(Sxx)/C`` and ``g_y = r·trace(Syy)/C`` (r = ``ridge``), so that r means the same
for narrow and wide layers and for small and large activations, and a model whose features are
uniformly larger gets a proportionally larger ridge. As r → ∞ this gives
``T → sqrt(g_x/g_y)·U₀V₀ᵀ`` with ``Sxy = U₀S₀V₀ᵀ``: orthogonal Procrustes times the ratio of
the two models' RMS feature scales. ``absolute_ridge`` sets ``g_x = g_y = absolute_ridge``
instead (the reference code's convention, with g chosen from 1e-6…1e7); then T → U₀V₀ᵀ
exactly as g → ∞. Grouped spaces are solved per group block; C is then the block size.

Map kinds (DESIGN.md §3): ``linear``/``dense`` spaces get T; ``orthogonal`` spaces get the
Procrustes map U₀V₀ᵀ (the g → ∞ limit, exact in such spaces); ``permutation`` spaces fall back
to activation matching, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import torch
from torch import Tensor

from accord.apply import SNAP_TOLERANCE, Transform
from accord.errors import MergeError
from accord.match._alignment import Alignment
from accord.match._common import (
    Matched,
    assign,
    check_option,
    covariance,
    group_slices,
    star_alignment,
)
from accord.match.permutation import permutation_match
from accord.registry import FRACTION, POSITIVE, Needs, Option, alignment
from accord.spec import FeatureSpace, Spec
from accord.statistics import SpaceStatistics, Statistics


def spd_roots(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """``(S^(1/2), S^(-1/2))`` of a symmetric positive semi-definite matrix, via ``eigh``.

    Eigenvalues below ``λ_max · C · ε`` (numerically zero) are raised to that floor, so
    that a singular S gives a large but finite inverse root instead of inf or NaN.
    """
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    floor = values.max().clamp_min(1e-300) * matrix.shape[0] * torch.finfo(torch.float64).eps
    values = values.clamp_min(floor)
    root = (vectors * values.sqrt()) @ vectors.T
    inverse_root = (vectors * values.rsqrt()) @ vectors.T
    return root, inverse_root


def ridges(
    sxx: Tensor, syy: Tensor, ridge: float, absolute_ridge: float | None
) -> tuple[float, float]:
    """``(g_x, g_y)``: ``absolute_ridge`` for both, or ``ridge · trace(S)/C`` for each side."""
    if absolute_ridge is not None:
        return float(absolute_ridge), float(absolute_ridge)
    size = sxx.shape[0]
    return ridge * float(torch.trace(sxx)) / size, ridge * float(torch.trace(syy)) / size


# Canonical correlations below this fraction of the largest cannot be told apart from the
# rounding of float32 activations (about sqrt(eps) relative): the statistics do not determine
# how such directions pair, so the pairing is resolved by another criterion (tied_polar).
UNDETERMINED = SNAP_TOLERANCE


def tied_polar(matrix: Tensor, target: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor]:
    """``(Q, S)``: the orthogonal polar factor ``Q = U Vᵀ`` of ``matrix = U S Vᵀ``, and S.

    Q maximises ``trace(Qᵀ matrix)``; it is unique only where the singular values are clearly
    above zero. In the undetermined part (singular values ≤ ``UNDETERMINED · s_max``: dead,
    duplicated or linearly dependent features, whose pairing the SVD picks at random) every
    ``U₁V₁ᵀ + U₀ R V₀ᵀ`` with R orthogonal is an equally good solution; R is chosen closest to
    the matrix ``target()`` (``R = polar(U₀ᵀ target V₀)``, minimising ``‖Q − target‖_F``),
    computed only when some direction is undetermined.
    """
    u, s, vh = torch.linalg.svd(matrix)
    undetermined = s <= UNDETERMINED * s[0] if s.numel() else s.bool()
    if target is None or not bool(undetermined.any()):
        return u @ vh, s
    kept = ~undetermined
    u0, v0 = u[:, undetermined], vh[undetermined].T
    u_r, _, vh_r = torch.linalg.svd(u0.T @ target() @ v0)
    return u[:, kept] @ vh[kept] + u0 @ (u_r @ vh_r) @ v0.T, s


def cca_map(
    sxx: Tensor,
    syy: Tensor,
    sxy: Tensor,
    g_x: float,
    g_y: float,
    target: Callable[[], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(T, T⁻¹, S)`` of CCA Merge for one block; see the module docstring for the formulas.

    ``target()`` (a map of y's features into x's, e.g. :func:`matching_target`) resolves the
    canonical pairs the statistics leave undetermined (:func:`tied_polar`): T is then the CCA
    solution closest to it. The inverse is assembled from its own formula, never by inverting
    T.
    """
    eye = torch.eye(sxx.shape[0], dtype=torch.float64)
    x_root, x_inverse_root = spd_roots(sxx + g_x * eye)
    y_root, y_inverse_root = spd_roots(syy + g_y * eye)
    # T = target ⇔ the rotation is x⁻½ · target · y½: the target in whitened coordinates.
    whitened = None if target is None else lambda: x_inverse_root @ target() @ y_root
    rotation, s = tied_polar(x_inverse_root @ sxy @ y_inverse_root, whitened)
    transform = x_root @ rotation @ y_inverse_root
    inverse = y_root @ rotation.T @ x_inverse_root
    return transform, inverse, s


def nearest_pairing(sxx: Tensor, syy: Tensor, sxy: Tensor) -> Tensor:
    """``perm`` minimising ``Σ_c E[(x_c − y_perm[c])²]`` over centred features (Hungarian).

    Unlike correlation it sees scale, so that features the data leaves ambiguous to CCA
    (scaled duplicates, nearly constant features) still pair with their counterparts.
    """
    distance = torch.diagonal(sxx)[:, None] + torch.diagonal(syy)[None, :] - 2 * sxy
    return assign(-distance)


def matching_target(sxx: Tensor, syy: Tensor, sxy: Tensor) -> Tensor:
    """:func:`nearest_pairing` as a (C, C) map of y's features into x's: the tie-break for
    what CCA leaves undetermined."""
    target = torch.zeros_like(sxy)
    target[torch.arange(sxy.shape[0]), nearest_pairing(sxx, syy, sxy)] = 1.0
    return target


def dead_features(
    sxx: Tensor, syy: Tensor, sxy: Tensor, tol: float = 1e-10, below: float | None = None
) -> tuple[Tensor, Tensor]:
    """Index pairs ``(dead_x, dead_y)`` of features with (numerically) zero variance, or with
    a variance below ``below`` × the mean feature variance of their side when given.

    Such features (ReLU units that never or almost never fire) carry no information for CCA,
    and a dense map would mix their pre-activation weights into live units, waking them. The
    ``k`` least variable features of each side are paired by :func:`nearest_pairing`, ``k``
    being the smaller count.
    """
    var_x, var_y = torch.diagonal(sxx), torch.diagonal(syy)

    def dead(variance: Tensor) -> Tensor:
        threshold = tol * variance.max().clamp_min(1e-300)
        if below is not None:
            threshold = torch.maximum(threshold, below * variance.mean())
        return torch.nonzero(variance <= threshold).flatten()

    dead_x, dead_y = dead(var_x), dead(var_y)
    count = min(dead_x.numel(), dead_y.numel())
    dead_x = dead_x[torch.argsort(var_x[dead_x], stable=True)[:count]].sort().values
    dead_y = dead_y[torch.argsort(var_y[dead_y], stable=True)[:count]].sort().values
    pairing = nearest_pairing(
        sxx[dead_x][:, dead_x], syy[dead_y][:, dead_y], sxy[dead_x][:, dead_y]
    )
    return dead_x, dead_y[pairing]


def cca_block(
    sxx: Tensor,
    syy: Tensor,
    sxy: Tensor,
    ridge: float,
    absolute_ridge: float | None,
    dead_below: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(T, T⁻¹, S, dead)``: CCA on the live features, dead features (``dead_below``: also
    nearly dead ones, :func:`dead_features`) paired one to one."""
    dead_x, dead_y = dead_features(sxx, syy, sxy, below=dead_below)
    size = sxx.shape[0]
    keep = torch.ones(size, dtype=torch.bool)
    live_x, live_y = keep.clone(), keep.clone()
    live_x[dead_x], live_y[dead_y] = False, False
    lx, ly = torch.nonzero(live_x).flatten(), torch.nonzero(live_y).flatten()
    transform = torch.zeros(size, size, dtype=torch.float64)
    inverse = torch.zeros(size, size, dtype=torch.float64)
    s = torch.zeros(0, dtype=torch.float64)
    if lx.numel():
        block_xx, block_yy, block_xy = sxx[lx][:, lx], syy[ly][:, ly], sxy[lx][:, ly]
        g_x, g_y = ridges(block_xx, block_yy, ridge, absolute_ridge)
        target = partial(matching_target, block_xx, block_yy, block_xy)
        live, live_inverse, s = cca_map(block_xx, block_yy, block_xy, g_x, g_y, target)
        transform[lx[:, None], ly[None, :]] = live
        inverse[ly[:, None], lx[None, :]] = live_inverse
    transform[dead_x, dead_y] = 1.0
    inverse[dead_y, dead_x] = 1.0
    return transform, inverse, s, int(dead_x.numel())


# Why a ridge must be positive: the record says it with a value outside the range.
RIDGE_WHY = (
    "it is added to the covariances' diagonal so that their inverse square roots exist; at 0 "
    "a dead or duplicated feature leaves them singular and blows the map up, below 0 they "
    "turn indefinite"
)


def check_ridge(name: str, value: float) -> None:
    """MergeError unless the ridge is a finite number above 0."""
    check_option(name, value, low=0.0)
    if value == 0:
        raise MergeError(
            f"option {name}=0 leaves singular covariances (dead or duplicated features) "
            f"uninverted, which blows the map up; give {name} > 0, e.g. {name}=1e-3"
        )


# Beyond this condition number the float32 weights W·T⁻¹ lose every significant digit.
LARGEST_CONDITION = 1 / torch.finfo(torch.float32).eps


def check_conditioning(
    space: str, transform: Tensor, ridge: float, absolute_ridge: float | None
) -> None:
    """MergeError when a block's map is non-finite or too ill-conditioned to apply in float32."""
    singular = torch.linalg.svdvals(transform)
    condition = float(singular[0] / singular[-1]) if bool(singular[-1] > 0) else math.inf
    if not math.isfinite(condition) or condition > LARGEST_CONDITION:
        given = f"ridge={ridge}" if absolute_ridge is None else f"absolute_ridge={absolute_ridge}"
        raise MergeError(
            f"space {space!r}: the CCA map is ill-conditioned (condition number {condition:.3g} "
            f"with {given}), so applying it would blow the weights up; raise the ridge or use "
            "options='auto' to choose it on validation"
        )


def procrustes(sxx: Tensor, syy: Tensor, sxy: Tensor) -> Tensor:
    """The orthogonal ``R = U Vᵀ`` (``Sxy = U S Vᵀ``) maximising ``trace(Rᵀ Sxy)``, i.e.
    minimising ``E‖x − R y‖²`` over orthogonal R; what Sxy leaves undetermined goes to the
    activation-matching permutation."""
    return tied_polar(sxy, partial(matching_target, sxx, syy, sxy))[0]


# A feature is nearly dead when its variance is below this fraction of its space's mean
# feature variance (ReLU units that fire on almost no sample).
NEARLY_DEAD = 0.01


def nearly_dead_fraction(covariance_matrix: Tensor) -> float:
    """The fraction of features whose variance is below ``NEARLY_DEAD`` × the mean variance."""
    variance = torch.diagonal(covariance_matrix)
    return float((variance < NEARLY_DEAD * variance.mean()).double().mean())


def cca_match(
    space: FeatureSpace,
    stats: SpaceStatistics,
    reference: int,
    i: int,
    *,
    ridge: float,
    absolute_ridge: float | None,
    dead_fallback: float | None = None,
    dead_below: float | None = None,
) -> Matched:
    """CCA Merge of model i onto the reference in one space (block-diagonal when grouped).

    ``dead_fallback``: when at least this fraction of either model's features is nearly dead
    (:func:`nearly_dead_fraction`), a dense space gets activation matching's permutation
    instead, and the report says so. ``dead_below``: features whose variance is below this
    fraction of their side's mean are paired one to one outside the solve, as dead ones are
    (:func:`cca_block`). Report: ``canonical_correlations`` (all groups,
    descending) and their mean.
    """
    if space.maps == "permutation":
        note = "fell back to permutation: the space admits permutations only"
        return permutation_match(space, stats, reference, i, note)
    sxx = covariance(stats, reference, reference, space.name)
    syy = covariance(stats, i, i, space.name)
    sxy = covariance(stats, reference, i, space.name)
    if dead_fallback is not None and space.maps != "orthogonal":
        dead_share = max(nearly_dead_fraction(sxx), nearly_dead_fraction(syy))
        if dead_share >= dead_fallback:
            note = (
                f"fell back to permutation: {dead_share:.0%} of the features are nearly dead "
                f"(dead_fallback={dead_fallback})"
            )
            return permutation_match(space, stats, reference, i, note)
    maps, inverses, correlations, dead = [], [], [], 0
    for part in group_slices(space.size, space.groups):
        block_xx, block_yy, block_xy = sxx[part, part], syy[part, part], sxy[part, part]
        transform, inverse, s, block_dead = cca_block(
            block_xx, block_yy, block_xy, ridge, absolute_ridge, dead_below
        )
        dead += block_dead
        if space.maps == "orthogonal":
            transform = procrustes(block_xx, block_yy, block_xy)
            inverse = transform.T
        check_conditioning(space.name, transform, ridge, absolute_ridge)
        maps.append(transform)
        inverses.append(inverse)
        correlations.append(s)
    canonical = torch.cat(correlations).sort(descending=True).values
    scores = {
        "canonical_correlations": canonical.tolist(),
        "mean_canonical_correlation": float(canonical.mean()) if canonical.numel() else None,
    }
    result = Transform(torch.block_diag(*maps), torch.block_diag(*inverses))
    if space.maps == "orthogonal":
        note = "procrustes: the space admits orthogonal maps only (the g → ∞ limit of CCA)"
        return Matched("procrustes", result, scores, note)
    if dead:
        which = "zero variance" if dead_below is None else f"variance below {dead_below:g}×mean"
        note = f"{dead} features with {which} paired one to one, outside CCA"
        return Matched("cca", result, scores, note)
    return Matched("cca", result, scores)


@alignment(
    "cca",
    paper="Horoi et al., Harmony in Diversity: Merging Neural Networks with CCA, ICML 2024",
    label="CCA Merge",
    options=(
        Option(
            "ridge",
            float,
            1.0,
            "scale-relative regulariser",
            POSITIVE,
            grid=(1e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 10.0),
            why=RIDGE_WHY,
        ),
        Option(
            "absolute_ridge",
            float,
            None,
            "one absolute regulariser instead",
            POSITIVE,
            nullable=True,
            why=RIDGE_WHY,
        ),
        # Off by default: at 0.3 it gains 14 validation points on a mostly dead no-BN pair
        # but costs 0.4–13.9 on the quick bench's no-BN VGG11×0.125 sets, whose spaces it
        # permutes (30–53 % nearly dead) merge better with CCA (design-measurements.json).
        Option(
            "dead_fallback",
            float,
            None,
            "permute spaces with at least this fraction of nearly dead features",
            FRACTION,
            nullable=True,
            why="it is a fraction of a space's features",
        ),
        Option(
            "dead_below",
            float,
            None,
            "pair features below this fraction of the mean variance one to one, outside CCA",
            FRACTION,
            nullable=True,
            why="it is a fraction of the space's mean feature variance",
        ),
    ),
    needs=Needs(data=True),
    compare=5,
)
def match_cca(
    spec: Spec,
    statistics: Statistics,
    states: Sequence[Mapping[str, Tensor]],
    reference: int,
    *,
    ridge: float,
    absolute_ridge: float | None,
    dead_fallback: float | None,
    dead_below: float | None,
) -> Alignment:
    """Align every model to the reference with CCA Merge (star).

    ``ridge`` (r > 0): scale-relative regulariser ``g = r·trace(S)/C`` per side; choose it on
    a validation split. ``absolute_ridge`` (g > 0): overrides it with one absolute g.
    ``dead_fallback`` (0 < f ≤ 1; None, the default: off): dense spaces where at least a
    fraction f of either model's features is nearly dead (variance below 1 % of the space's
    mean) get activation matching's permutation instead. ``dead_below`` (0 < b ≤ 1; None,
    the default: only features of zero variance): features whose variance is below b × their
    side's mean are paired one to one outside the solve, as far as both models have them.
    """
    check_ridge("ridge", ridge)
    if absolute_ridge is not None:
        check_ridge("absolute_ridge", absolute_ridge)
    if dead_fallback is not None:
        check_option("dead_fallback", dead_fallback, low=0.0, high=1.0)
        if dead_fallback == 0:
            raise MergeError(
                "option dead_fallback=0 would permute every space; give a fraction in (0, 1], "
                "or None to keep CCA's maps everywhere"
            )
    if dead_below is not None:
        check_option("dead_below", dead_below, low=0.0, high=1.0)
        if dead_below == 0:
            raise MergeError(
                "option dead_below=0 pairs only features of zero variance, as None does; give "
                "a fraction of the mean variance in (0, 1], or None"
            )
    align = partial(
        cca_match,
        ridge=ridge,
        absolute_ridge=absolute_ridge,
        dead_fallback=dead_fallback,
        dead_below=dead_below,
    )
    return star_alignment(spec, statistics, len(states), reference, "cca", align)
