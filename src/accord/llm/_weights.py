"""Weight matching: every map from the weights alone (no data), for any family of
:mod:`accord.llm.families` (tensors are found through the family's table).

Pre-norm gains are folded into their readers' columns first (``W ⊙ g``; a LayerNorm's bias
``b`` into the reader's bias, ``c + W b``) in both models, which removes the gain-scale symmetry
from every comparison; a post-norm's gain is folded into its writer's rows. Then, as in Git
Re-Basin's weight matching (Ainsworth et al., ICLR 2023), coordinate descent between

1. the residual permutation ``π``: Hungarian on ``S = Σ_tensors A_sliceᵀ B̃_slice`` over every
   tensor with a residual axis (embeddings' and readers' columns, writers' rows and biases,
   post-norm gains), ``B̃`` being B with the current per-layer maps applied; the first ``π``
   comes from the embeddings and ``lm_head`` columns alone, which no per-layer map touches;
2. each layer's maps given ``π`` (:func:`accord.llm._solve.match_layer`), from the
   cross products of the layer's weights (rows of q/k/v with their bias as one more column,
   o_proj column blocks, gate/up rows and down columns),

until ``π`` stops changing. Tensors are read one at a time (lazy states stay lazy).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from accord.llm._solve import LayerStats, balance, match_layer
from accord.llm.arch import Architecture
from accord.llm.families import LINEAR_ROLES
from accord.llm.symmetry import LayerSymmetry, Symmetry, transform_tensor
from accord.match._common import assign

State = Mapping[str, Tensor]

_READER_NORM = {
    "q": "attn_norm",
    "k": "attn_norm",
    "v": "attn_norm",
    "gate": "mlp_norm",
    "up": "mlp_norm",
    "lm_head": "final_norm",
}
_WRITER_NORM = {"o": "attn_out_norm", "down": "mlp_out_norm"}


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _param(
    state: State, arch: Architecture, layer: int | None, kind: str, bias: bool = False
) -> Tensor | None:
    """Role ``kind``'s weight as ``(out, in)`` (or its bias), cut out of a fused projection;
    None when the model has no such tensor."""
    if not arch.has(kind):
        return None
    module, rows = arch.locate(kind, layer)
    name = f"{module}.{'bias' if bias else 'weight'}"
    if name not in state:
        return None
    t = _f64(state[name])
    t = t.T if arch.family.conv1d and not bias and kind in LINEAR_ROLES else t
    return t if rows is None else t[rows]


def _gain(state: State, arch: Architecture, layer: int | None, norm: str) -> Tensor | None:
    """The gain of norm role ``norm`` as it multiplies (``1 + w`` for Gemma); None if absent."""
    gain = _param(state, arch, layer, norm)
    return gain + 1 if gain is not None and arch.family.norm == "rms_offset" else gain


def _reader(
    state: State, arch: Architecture, layer: int | None, proj: str
) -> tuple[Tensor, Tensor | None]:
    """A reader's ``(out, d)`` weight with its norm's gain folded in, and its bias (with the
    norm's bias folded in; None if neither exists)."""
    weight, bias = _param(state, arch, layer, proj), _param(state, arch, layer, proj, True)
    norm = _READER_NORM[proj]
    gain, norm_bias = _gain(state, arch, layer, norm), _param(state, arch, layer, norm, True)
    if norm_bias is not None:
        bias = weight @ norm_bias + (0 if bias is None else bias)
    return (weight if gain is None else weight * gain), bias


def _rows(
    state: State, arch: Architecture, layer: int, proj: str, residual: Tensor | None
) -> Tensor:
    """A reader's rows with its norm's gain folded in, its bias (if any) as a last column and
    the columns gathered by ``residual``."""
    weight, bias = _reader(state, arch, layer, proj)
    if residual is not None:
        weight = weight[:, residual]
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


def _writer(state: State, arch: Architecture, layer: int, kind: str) -> Tensor:
    """A writer's ``(d, in)`` weight, its post-norm's gain (if any) folded into its rows."""
    weight = _param(state, arch, layer, kind)
    gain = _gain(state, arch, layer, _WRITER_NORM[kind])
    return weight if gain is None else weight * gain[:, None]


def _writer_columns(
    state: State, arch: Architecture, layer: int, kind: str, residual: Tensor | None
) -> Tensor:
    """A writer's columns as rows (features × residual), rows gathered by ``residual``."""
    weight = _writer(state, arch, layer, kind)
    return (weight if residual is None else weight[residual]).T


def qk_factors(q_norm: Tensor, k_norm: Tensor) -> Tensor:
    """Canonical q factors (n_kv, P) from the squared norms of q (summed over the group's heads)
    and k per plane."""
    return balance(q_norm.sqrt(), k_norm.sqrt())


def _planes(x: Tensor, groups: int, planes: int) -> Tensor:
    """(groups·…·d_h, samples) → (groups, …, 2, P, samples)."""
    return x.reshape(groups, -1, 2, planes, x.shape[-1])


def attention_cross(
    a: dict[str, Tensor], b: dict[str, Tensor], arch: Architecture
) -> dict[str, Tensor]:
    """Raw q, k, v, o cross products and squared q/k plane norms from feature matrices
    (features × samples) ``a[kind]``/``b[kind]``; sums over samples, so batches add up.
    Shared by weight matching (samples: weight columns) and activation matching (tokens)."""
    n_q, n_kv, p, dh = arch.heads, arch.kv_heads, arch.planes, arch.head_dim
    qa, qb = (_planes(side["q"], n_kv, p) for side in (a, b))
    ka, kb = (_planes(side["k"], n_kv, p)[:, 0] for side in (a, b))
    return {
        "q": torch.einsum("hapx,kbpx->hkpab", qa.reshape(n_q, 2, p, -1), qb.reshape(n_q, 2, p, -1)),
        "k": torch.einsum("gapx,fbpx->gfpab", ka, kb),
        "v": torch.einsum(
            "gix,fjx->gfij", a["v"].reshape(n_kv, dh, -1), b["v"].reshape(n_kv, dh, -1)
        ),
        "o": torch.einsum(
            "hix,kjx->hkij", a["o"].reshape(n_q, dh, -1), b["o"].reshape(n_q, dh, -1)
        ),
        "q_norm_a": qa.pow(2).sum((1, 2, 4)),
        "q_norm_b": qb.pow(2).sum((1, 2, 4)),
        "k_norm_a": ka.pow(2).sum((1, 3)),
        "k_norm_b": kb.pow(2).sum((1, 3)),
    }


def attention_finish(
    raw: dict[str, Tensor], arch: Architecture, gains: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, ...]:
    """``(q, k, v, o, qk_a, qk_b)`` for :class:`LayerStats`: the raw products of
    :func:`attention_cross` in each model's canonical q/k scale (factors of 1 where the family
    has no q/k scale symmetry). Under a q/k norm the scale sits on the norm gains, not the
    rows: ``gains`` are then A's and B's canonical factors (:func:`qk_gain_factors`)."""
    if "qk_scale" not in arch.kinds:
        ones = torch.ones_like(raw["k_norm_a"])
        return raw["q"], raw["k"], raw["v"], raw["o"], ones, ones
    if gains is not None:
        return raw["q"], raw["k"], raw["v"], raw["o"], *gains
    fa = qk_factors(raw["q_norm_a"], raw["k_norm_a"])
    fb = qk_factors(raw["q_norm_b"], raw["k_norm_b"])
    ha, hb = (f.repeat_interleave(arch.group_size, dim=0) for f in (fa, fb))
    q = raw["q"] * ha[:, None, :, None, None] * hb[None, :, :, None, None]
    k = raw["k"] / (fa[:, None, :, None, None] * fb[None, :, :, None, None])
    return q, k, raw["v"], raw["o"], fa, fb


def qk_gain_factors(state: State, arch: Architecture, layer: int) -> Tensor | None:
    """Canonical q factors (n_kv, P) from the q/k norm gains (squared norms per group and
    plane, summed over the group's heads); None for a family without q/k norms."""
    if arch.family.qk_norm is None:
        return None
    n_kv, p = arch.kv_heads, arch.planes
    q, k = (_gain(state, arch, layer, kind) for kind in ("q_norm", "k_norm"))
    if arch.family.qk_norm == "full":
        q_norm = q.reshape(n_kv, -1, 2, p).pow(2).sum((1, 2))
        k_norm = k.reshape(n_kv, 2, p).pow(2).sum(1)
    else:  # one gain shared by every head
        q_norm = q.reshape(2, p).pow(2).sum(0).expand(n_kv, p) * arch.group_size
        k_norm = k.reshape(2, p).pow(2).sum(0).expand(n_kv, p)
    return qk_factors(q_norm, k_norm)


def qk_gains(
    state_a: State, state_b: State, arch: Architecture, layer: int
) -> tuple[Tensor, Tensor] | None:
    """A's and B's :func:`qk_gain_factors`, or None for a family without q/k norms."""
    fa, fb = (qk_gain_factors(state, arch, layer) for state in (state_a, state_b))
    return None if fa is None or fb is None else (fa, fb)


def unit_factors(state: State, arch: Architecture, layer: int) -> Tensor:
    """Per MLP unit of ``layer``, the scale that balances its up row (norm gain folded in)
    with its down column: the canonical gauge in which two models' units are compared (1 where
    the family has no unit scale symmetry)."""
    if "mlp_scale" not in arch.kinds:
        return torch.ones(arch.intermediate, dtype=torch.float64)
    up = _rows(state, arch, layer, "up", None)
    down = _writer_columns(state, arch, layer, "down", None)
    return balance(up.norm(dim=1), down.norm(dim=1))


def weight_layer_stats(
    state_a: State, state_b: State, arch: Architecture, layer: int, residual: Tensor | None
) -> LayerStats:
    """Canonical cross products of layer ``layer``'s weights (B's residual axis gathered by
    ``residual``)."""
    sides = []
    for state, perm in ((state_a, None), (state_b, residual)):
        features = {proj: _rows(state, arch, layer, proj, perm) for proj in ("q", "k", "v")}
        features["o"] = _writer_columns(state, arch, layer, "o", perm)
        factor = unit_factors(state, arch, layer)
        units = [_rows(state, arch, layer, "up", perm) * factor[:, None]]
        units.append(_writer_columns(state, arch, layer, "down", perm) / factor[:, None])
        if arch.has("gate"):
            units.append(_rows(state, arch, layer, "gate", perm))
        sides.append((features, units, factor))
    raw = attention_cross(sides[0][0], sides[1][0], arch)
    q, k, v, o, qk_a, qk_b = attention_finish(raw, arch, qk_gains(state_a, state_b, arch, layer))
    # only Hungarian reads the unit similarity: float32 halves the costliest product's time
    pairs = zip(sides[0][1], sides[1][1], strict=True)
    mlp = sum(a.float() @ b.float().T for a, b in pairs).double()
    return LayerStats(q, k, v, o, qk_a, qk_b, mlp, sides[0][2], sides[1][2])


def _residual_features(state: State, arch: Architecture, layer: int | None) -> list[Tensor]:
    """Every ``(items × d)`` slice along the residual axis: for ``layer`` None the embeddings
    and an untied ``lm_head`` (final gain folded in); for a layer its readers (gains folded
    in), its writers' columns and biases, and its post-norm gains."""
    if layer is None:
        found = [_param(state, arch, None, kind) for kind in ("embed", "pos_embed")]
        if not arch.tied:
            found.append(_reader(state, arch, None, "lm_head")[0])
        return [f for f in found if f is not None]
    features = [
        _reader(state, arch, layer, proj)[0]
        for proj in ("q", "k", "v", "gate", "up")
        if arch.has(proj)
    ]
    for kind in ("o", "down"):
        features.append(_writer(state, arch, layer, kind).T)
        bias = _param(state, arch, layer, kind, True)
        gain = _gain(state, arch, layer, _WRITER_NORM[kind])
        features += [t[None, :] for t in (bias, gain) if t is not None]
    return features


def residual_score(
    state_a: State, state_b: State, arch: Architecture, layers: list[LayerSymmetry] | None
) -> Tensor:
    """``S`` (d × d): A's residual features (rows) against B's (columns), summed over the
    embeddings and ``lm_head`` and, when ``layers`` is given, every layer's readers and writers
    with B moved by ``layers``."""
    moves = Symmetry(layers=layers or [])
    names: dict[int | None, list[str]] = {}
    for name in state_b:
        names.setdefault(arch.role(name).layer, []).append(name)
    score = torch.zeros(arch.hidden, arch.hidden, dtype=torch.float64)
    for layer in [None, *(range(arch.layers) if layers is not None else ())]:
        moved = {n: transform_tensor(n, state_b[n], moves, arch) for n in names.get(layer, [])}
        mine = _residual_features(state_a, arch, layer)
        theirs = _residual_features(moved, arch, layer)
        # float32 products (summed in float64): the score only feeds Hungarian
        for a, b in zip(mine, theirs, strict=True):
            score += a.float().T @ b.float()
    return score


def gain_scales(gain_a: Tensor, gain_b: Tensor, residual: Tensor) -> Tensor:
    """The gain scale ``g_A / g_B[π]`` giving B the gains of A (1 where B's gain is 0)."""
    ga, gb = gain_a, gain_b[residual]
    return torch.where(gb != 0, ga / torch.where(gb != 0, gb, 1.0), torch.ones_like(ga))


def weight_alignment(
    state_b: State, state_a: State, arch: Architecture, max_iter: int = 5
) -> Symmetry:
    """The symmetry moving B onto A, from the weights (see the module docs)."""

    def layer_maps(residual: Tensor) -> list[LayerSymmetry]:
        return [
            match_layer(weight_layer_stats(state_a, state_b, arch, i, residual), arch)
            for i in range(arch.layers)
        ]

    residual = assign(residual_score(state_a, state_b, arch, None))
    for _ in range(max_iter):
        layers = layer_maps(residual)
        update = assign(residual_score(state_a, state_b, arch, layers))
        if torch.equal(update, residual):
            break
        residual = update
    else:  # out of sweeps: the layer maps must still belong to the final π
        layers = layer_maps(residual)
    return with_gain_scales(Symmetry(residual=residual, layers=layers), state_a, state_b, arch)


def with_gain_scales(
    symmetry: Symmetry, state_a: State, state_b: State, arch: Architecture
) -> Symmetry:
    """``symmetry`` completed with the pre-norm gain scales that give B exactly A's gains."""
    if "norm_scale" not in arch.kinds:
        return symmetry
    perm = symmetry.residual if symmetry.residual is not None else torch.arange(arch.hidden)

    def scale(layer: int | None, norm: str) -> Tensor | None:
        ga, gb = _gain(state_a, arch, layer, norm), _gain(state_b, arch, layer, norm)
        return None if ga is None or gb is None else gain_scales(ga, gb, perm)

    for i, layer in enumerate(symmetry.layers):
        layer.input_norm_scale = scale(i, "attn_norm")
        layer.post_norm_scale = scale(i, "mlp_norm")
    if not arch.tied:
        symmetry.final_norm_scale = scale(None, "final_norm")
    return symmetry
