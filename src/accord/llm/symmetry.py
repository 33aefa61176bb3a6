"""Exact symmetries of decoder-only transformers, applied to state dicts one tensor at a time.

Notation: hidden size ``d``, query heads ``n_q`` in ``n_kv`` key/value groups of ``r = n_q/n_kv``
heads (query head ``h`` reads key/value head ``h // r``), head dimension ``d_h``, MLP width
``d_ff``. A weight ``W`` is ``(out, in)`` (a Conv1D weight is transposed in and out); "readers"
are q/k/v/gate/up (and ``lm_head``), which read the residual stream through their columns;
"writers" are o/down, whose rows add to it (through a post-norm where the family has one, whose
gain is then permuted like a writer's rows). Fused projections (Phi-3's ``qkv_proj`` and
``gate_up_proj``, GPT-2's ``c_attn``) move part by part. Which tensor is which, and which kinds
are exact, is the family's table (:mod:`accord.llm.families`); a map of a kind the family
excludes is refused.

Every map below leaves the logits unchanged (Horoi et al. 2025 use these maps to move a task
vector between diverged models; Ainsworth et al. 2023 the permutations):

- **residual** ``π`` (d): embedding (and position embedding) columns, every norm gain (and
  LayerNorm bias), readers' columns, writers' rows and biases and ``lm_head`` columns are
  gathered by ``π``. RMSNorm and LayerNorm commute with permutations; not with per-dimension
  scales, so there is no residual scale symmetry.
- **norm_scale** ``s`` (d, per pre-norm): gain ``g ← g ⊙ s`` (Gemma's stored ``w`` with gain
  ``1 + w``: ``w ← (1 + w) ⊙ s − 1``; a LayerNorm's bias too, ``b ← b ⊙ s``) and the columns of
  the readers of that norm ``← W / s``. The final norm's readers are ``lm_head``, so it is
  skipped when tied; post-norms have none (their gain writes to the residual stream).
- **mlp_perm** ``σ`` (d_ff): gate rows, up rows, down columns; **mlp_scale** ``c > 0``: up rows
  ``× c``, down columns ``÷ c`` (``silu(g)·(c u)/c = silu(g)·u``; never the gate, silu is not
  homogeneous).
- **kv_groups** ``ρ`` (n_kv): k/v row blocks move with the q row blocks and o column blocks of
  the group's ``r`` query heads; **query_heads**: a permutation of the heads within each group.
- **vo** ``M_g`` (d_h × d_h, invertible, orthogonal by default): v rows of group ``g``
  ``← M_g v``, and the o column block of every query head of ``g`` ``← O_h M_g⁻¹``.
- **qk_rotation** ``φ_{g,j}`` and **qk_scale** ``s_{g,j}`` per group and rotary plane ``j``
  (dimensions ``j`` and ``j + d_h/2``, Hugging Face's pairing): q rows ``← s R(φ) q`` and k rows
  ``← s⁻¹ R(φ) k``. RoPE rotates plane ``j`` by ``R(m θ_j)``, which commutes with ``R(φ)``, so
  ``⟨R_m q', R_n k'⟩ = qᵀ R(φ)ᵀ R((n−m)θ) R(φ) k = ⟨R_m q, R_n k⟩``. k is shared by the group,
  so the angle and scale are per group. Biases (Qwen2) move with their rows. A q/k norm over
  all heads' outputs (OLMo 2) moves with the heads; one over ``d_h`` shared by all heads
  (Qwen3, Gemma 3) is left as is.

A :class:`Symmetry` stores the maps in "gather" form: new index ``i`` takes old index
``perm[i]``; permutations are applied first and the continuous maps then act in the new
coordinates. ``None`` means identity. :func:`transform_tensor` moves one tensor, so a merge can
stream; :func:`apply_symmetry` moves a state dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from accord.check import random_orthogonal
from accord.errors import ModelError
from accord.llm.arch import Architecture, Role
from accord.llm.families import ALL_KINDS, FUSED, LINEAR_ROLES

SYMMETRY_KINDS = ALL_KINDS


@dataclass
class LayerSymmetry:
    """The maps of one decoder layer (shapes in the module docs; None is the identity).

    ``kv_perm`` (n_kv,), ``head_perm`` (n_kv, r): new head ``k`` of new group ``g`` is old head
    ``head_perm[g, k]`` of old group ``kv_perm[g]``; ``qk_angle``/``qk_scale`` (n_kv, d_h/2);
    ``vo_map`` (n_kv, d_h, d_h); ``mlp_perm``/``mlp_scale`` (d_ff,); ``input_norm_scale`` and
    ``post_norm_scale`` (d,) scale the two RMSNorm gains (after the residual permutation).
    """

    kv_perm: Tensor | None = None
    head_perm: Tensor | None = None
    qk_angle: Tensor | None = None
    qk_scale: Tensor | None = None
    vo_map: Tensor | None = None
    mlp_perm: Tensor | None = None
    mlp_scale: Tensor | None = None
    input_norm_scale: Tensor | None = None
    post_norm_scale: Tensor | None = None


@dataclass
class Symmetry:
    """A whole-model map: the residual permutation, the final norm's gain scale and one
    :class:`LayerSymmetry` per decoder layer (an empty list: identity in every layer)."""

    residual: Tensor | None = None
    final_norm_scale: Tensor | None = None
    layers: list[LayerSymmetry] = field(default_factory=list)

    def layer(self, index: int) -> LayerSymmetry:
        return self.layers[index] if self.layers else LayerSymmetry()


def check_symmetry(symmetry: Symmetry, arch: Architecture) -> None:
    """ModelError naming the first map whose shape does not fit ``arch``."""
    d, p, dh = arch.hidden, arch.planes, arch.head_dim
    expected: dict[str, tuple[int, ...]] = {
        "kv_perm": (arch.kv_heads,),
        "head_perm": (arch.kv_heads, arch.group_size),
        "qk_angle": (arch.kv_heads, p),
        "qk_scale": (arch.kv_heads, p),
        "vo_map": (arch.kv_heads, dh, dh),
        "mlp_perm": (arch.intermediate,),
        "mlp_scale": (arch.intermediate,),
        "input_norm_scale": (d,),
        "post_norm_scale": (d,),
    }
    if symmetry.layers and len(symmetry.layers) != arch.layers:
        raise ModelError(f"symmetry has {len(symmetry.layers)} layers, the model {arch.layers}")
    items = [
        ("residual", symmetry.residual, (d,)),
        ("final_norm_scale", symmetry.final_norm_scale, (d,)),
    ]
    for i, layer in enumerate(symmetry.layers):
        items += [(f"layers[{i}].{k}", getattr(layer, k), shape) for k, shape in expected.items()]
    for key, value, shape in items:
        if value is not None and tuple(value.shape) != shape:
            raise ModelError(f"symmetry {key} has shape {tuple(value.shape)}, expected {shape}")
        kind = _MAP_KINDS[key.rpartition(".")[2]]
        if value is not None and kind in arch.family.excluded:
            raise ModelError(
                f"symmetry {key} is a {kind} map, not a symmetry of {arch.name}: "
                f"{arch.family.excluded[kind]}"
            )
    if arch.tied and symmetry.final_norm_scale is not None:
        raise ModelError("final_norm_scale needs an untied lm_head (its readers are the embedding)")
    for i, layer in enumerate(symmetry.layers):
        scale = layer.qk_scale
        if arch.family.qk_norm == "head" and scale is not None and not (scale == scale[:1]).all():
            raise ModelError(
                f"symmetry layers[{i}].qk_scale differs between key/value groups, but "
                f"{arch.name}'s q/k norm gain is shared by every head: one scale per plane"
            )
        for key, norm in (("input_norm_scale", "attn_norm"), ("post_norm_scale", "mlp_norm")):
            if getattr(layer, key) is not None and not arch.has(norm):
                raise ModelError(f"symmetry layers[{i}].{key}: {arch.name} has no such pre-norm")


_MAP_KINDS = {
    "residual": "residual",
    "final_norm_scale": "norm_scale",
    "input_norm_scale": "norm_scale",
    "post_norm_scale": "norm_scale",
    "kv_perm": "kv_groups",
    "head_perm": "query_heads",
    "qk_angle": "qk_rotation",
    "qk_scale": "qk_scale",
    "vo_map": "vo",
    "mlp_perm": "mlp_perm",
    "mlp_scale": "mlp_scale",
}


def transform_tensor(name: str, tensor: Tensor, symmetry: Symmetry, arch: Architecture) -> Tensor:
    """``tensor`` (the model's ``name``) moved by ``symmetry``, in its own dtype.

    Continuous maps are computed in float32 (float64 for float64 tensors); permutations alone
    are exact in any dtype.
    """
    role = arch.role(name)
    if role.kind == "buffer":
        return tensor
    work = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    layer = symmetry.layer(role.layer) if role.layer is not None else LayerSymmetry()
    transposed = arch.family.conv1d and work.dim() == 2 and role.kind in LINEAR_ROLES
    work = work.T if transposed else work
    moved = _MOVES[role.kind](work, role, symmetry, layer, arch)
    return (moved.T if transposed else moved).contiguous().to(tensor.dtype)


def apply_symmetry(
    state: Mapping[str, Tensor], symmetry: Symmetry, arch: Architecture
) -> dict[str, Tensor]:
    """A new state dict: every tensor of ``state`` moved by ``symmetry`` (inputs untouched)."""
    check_symmetry(symmetry, arch)
    return {name: transform_tensor(name, state[name], symmetry, arch) for name in state}


def _gather(t: Tensor, dim: int, index: Tensor | None) -> Tensor:
    return t if index is None else t.index_select(dim, index.to(t.device))


def _scaled(t: Tensor, scale: Tensor | None, dim: int, divide: bool = False) -> Tensor:
    if scale is None:
        return t
    shape = [1] * t.dim()
    shape[dim] = -1
    s = scale.to(t).reshape(shape)
    return t / s if divide else t * s


def _reader(t: Tensor, symmetry: Symmetry, norm_scale: Tensor | None) -> Tensor:
    """Columns of a reader: gathered by the residual permutation, divided by its norm's scale."""
    return _scaled(_gather(t, 1, symmetry.residual), norm_scale, 1, divide=True)


def _planes(x: Tensor, angle: Tensor | None, scale: Tensor | None) -> Tensor:
    """``x`` (n_kv, heads, d_h, rest): each plane ``(j, j + d_h/2)`` ``← scale · R(angle) ·``."""
    if angle is None and scale is None:
        return x
    n_kv, heads, dh, rest = x.shape
    x = x.reshape(n_kv, heads, 2, dh // 2, rest)
    if angle is not None:
        cos = angle.cos().to(x)[:, None, :, None]
        sin = angle.sin().to(x)[:, None, :, None]
        first, second = x[:, :, 0], x[:, :, 1]
        x = torch.stack((cos * first - sin * second, sin * first + cos * second), dim=2)
    if scale is not None:
        x = x * scale.to(x)[:, None, None, :, None]
    return x.reshape(n_kv, heads, dh, rest)


def _query_rows(t: Tensor, layer: LayerSymmetry, arch: Architecture, scaled: bool) -> Tensor:
    x = _gather(t.reshape(arch.kv_heads, arch.group_size, arch.head_dim, -1), 0, layer.kv_perm)
    if layer.head_perm is not None:
        x = x[torch.arange(arch.kv_heads)[:, None], layer.head_perm]
    return _planes(x, layer.qk_angle, layer.qk_scale if scaled else None).reshape(t.shape)


def _key_rows(t: Tensor, layer: LayerSymmetry, arch: Architecture, scaled: bool) -> Tensor:
    x = _gather(t.reshape(arch.kv_heads, 1, arch.head_dim, -1), 0, layer.kv_perm)
    inverse = None if layer.qk_scale is None or not scaled else 1.0 / layer.qk_scale
    return _planes(x, layer.qk_angle, inverse).reshape(t.shape)


def _value_rows(t: Tensor, layer: LayerSymmetry, arch: Architecture) -> Tensor:
    x = _gather(t.reshape(arch.kv_heads, arch.head_dim, -1), 0, layer.kv_perm)
    if layer.vo_map is not None:
        x = torch.einsum("gij,gjr->gir", layer.vo_map.to(x), x)
    return x.reshape(t.shape)


def _output_columns(t: Tensor, layer: LayerSymmetry, arch: Architecture) -> Tensor:
    x = _gather(t.reshape(-1, arch.kv_heads, arch.group_size, arch.head_dim), 1, layer.kv_perm)
    if layer.head_perm is not None:
        x = x[:, torch.arange(arch.kv_heads)[:, None], layer.head_perm]
    if layer.vo_map is not None:
        inverse = torch.linalg.inv(layer.vo_map.to(torch.float64)).to(x)
        x = torch.einsum("dgrj,gji->dgri", x, inverse)
    return x.reshape(t.shape)


Move = Callable[[Tensor, Role, Symmetry, LayerSymmetry, Architecture], Tensor]


def _move_q(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    t = _query_rows(t, layer, arch, scaled=arch.family.qk_norm is None)
    return t if role.bias else _reader(t, sym, layer.input_norm_scale)


def _move_k(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    t = _key_rows(t, layer, arch, scaled=arch.family.qk_norm is None)
    return t if role.bias else _reader(t, sym, layer.input_norm_scale)


def _move_v(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    t = _value_rows(t, layer, arch)
    return t if role.bias else _reader(t, sym, layer.input_norm_scale)


def _move_o(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    t = t if role.bias else _output_columns(t, layer, arch)
    return _gather(t, 0, sym.residual)


def _move_gate(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    t = _gather(t, 0, layer.mlp_perm)
    return t if role.bias else _reader(t, sym, layer.post_norm_scale)


def _move_up(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    t = _scaled(_gather(t, 0, layer.mlp_perm), layer.mlp_scale, 0)
    return t if role.bias else _reader(t, sym, layer.post_norm_scale)


def _move_down(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    if not role.bias:
        t = _scaled(_gather(t, 1, layer.mlp_perm), layer.mlp_scale, 1, divide=True)
    return _gather(t, 0, sym.residual)


def _norm(scale_of: Callable[[Symmetry, LayerSymmetry], Tensor | None]) -> Move:
    """A norm's gain (or LayerNorm bias): gathered by the residual permutation and scaled; a
    Gemma gain is stored as ``w`` with gain ``1 + w``."""

    def move(
        t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
    ) -> Tensor:
        offset = 1.0 if arch.family.norm == "rms_offset" and not role.bias else 0.0
        return _scaled(_gather(t + offset, 0, sym.residual), scale_of(sym, layer), 0) - offset

    return move


def _fused(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    """A fused projection (qkv, gate_up): each part of its rows moved as its own role."""
    rows = arch.fused_rows(role.kind)
    parts = [_MOVES[part](t[rows[part]], role, sym, layer, arch) for part in FUSED[role.kind]]
    return torch.cat(parts, dim=0)


def _move_qk_norm(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    """A q/k norm's gain takes the q/k scale in place of the rows (q ``× s``, k ``÷ s``; the
    norm would undo a scale of the rows). One over all heads' outputs also moves with its
    heads; one over ``d_h`` shared by every head takes the scale every group shares."""
    offset = 1.0 if arch.family.norm == "rms_offset" else 0.0
    gain = t + offset
    if arch.family.qk_norm == "full":
        rows = _query_rows if role.kind == "q_norm" else _key_rows
        return rows(gain, layer, arch, scaled=True) - offset
    if layer.qk_scale is None:
        return t
    scale = layer.qk_scale[:1] if role.kind == "q_norm" else 1.0 / layer.qk_scale[:1]
    return _planes(gain.reshape(1, 1, -1, 1), None, scale).reshape(t.shape) - offset


# A post-norm's gain (on o/down's output, added to the residual stream) is only permuted: a
# scale would change what is added.
_move_residual_rows = _norm(lambda sym, layer: None)


def _move_embed(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    return _gather(t, 1, sym.residual)


def _move_lm_head(
    t: Tensor, role: Role, sym: Symmetry, layer: LayerSymmetry, arch: Architecture
) -> Tensor:
    return _reader(t, sym, sym.final_norm_scale)


_MOVES: dict[str, Move] = {
    "q": _move_q,
    "k": _move_k,
    "v": _move_v,
    "o": _move_o,
    "gate": _move_gate,
    "up": _move_up,
    "down": _move_down,
    "qkv": _fused,
    "gate_up": _fused,
    "attn_norm": _norm(lambda sym, layer: layer.input_norm_scale),
    "mlp_norm": _norm(lambda sym, layer: layer.post_norm_scale),
    "final_norm": _norm(lambda sym, layer: sym.final_norm_scale),
    "attn_out_norm": _move_residual_rows,
    "mlp_out_norm": _move_residual_rows,
    "q_norm": _move_qk_norm,
    "k_norm": _move_qk_norm,
    "embed": _move_embed,
    "pos_embed": _move_embed,
    "lm_head": _move_lm_head,
}


class _Sampler:
    """Random maps from one generator: scales log-uniform in [1/2, 2], uniform angles,
    Haar-random orthogonal matrices."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)

    def perm(self, n: int) -> Tensor:
        return torch.randperm(n, generator=self.gen)

    def scale(self, *shape: int) -> Tensor:
        u = torch.rand(*shape, generator=self.gen, dtype=torch.float64)
        return torch.exp((u - 0.5) * 2 * math.log(2))

    def angle(self, *shape: int) -> Tensor:
        return torch.rand(*shape, generator=self.gen, dtype=torch.float64) * 2 * math.pi

    def orthogonal(self, n: int, size: int) -> Tensor:
        return random_orthogonal(self.gen, n, size, size)

    def invertible(self, n: int, size: int) -> Tensor:
        """Orthogonal × positive diagonal × orthogonal: well conditioned, far from orthogonal."""
        return self.orthogonal(n, size) * self.scale(n, 1, size) @ self.orthogonal(n, size)


def _sample_layer(
    sampler: _Sampler, arch: Architecture, kinds: Collection[str], vo: str
) -> LayerSymmetry:
    n_kv, p, d = arch.kv_heads, arch.planes, arch.hidden

    def pick(kind: str, make: Callable[[], Tensor]) -> Tensor | None:
        return make() if kind in kinds else None

    vo_map = sampler.orthogonal if vo == "orthogonal" else sampler.invertible

    def qk_scale() -> Tensor:
        shared = arch.family.qk_norm == "head"  # one gain for all heads: one scale per plane
        return sampler.scale(1, p).expand(n_kv, p).clone() if shared else sampler.scale(n_kv, p)

    return LayerSymmetry(
        kv_perm=pick("kv_groups", lambda: sampler.perm(n_kv)),
        head_perm=pick(
            "query_heads", lambda: torch.stack([sampler.perm(arch.group_size) for _ in range(n_kv)])
        ),
        qk_angle=pick("qk_rotation", lambda: sampler.angle(n_kv, p)),
        qk_scale=pick("qk_scale", lambda: qk_scale()),
        vo_map=pick("vo", lambda: vo_map(n_kv, arch.head_dim)),
        mlp_perm=pick("mlp_perm", lambda: sampler.perm(arch.intermediate)),
        mlp_scale=pick("mlp_scale", lambda: sampler.scale(arch.intermediate)),
        input_norm_scale=pick("norm_scale", lambda: sampler.scale(d))
        if arch.has("attn_norm")
        else None,
        post_norm_scale=pick("norm_scale", lambda: sampler.scale(d))
        if arch.has("mlp_norm")
        else None,
    )


def sample_symmetry(
    arch: Architecture,
    seed: int = 0,
    kinds: Collection[str] | None = None,
    vo: str = "orthogonal",
) -> Symmetry:
    """A random symmetry of the given ``kinds`` (see :data:`SYMMETRY_KINDS`; None: every kind
    exact in the model's family, ``arch.kinds``).

    Scales are log-uniform in [1/2, 2], angles uniform; ``vo="orthogonal"`` maps are
    Haar-random orthogonal, ``vo="invertible"`` ones orthogonal × positive diagonal (in
    [1/2, 2]) × orthogonal. The final norm's scale is skipped for a tied ``lm_head``. A kind
    that is not a symmetry of the family is refused (ModelError saying why).
    """
    kinds = arch.kinds if kinds is None else kinds
    unknown = set(kinds) - set(SYMMETRY_KINDS)
    if unknown:
        raise ValueError(f"unknown symmetry kinds {sorted(unknown)}; known: {SYMMETRY_KINDS}")
    for kind in sorted(set(kinds) & set(arch.family.excluded)):
        raise ModelError(f"{kind} is not a symmetry of {arch.name}: {arch.family.excluded[kind]}")
    if vo not in ("orthogonal", "invertible"):
        raise ValueError(f"vo={vo!r}; expected 'orthogonal' or 'invertible'")
    sampler = _Sampler(seed)
    layers = [_sample_layer(sampler, arch, kinds, vo) for _ in range(arch.layers)]
    final = None
    if "norm_scale" in kinds and not arch.tied and arch.has("final_norm"):
        final = sampler.scale(arch.hidden)
    residual = sampler.perm(arch.hidden) if "residual" in kinds else None
    return Symmetry(residual=residual, final_norm_scale=final, layers=layers)
