"""Per-layer matching: key/value groups, query heads, rotary planes, value/output maps and SwiGLU
units of model B found from cross products with reference A (weights or activations alike).

The inputs (:class:`LayerStats`) are sums over a "sample" axis ``x`` of products of A's and B's
features — weight columns for weight matching, tokens for activation matching — after each
model was put in a canonical scale (so the scale symmetries cannot hide a match):

- q/k: per key/value group ``g`` and plane ``j`` a factor ``c`` with q ``× c`` and k ``÷ c``
  that gives q (all heads of the group) and k the same norm; the B→A scale is then
  ``c_B / c_A``.
- SwiGLU units: a factor with up ``× c`` and down ``÷ c`` (weights: equal up and down norms;
  activations: unit RMS of the hidden unit); the B→A scale is ``c_B / c_A``.

Matching maximises the summed inner products after the map, as in Git Re-Basin (Ainsworth et
al., ICLR 2023), with the continuous maps solved in closed form (orthogonal Procrustes):

- a plane's best rotation of B onto A, for the 2×2 cross product ``C = Σ a bᵀ``, maximises
  ``⟨R(φ), C⟩ = (C₀₀ + C₁₁) cos φ + (C₁₀ − C₀₁) sin φ``: ``φ = atan2(C₁₀ − C₀₁, C₀₀ + C₁₁)``, with
  value ``hypot(C₀₀ + C₁₁, C₁₀ − C₀₁)``. q and k of a group share the angle, so their ``C`` add.
- a group's value/output map maximises ``⟨M, C_v + Σ_h C_o,h⟩`` over orthogonal ``M``: ``U Vᵀ``
  from the SVD, with value the nuclear norm.

Heads within a candidate pair of groups are first assigned by their own best values (Hungarian),
groups by the resulting group values (Hungarian), then heads are re-assigned under the shared
maps until nothing changes. SwiGLU units: Hungarian on the unit similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from accord.llm.arch import Architecture
from accord.llm.symmetry import LayerSymmetry
from accord.match._common import assign


@dataclass
class LayerStats:
    """Canonical cross products of one layer; rows are A's features, columns B's.

    ``q`` (n_q, n_q, P, 2, 2), ``k`` (n_kv, n_kv, P, 2, 2): per plane ``j`` the 2×2 products of
    dimensions ``(j, j + d_h/2)``; ``v`` (n_kv, n_kv, d_h, d_h); ``o`` (n_q, n_q, d_h, d_h) for the
    o_proj column blocks (weights) or o_proj inputs (activations); ``qk_a``/``qk_b`` (n_kv, P)
    the canonical q factors; ``mlp`` (d_ff, d_ff) unit similarity; ``mlp_a``/``mlp_b`` (d_ff,)
    the canonical up factors.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    o: Tensor
    qk_a: Tensor
    qk_b: Tensor
    mlp: Tensor
    mlp_a: Tensor
    mlp_b: Tensor


def balance(norm_up: Tensor, norm_down: Tensor) -> Tensor:
    """The factor ``c`` giving ``c · norm_up = norm_down / c``: ``sqrt(norm_down / norm_up)``
    (1 where either norm is 0, which no positive scale can balance)."""
    ok = (norm_up > 0) & (norm_down > 0)
    return torch.where(ok, (norm_down / norm_up.clamp_min(1e-300)).sqrt(), torch.ones_like(norm_up))


def _plane_value(c: Tensor) -> tuple[Tensor, Tensor]:
    """``(C₀₀ + C₁₁, C₁₀ − C₀₁)`` of 2×2 blocks: ``⟨R(φ), C⟩ = re cos φ + im sin φ``."""
    return c[..., 0, 0] + c[..., 1, 1], c[..., 1, 0] - c[..., 0, 1]


def _best_rotation_value(c: Tensor, rotate: bool) -> Tensor:
    """The summed plane values under each plane's best rotation (the identity if the family
    admits none)."""
    re, im = _plane_value(c)
    return (torch.hypot(re, im) if rotate else re).sum(-1)


def _procrustes(c: Tensor) -> Tensor:
    u, _, vh = torch.linalg.svd(c)
    return u @ vh


def _heads(arch: Architecture, group: int) -> slice:
    return slice(group * arch.group_size, (group + 1) * arch.group_size)


def _pair_sums(stats: LayerStats, arch: Architecture, ga: int, gb: int, heads: Tensor):
    """The group pair's summed q/k plane products and v/o products under a head assignment."""
    rows = torch.arange(arch.group_size) + ga * arch.group_size
    cols = heads + gb * arch.group_size
    qk = stats.k[ga, gb] + stats.q[rows, cols].sum(0)
    vo = stats.v[ga, gb] + stats.o[rows, cols].sum(0)
    return qk, vo


def _initial_heads(stats: LayerStats, arch: Architecture) -> tuple[Tensor, Tensor]:
    """Group assignment from each group pair's best value, after an optimistic head assignment
    (each head pair scored with its own best maps)."""
    n_kv, rotate = arch.kv_heads, "qk_rotation" in arch.kinds
    head_value = _best_rotation_value(stats.q, rotate) + torch.linalg.matrix_norm(
        stats.o, ord="nuc"
    )
    within = torch.zeros(n_kv, n_kv, arch.group_size, dtype=torch.long)
    group_value = torch.zeros(n_kv, n_kv, dtype=torch.float64)
    for ga in range(n_kv):
        for gb in range(n_kv):
            within[ga, gb] = assign(head_value[_heads(arch, ga), _heads(arch, gb)])
            qk, vo = _pair_sums(stats, arch, ga, gb, within[ga, gb])
            group_value[ga, gb] = _best_rotation_value(qk, rotate) + torch.linalg.matrix_norm(
                vo, ord="nuc"
            )
    kv_perm = assign(group_value)
    return kv_perm, within[torch.arange(n_kv), kv_perm]


def _shared_maps(stats: LayerStats, arch: Architecture, kv_perm: Tensor, head_perm: Tensor):
    """Per group: the plane angles (P,) and the orthogonal value/output map (d_h, d_h)."""
    angles, maps = [], []
    for g in range(arch.kv_heads):
        qk, vo = _pair_sums(stats, arch, g, int(kv_perm[g]), head_perm[g])
        re, im = _plane_value(qk)
        angles.append(torch.atan2(im, re) if "qk_rotation" in arch.kinds else torch.zeros_like(re))
        maps.append(_procrustes(vo))
    return torch.stack(angles), torch.stack(maps)


def _reassigned_heads(
    stats: LayerStats, arch: Architecture, kv_perm: Tensor, angle: Tensor, vo: Tensor
) -> Tensor:
    """Within each matched group pair, heads assigned under the group's shared maps."""
    perms = []
    for g in range(arch.kv_heads):
        q = stats.q[_heads(arch, g), _heads(arch, int(kv_perm[g]))]
        o = stats.o[_heads(arch, g), _heads(arch, int(kv_perm[g]))]
        re, im = _plane_value(q)
        value = (re * angle[g].cos() + im * angle[g].sin()).sum(-1)
        value = value + torch.einsum("ij,abij->ab", vo[g], o)
        perms.append(assign(value))
    return torch.stack(perms)


def match_layer(stats: LayerStats, arch: Architecture, max_iter: int = 10) -> LayerSymmetry:
    """The layer's maps taking B onto A (norm scales are left to the caller)."""
    kv_perm, head_perm = _initial_heads(stats, arch)
    angle, vo = _shared_maps(stats, arch, kv_perm, head_perm)
    for _ in range(max_iter):
        heads = _reassigned_heads(stats, arch, kv_perm, angle, vo)
        if torch.equal(heads, head_perm):
            break
        head_perm = heads
        angle, vo = _shared_maps(stats, arch, kv_perm, head_perm)
    mlp_perm = assign(stats.mlp)
    kinds = arch.kinds
    return LayerSymmetry(
        kv_perm=kv_perm,
        head_perm=head_perm,
        qk_angle=angle if "qk_rotation" in kinds else None,
        qk_scale=stats.qk_b[kv_perm] / stats.qk_a if "qk_scale" in kinds else None,
        vo_map=vo,
        mlp_perm=mlp_perm,
        mlp_scale=stats.mlp_b[mlp_perm] / stats.mlp_a if "mlp_scale" in kinds else None,
    )
