"""The symmetry table of every transformer family accord aligns: which tensor plays which role,
how its norms are built, and which exact symmetries survive them.

A family is data, not code: :mod:`accord.llm.symmetry` moves a tensor by its role alone
(readers' columns, writers' rows, norm gains, fused projections split into their parts), so
adding a family is adding a row here. An architecture not in :data:`FAMILIES` is refused by name.

Roles inside a decoder layer: ``q``, ``k``, ``v`` (or fused ``qkv``), ``o``; ``gate``, ``up``
(or fused ``gate_up``), ``down``; pre-norms ``attn_norm`` (read by q/k/v) and ``mlp_norm`` (read
by gate/up); post-norms ``attn_out_norm``/``mlp_out_norm`` (on o/down's output before it is
added to the residual stream); per-head ``q_norm``/``k_norm``. Outside the layers: ``embed``,
``pos_embed``, ``final_norm``, ``lm_head``.

Why each excluded symmetry is not exact is in :data:`Family.excluded`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ALL_KINDS = (
    "residual",
    "norm_scale",
    "mlp_perm",
    "mlp_scale",
    "kv_groups",
    "query_heads",
    "vo",
    "qk_rotation",
    "qk_scale",
)

FUSED = MappingProxyType({"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")})
# Roles whose weight is a linear map (stored (in, out) in a Conv1D family).
LINEAR_ROLES = frozenset({"q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down"})


@dataclass(frozen=True, eq=False)  # a table is compared by identity: one per family
class Family:
    """One family's table.

    ``layers``: the prefix of the decoder layers (``model.layers``); ``roles``: module path
    inside a layer → role; ``globals``: module path → role outside the layers; ``norm``:
    ``"rms"``, ``"rms_offset"`` (Gemma: the gain is ``1 + w``) or ``"layer"`` (LayerNorm, gain
    and bias); ``qk_norm``: None, ``"head"`` (one gain of ``d_h`` shared by every head) or
    ``"full"`` (a gain over all ``n · d_h`` outputs); ``conv1d``: weights stored ``(in, out)``
    (GPT-2's Conv1D); ``rotary``: rotary embeddings pair dimension ``j`` with ``j + d_h/2``;
    ``config_keys``: accord's size name → the config entry naming it; ``excluded``: symmetry
    kind → why it is not exact in this family; ``buffers``: tensor names inside a layer that
    no map moves (GPT-2's causal masks, which older checkpoints store).
    """

    layers: str
    roles: Mapping[str, str]
    globals: Mapping[str, str]
    norm: str = "rms"
    qk_norm: str | None = None
    conv1d: bool = False
    rotary: bool = True
    config_keys: Mapping[str, str] = field(default_factory=dict)
    excluded: Mapping[str, str] = field(default_factory=dict)
    buffers: tuple[str, ...] = ()

    @property
    def kinds(self) -> tuple[str, ...]:
        """The exact symmetry kinds of this family."""
        return tuple(kind for kind in ALL_KINDS if kind not in self.excluded)


_LLAMA_ROLES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_LLAMA_GLOBALS = {"model.embed_tokens": "embed", "model.norm": "final_norm", "lm_head": "lm_head"}
_QK_NORMS = {"self_attn.q_norm": "q_norm", "self_attn.k_norm": "k_norm"}
_GEMMA_ROLES = {
    **_LLAMA_ROLES,
    "post_attention_layernorm": "attn_out_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "mlp_out_norm",
}
_HEAD_QK_NORM = (
    "q and k pass through an RMSNorm over each head's d_h dimensions with one gain for every "
    "head: a rotation of a rotary plane does not commute with the gain unless the plane's two "
    "gains are equal (the per-plane q/k scale survives, moved onto the two gains)"
)
_FULL_QK_NORM = (
    "q and k pass through an RMSNorm over all heads' outputs with one gain per output: a "
    "rotation of a rotary plane changes the normalised vector unless the plane's two gains are "
    "equal (the per-plane q/k scale survives, moved onto the gains)"
)
_GELU = "the MLP is gelu(W x): gelu is not positively homogeneous, so no unit scale passes it"

_LLAMA = Family(layers="model.layers", roles=_LLAMA_ROLES, globals=_LLAMA_GLOBALS)
_QWEN3 = Family(
    layers="model.layers",
    roles={**_LLAMA_ROLES, **_QK_NORMS},
    globals=_LLAMA_GLOBALS,
    qk_norm="head",
    excluded={"qk_rotation": _HEAD_QK_NORM},
)
_GEMMA2 = Family(
    layers="model.layers", roles=_GEMMA_ROLES, globals=_LLAMA_GLOBALS, norm="rms_offset"
)
_GEMMA3 = Family(
    layers="model.layers",
    roles={**_GEMMA_ROLES, **_QK_NORMS},
    globals=_LLAMA_GLOBALS,
    norm="rms_offset",
    qk_norm="head",
    excluded={"qk_rotation": _HEAD_QK_NORM},
)
_PHI3 = Family(
    layers="model.layers",
    roles={
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "mlp_norm",
        "self_attn.qkv_proj": "qkv",
        "self_attn.o_proj": "o",
        "mlp.gate_up_proj": "gate_up",
        "mlp.down_proj": "down",
    },
    globals=_LLAMA_GLOBALS,
)
_OLMO2 = Family(
    layers="model.layers",
    roles={
        **{k: v for k, v in _LLAMA_ROLES.items() if not k.endswith("layernorm")},
        **_QK_NORMS,
        "post_attention_layernorm": "attn_out_norm",
        "post_feedforward_layernorm": "mlp_out_norm",
    },
    globals=_LLAMA_GLOBALS,
    qk_norm="full",
    excluded={"qk_rotation": _FULL_QK_NORM},
)
_GPT2 = Family(
    layers="transformer.h",
    roles={
        "ln_1": "attn_norm",
        "attn.c_attn": "qkv",
        "attn.c_proj": "o",
        "ln_2": "mlp_norm",
        "mlp.c_fc": "up",
        "mlp.c_proj": "down",
    },
    globals={
        "transformer.wte": "embed",
        "transformer.wpe": "pos_embed",
        "transformer.ln_f": "final_norm",
        "lm_head": "lm_head",
    },
    norm="layer",
    conv1d=True,
    rotary=False,
    config_keys={
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "intermediate_size": "n_inner",
    },
    excluded={"mlp_scale": _GELU},
    buffers=("attn.bias", "attn.masked_bias"),
)

FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "LlamaForCausalLM": _LLAMA,
        "MistralForCausalLM": _LLAMA,
        "Qwen2ForCausalLM": _LLAMA,
        "Qwen3ForCausalLM": _QWEN3,
        "Gemma2ForCausalLM": _GEMMA2,
        "Gemma3ForCausalLM": _GEMMA3,
        "Phi3ForCausalLM": _PHI3,
        "Olmo2ForCausalLM": _OLMO2,
        "GPT2LMHeadModel": _GPT2,
    }
)
