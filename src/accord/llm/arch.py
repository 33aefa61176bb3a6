"""A model's layout for the symmetries: its sizes, read from a Hugging Face ``config.json``, and
the role of every tensor name, from its family's table (:mod:`accord.llm.families`).

Supported: the architectures of :data:`SUPPORTED_ARCHITECTURES` (Llama, Mistral, Qwen2, Qwen3,
Gemma 2/3, Phi-3, OLMo 2, GPT-2). Anything else, and anything a table does not describe (a
tensor it does not know, partial rotary embeddings), is refused by name rather than transformed
wrongly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from accord.errors import ConfigError, ModelError
from accord.llm.families import FAMILIES, FUSED, Family

SUPPORTED_ARCHITECTURES = tuple(FAMILIES)

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


@dataclass(frozen=True)
class Role:
    """What a tensor is: ``kind`` (a role of :mod:`accord.llm.families`, or ``buffer`` for a
    tensor no symmetry touches), its decoder ``layer`` (None outside the layers) and whether it
    is a ``bias``."""

    kind: str
    layer: int | None = None
    bias: bool = False


@dataclass(frozen=True)
class Architecture:
    """The sizes of a model: hidden size ``d``, ``layers``, query heads ``n_q``, key/value heads
    ``n_kv`` (``n_q / n_kv`` query heads share each key/value head), head dimension ``d_h``
    (``d_h / 2`` rotary planes), MLP width ``d_ff``, ``vocab``, whether ``lm_head`` is tied to
    the embedding, and the ``family`` table naming its tensors."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    family: Family

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (Hugging Face ``num_key_value_groups``)."""
        return self.heads // self.kv_heads

    @property
    def planes(self) -> int:
        """Rotary frequency planes per head: dimension ``j`` pairs with ``j + d_h/2``."""
        return self.head_dim // 2

    @property
    def kinds(self) -> tuple[str, ...]:
        """The exact symmetry kinds of this model's family."""
        return self.family.kinds

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> Architecture:
        """Read and check the sizes; ModelError naming the entry at fault."""
        name = architecture_name(config, where)
        family = FAMILIES[name]
        keys = {key: family.config_keys.get(key, key) for key in _REQUIRED}
        if config.get(keys["intermediate_size"]) is None and family.conv1d:
            config = {**config, keys["intermediate_size"]: 4 * config.get(keys["hidden_size"], 0)}
        sizes = {key: _integer(config, keys[key], where) for key in _REQUIRED}
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
            family=family,
        )

    def has(self, kind: str) -> bool:
        """Whether the family has a tensor of role ``kind`` (q counts when fused into qkv)."""
        roles = {*self.family.roles.values(), *self.family.globals.values()}
        return kind in roles or any(kind in FUSED[r] for r in roles if r in FUSED)

    def locate(self, kind: str, layer: int | None) -> tuple[str, slice | None]:
        """The module holding role ``kind`` (``model.layers.3.self_attn.q_proj``) and the rows
        (output features) it occupies there when fused, else None; KeyError if absent."""
        if layer is None:
            for path, role in self.family.globals.items():
                if role == kind:
                    return path, None
            raise KeyError(kind)
        prefix = f"{self.family.layers}.{layer}"
        for path, role in self.family.roles.items():
            if role == kind:
                return f"{prefix}.{path}", None
            if kind in FUSED.get(role, ()):
                return f"{prefix}.{path}", self.fused_rows(role)[kind]
        raise KeyError(kind)

    def fused_rows(self, fused: str) -> dict[str, slice]:
        """The rows of each part of a fused projection (``qkv``: q, k, v; ``gate_up``)."""
        sizes = {
            "q": self.heads * self.head_dim,
            "k": self.kv_heads * self.head_dim,
            "v": self.kv_heads * self.head_dim,
            "gate": self.intermediate,
            "up": self.intermediate,
        }
        rows, start = {}, 0
        for part in FUSED[fused]:
            rows[part] = slice(start, start + sizes[part])
            start += sizes[part]
        return rows

    def role(self, name: str) -> Role:
        """The role of tensor ``name``; ModelError for a tensor this layout does not know."""
        module, _, param = name.rpartition(".")
        if module in self.family.globals and param in ("weight", "bias"):
            return Role(self.family.globals[module], None, param == "bias")
        if name.endswith("rotary_emb.inv_freq"):  # a buffer old checkpoints store; no map moves it
            return Role("buffer")
        prefix = self.family.layers + "."
        index, _, path = module.removeprefix(prefix).partition(".")
        inside = module.startswith(prefix) and index.isdigit()
        if inside and f"{path}.{param}" in self.family.buffers and int(index) < self.layers:
            return Role("buffer", int(index))
        kind = self.family.roles.get(path) if inside else None
        if kind is None or param not in ("weight", "bias") or int(index) >= self.layers:
            raise ModelError(
                f"tensor {name!r} is not part of the {self.name} layout this module transforms "
                f"(families: {', '.join(SUPPORTED_ARCHITECTURES)}); refusing to guess how it moves"
            )
        return Role(kind, int(index), param == "bias")

    def shape(self, role: Role) -> tuple[int, ...] | None:
        """The shape the config implies for a tensor of this role (None where the config does
        not say: buffers, position embeddings)."""
        d, q, kv, ff = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.intermediate,
        )
        rows = {"q": q, "k": kv, "v": kv, "qkv": q + 2 * kv, "o": d}
        rows |= {"gate": ff, "up": ff, "gate_up": 2 * ff, "down": d}
        columns = {"q": d, "k": d, "v": d, "qkv": d, "o": q, "gate": d, "up": d, "gate_up": d}
        columns["down"] = ff
        if role.kind in rows:
            if role.bias:
                return (rows[role.kind],)
            shape = (rows[role.kind], columns[role.kind])
            return shape[::-1] if self.family.conv1d else shape
        if role.kind in ("q_norm", "k_norm"):
            width = q if role.kind == "q_norm" else kv
            return (width if self.family.qk_norm == "full" else self.head_dim,)
        if role.kind in ("embed", "lm_head"):
            return (self.vocab, d)
        return None if role.kind in ("buffer", "pos_embed") else (d,)

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
