"""Weight matching for Llama-family models: every map from the weights alone (no data).

RMSNorm gains are folded into their readers' columns first (``W ⊙ g``) in both models, which
removes the gain-scale symmetry from every comparison. Then, as in Git Re-Basin's weight
matching (Ainsworth et al., ICLR 2023), coordinate descent between

1. the residual permutation ``π``: Hungarian on ``S = Σ_tensors A_sliceᵀ B̃_slice`` over every
   tensor with a residual axis (embedding and readers' columns, writers' rows), ``B̃`` being B
   with the current per-layer maps applied; the first ``π`` comes from the embedding and
   ``lm_head`` columns alone, which no per-layer map touches;
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
from accord.llm.symmetry import LayerSymmetry, Symmetry, transform_tensor
from accord.match._common import assign

State = Mapping[str, Tensor]

_READER_NORM = {"q": "input", "k": "input", "v": "input", "gate": "post", "up": "post"}


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _norm_name(layer: int | None, which: str) -> str:
    if which == "final":
        return "model.norm.weight"
    return (
        f"model.layers.{layer}.{'input' if which == 'input' else 'post_attention'}_layernorm.weight"
    )


def _rows(
    state: State, arch: Architecture, layer: int, proj: str, residual: Tensor | None
) -> Tensor:
    """A reader's rows with its norm's gain folded in, its bias (if any) as a last column and
    the columns gathered by ``residual``."""
    prefix = f"model.layers.{layer}.{'mlp' if proj in ('gate', 'up') else 'self_attn'}.{proj}_proj"
    gain = _f64(state[_norm_name(layer, _READER_NORM[proj])])
    weight = _f64(state[f"{prefix}.weight"]) * gain
    if residual is not None:
        weight = weight[:, residual]
    bias = state.get(f"{prefix}.bias")
    return weight if bias is None else torch.cat([weight, _f64(bias)[:, None]], dim=1)


def _writer_columns(state: State, name: str, residual: Tensor | None) -> Tensor:
    """A writer's columns as rows (features × residual), rows gathered by ``residual``."""
    weight = _f64(state[name])
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


def attention_finish(raw: dict[str, Tensor], arch: Architecture) -> tuple[Tensor, ...]:
    """``(q, k, v, o, qk_a, qk_b)`` for :class:`LayerStats`: the raw products of
    :func:`attention_cross` in each model's canonical q/k scale."""
    fa = qk_factors(raw["q_norm_a"], raw["k_norm_a"])
    fb = qk_factors(raw["q_norm_b"], raw["k_norm_b"])
    ha, hb = (f.repeat_interleave(arch.group_size, dim=0) for f in (fa, fb))
    q = raw["q"] * ha[:, None, :, None, None] * hb[None, :, :, None, None]
    k = raw["k"] / (fa[:, None, :, None, None] * fb[None, :, :, None, None])
    return q, k, raw["v"], raw["o"], fa, fb


def unit_factors(state: State, arch: Architecture, layer: int) -> Tensor:
    """Per SwiGLU unit of ``layer``, the scale that balances its up row (norm gain folded in)
    with its down column: the canonical gauge in which two models' units are compared."""
    up = _rows(state, arch, layer, "up", None)
    down = _writer_columns(state, f"model.layers.{layer}.mlp.down_proj.weight", None)
    return balance(up.norm(dim=1), down.norm(dim=1))


def weight_layer_stats(
    state_a: State, state_b: State, arch: Architecture, layer: int, residual: Tensor | None
) -> LayerStats:
    """Canonical cross products of layer ``layer``'s weights (B's residual axis gathered by
    ``residual``)."""
    sides = []
    for state, perm in ((state_a, None), (state_b, residual)):
        features = {proj: _rows(state, arch, layer, proj, perm) for proj in ("q", "k", "v")}
        features["o"] = _writer_columns(
            state, f"model.layers.{layer}.self_attn.o_proj.weight", perm
        )
        gate, up = (_rows(state, arch, layer, proj, perm) for proj in ("gate", "up"))
        down = _writer_columns(state, f"model.layers.{layer}.mlp.down_proj.weight", perm)
        factor = unit_factors(state, arch, layer)
        sides.append((features, gate, up * factor[:, None], down / factor[:, None], factor))
    q, k, v, o, qk_a, qk_b = attention_finish(attention_cross(sides[0][0], sides[1][0], arch), arch)
    # only Hungarian reads the unit similarity: float32 halves the costliest product's time
    mlp = sum(sides[0][i].float() @ sides[1][i].float().T for i in (1, 2, 3)).double()
    return LayerStats(q, k, v, o, qk_a, qk_b, mlp, sides[0][4], sides[1][4])


def _folded(state: State, name: str, kind: str, layer: int | None) -> Tensor:
    """A residual-axis tensor as (items × d): readers with their gain folded in, writers
    transposed, biases of writers as one row."""
    t = _f64(state[name])
    if kind in _READER_NORM:
        return t * _f64(state[_norm_name(layer, _READER_NORM[kind])])
    if kind == "lm_head":
        return t * _f64(state[_norm_name(None, "final")])
    if kind == "embed":
        return t
    return t[None, :] if t.dim() == 1 else t.T  # o / down: rows are the residual axis


def residual_score(
    state_a: State, state_b: State, arch: Architecture, layers: list[LayerSymmetry] | None
) -> Tensor:
    """``S`` (d × d): A's residual features (rows) against B's (columns), summed over the
    embedding and ``lm_head`` and, when ``layers`` is given, every layer's readers and writers
    with B moved by ``layers``."""
    moves = Symmetry(layers=layers or [])
    score = torch.zeros(arch.hidden, arch.hidden, dtype=torch.float64)
    for name in state_a:
        role = arch.role(name)
        if role.kind in ("buffer", "input_norm", "post_norm", "final_norm"):
            continue  # gains are folded into their readers
        if role.bias and role.kind not in ("o", "down"):
            continue  # reader biases have no residual axis
        if (layers is None and role.layer is not None) or (arch.tied and role.kind == "lm_head"):
            continue  # a tied lm_head is the embedding, which may be stored only once
        moved = {name: transform_tensor(name, state_b[name], moves, arch)}
        if role.kind in _READER_NORM or role.kind == "lm_head":
            gain = _norm_name(role.layer, _READER_NORM.get(role.kind, "final"))
            moved[gain] = state_b[gain]
        # float32 products (summed in float64): the score only feeds Hungarian
        mine = _folded(state_a, name, role.kind, role.layer).float()
        theirs = _folded(moved, name, role.kind, role.layer).float()
        score += mine.T @ theirs
    return score


def gain_scales(state_a: State, state_b: State, name: str, residual: Tensor) -> Tensor:
    """The gain scale ``g_A / g_B[π]`` giving B the gains of A (1 where B's gain is 0)."""
    ga, gb = _f64(state_a[name]), _f64(state_b[name])[residual]
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
    """``symmetry`` completed with the norm-gain scales that give B exactly A's gains."""
    perm = symmetry.residual if symmetry.residual is not None else torch.arange(arch.hidden)
    for i, layer in enumerate(symmetry.layers):
        layer.input_norm_scale = gain_scales(state_a, state_b, _norm_name(i, "input"), perm)
        layer.post_norm_scale = gain_scales(state_a, state_b, _norm_name(i, "post"), perm)
    if not arch.tied:
        symmetry.final_norm_scale = gain_scales(state_a, state_b, _norm_name(None, "final"), perm)
    return symmetry
