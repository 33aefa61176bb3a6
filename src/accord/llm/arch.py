"""The Llama-family layout: the sizes a symmetry needs, read from a Hugging Face ``config.json``,
and the role of every tensor name.

Supported: ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (q/k/v
biases). They share one layout: pre-norm decoder layers of grouped-query attention with rotary
embeddings (Hugging Face pairs head dimension ``j`` with ``j + d_h/2``) and a SwiGLU MLP, RMSNorm
everywhere, and an optional tied embedding/``lm_head``. Architectures with anything else between
the projections (Qwen3's per-head q/k norms, partial rotary embeddings) break the q/k maps and
are refused rather than transformed wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from accord.errors import ConfigError, ModelError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# The config entries two models must agree on before their tensors can be compared or merged.
SHAPE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
)

_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_ROLES = {
    "input_layernorm": "input_norm",
    "post_attention_layernorm": "post_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_GLOBAL_ROLES = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "final_norm",
    "lm_head.weight": "lm_head",
}


@dataclass(frozen=True)
class Role:
    """What a tensor is: ``kind`` (q, k, v, o, gate, up, down, input_norm, post_norm, embed,
    final_norm, lm_head, or ``buffer`` for a tensor no symmetry touches), its decoder ``layer``
    (None outside the layers) and whether it is a ``bias``."""

    kind: str
    layer: int | None = None
    bias: bool = False


@dataclass(frozen=True)
class Architecture:
    """The sizes of a Llama-family model: hidden size ``d``, ``layers``, query heads ``n_q``,
    key/value heads ``n_kv`` (``n_q / n_kv`` query heads share each key/value head), head
    dimension ``d_h`` (``d_h / 2`` rotary planes), SwiGLU width ``d_ff``, ``vocab``, and whether
    ``lm_head`` is tied to the embedding."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (Hugging Face ``num_key_value_groups``)."""
        return self.heads // self.kv_heads

    @property
    def planes(self) -> int:
        """Rotary frequency planes per head: dimension ``j`` pairs with ``j + d_h/2``."""
        return self.head_dim // 2

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> Architecture:
        """Read and check the sizes; ModelError naming the entry at fault."""
        name = architecture_name(config, where)
        sizes = {key: _integer(config, key, where) for key in _REQUIRED}
        heads = sizes["num_attention_heads"]
        kv_heads = heads  # configs without the entry predate grouped-query attention
        if config.get("num_key_value_heads") is not None:
            kv_heads = _integer(config, "num_key_value_heads", where)
        head_dim = config.get("head_dim") or sizes["hidden_size"] // heads
        if heads % kv_heads:
            raise ModelError(
                f"{where}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        if head_dim % 2:
            raise ModelError(f"{where}: head_dim={head_dim} is odd; rotary planes need pairs")
        _check_full_rotary(config, where)
        return cls(
            name=name,
            hidden=sizes["hidden_size"],
            layers=sizes["num_hidden_layers"],
            heads=heads,
            kv_heads=kv_heads,
            head_dim=int(head_dim),
            intermediate=sizes["intermediate_size"],
            vocab=sizes["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )

    def role(self, name: str) -> Role:
        """The role of tensor ``name``; ModelError for a tensor this layout does not know."""
        if name in _GLOBAL_ROLES:
            return Role(_GLOBAL_ROLES[name])
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints store; no map moves it
            return Role("buffer")
        match = _LAYER_NAME.match(name)
        kind = _LAYER_ROLES.get(match.group(2)) if match else None
        if match is None or kind is None or int(match.group(1)) >= self.layers:
            raise ModelError(
                f"tensor {name!r} is not part of the {self.name} layout this module transforms "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}); refusing to guess how it moves"
            )
        return Role(kind, int(match.group(1)), match.group(3) == "bias")

    def shape(self, role: Role) -> tuple[int, ...] | None:
        """The shape the config implies for a tensor of this role (None for a buffer)."""
        d, q, kv, ff = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        rows = {"q": q, "k": kv, "v": kv, "o": d, "gate": ff, "up": ff, "down": d}
        columns = {"q": d, "k": d, "v": d, "o": q, "gate": d, "up": d, "down": ff}
        if role.kind in rows:
            return (rows[role.kind],) if role.bias else (rows[role.kind], columns[role.kind])
        if role.kind in ("embed", "lm_head"):
            return (self.vocab, d)
        return None if role.kind == "buffer" else (d,)

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
        """ModelError naming the first tensor whose shape the config does not imply."""
        for name, shape in shapes.items():
            expected = self.shape(self.role(name))
            if expected is not None and tuple(shape) != expected:
                raise ModelError(
                    f"{where}: tensor {name!r} has shape {tuple(shape)}, but config.json implies "
                    f"{expected} (hidden_size, heads, head_dim, intermediate_size, vocab_size)"
                )


_REQUIRED = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
)


def architecture_name(config: dict[str, Any], where: str = "config.json") -> str:
    """The supported architecture named by ``config["architectures"]``, else ModelError listing
    the supported ones."""
    names = config.get("architectures") or []
    supported = [name for name in names if name in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ModelError(
            f"{where}: architectures={names!r} is not supported; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return supported[0]


def _integer(config: dict[str, Any], key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"{where}: {key}={value!r}; expected a positive integer")
    return value


def _check_full_rotary(config: dict[str, Any], where: str) -> None:
    """Partial rotary embeddings rotate only some head dimensions, with another pairing."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    factor = config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        raise ModelError(
            f"{where}: partial_rotary_factor={factor}; only full rotary embeddings are supported"
        )


def check_same_family(configs: dict[str, dict[str, Any]]) -> None:
    """ConfigError naming the first key on which the configs (label → config) disagree."""
    labels = list(configs)
    first = configs[labels[0]]
    for label in labels[1:]:
        other = configs[label]
        if architecture_name(first, labels[0]) != architecture_name(other, label):
            raise ConfigError(
                f"architectures differ: {first['architectures']} in {labels[0]} vs "
                f"{other['architectures']} in {label}"
            )
        a = Architecture.from_config(first, labels[0])
        b = Architecture.from_config(other, label)
        for key, field in zip(SHAPE_KEYS, _FIELDS, strict=True):
            if getattr(a, field) != getattr(b, field):
                raise ConfigError(
                    f"{key} differs: {getattr(a, field)} in {labels[0]} vs "
                    f"{getattr(b, field)} in {label}; the models cannot be aligned or merged"
                )


_FIELDS = ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "tied")
