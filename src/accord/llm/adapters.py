"""peft LoRA adapters of one base model as task vectors, and their exact sum as one adapter.

A LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as peft's
``save_pretrained`` writes it) changes a base weight ``W`` (``out × in``) by the low-rank delta
``ΔW = s · B A`` with ``A`` (``r × in``), ``B`` (``out × r``) and ``s = lora_alpha / r``
(``lora_alpha / √r`` with ``use_rslora``; ``r`` and ``lora_alpha`` per module from
``rank_pattern`` / ``alpha_pattern``, matched as peft matches them). Embeddings
(``lora_embedding_A`` / ``lora_embedding_B``) and Conv1D weights (GPT-2's, stored ``in × out``:
peft's ``fan_in_fan_out``) take the delta transposed; peft decides by the module's class, which
a checkpoint does not record, so accord decides by the base weight's shape, and for a square one
by the family's table (:mod:`accord.llm.families`), else the adapter's ``fan_in_fan_out``.
Tensors the adapter saves whole (``modules_to_save``, trained biases, an embedding's
``base_layer``) replace the base's, so their task vector is ``saved − W``.

:func:`open_adapter` gives an adapter the form of a checkpoint of its base (every base tensor,
each ``W + ΔW``) that also hands out ``ΔW`` itself, so every task-vector merge (task arithmetic,
TIES, DARE, ...) takes adapters as models and writes a full checkpoint.
:func:`merge_adapters` writes task arithmetic of adapters as one adapter: ``λ Σ wᵢ sᵢ Bᵢ Aᵢ``
is ``B A`` for the factors stacked along the rank, ``A = [A₁; A₂; …]`` and
``B = [c₁ B₁, c₂ B₂, …]`` with ``cᵢ = λ wᵢ sᵢ`` (divided by ``Σ wᵢ`` under ``normalize``), at
``lora_alpha = r`` (scale 1). Every module gets the total rank; an adapter that does not target a
module contributes zero blocks there. Methods that prune or elect signs (TIES, DARE) do not keep
the sum low-rank, so they write full checkpoints only.

Refused by name: other peft types, DoRA (``use_dora``), LoRA biases (``lora_bias``) and any
adapter tensor that is not one of the above.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from accord._finite import describe_non_finite
from accord._io import read_json
from accord._outputs import write_folder
from accord.checkpoint import Checkpoint, LazyState, open_checkpoint
from accord.errors import ConfigError, ModelError
from accord.llm.families import FAMILIES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_OUTPUT = "lora-adapter"  # the kind of output folder merge_adapters writes
_PREFIX = "base_model.model."
_FACTOR = re.compile(
    r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])\.weight|lora_embedding_(?P<eab>[AB]))$"
)


def is_adapter(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds a peft adapter (its ``adapter_config.json``)."""
    return (Path(directory) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoraFactors:
    """One module's factors: ``a`` (r × in) and ``b`` (out × r) as stored, the ``scale`` s, and
    whether they belong to an ``embedding`` (whose weight holds the delta transposed)."""

    a: Tensor
    b: Tensor
    scale: float
    embedding: bool

    def delta(self, transposed: bool) -> Tensor:
        """``s · B A`` (``transposed``: its transpose, the base weight's layout), in float32
        (float64 for float64 factors)."""
        dtype = torch.float64 if self.a.dtype == torch.float64 else torch.float32
        product = self.b.to(dtype) @ self.a.to(dtype) * self.scale
        return product.T if transposed else product


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter read from ``path``: its ``config``, the ``factors`` per base tensor name and
    the ``whole`` tensors (base tensor name → (adapter key, tensor)) it replaces."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, LoraFactors]
    whole: dict[str, tuple[str, Tensor]]


def read_adapter(directory: str | os.PathLike[str]) -> LoraAdapter:
    """Read a LoRA adapter folder; ModelError naming the file and entry at fault."""
    path = Path(directory)
    config_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    config = read_json(config_path, ModelError, missing="a LoRA adapter needs its config")
    _check_config(config, config_path)
    if not weights_path.is_file():
        raise ModelError(f"{weights_path} does not exist; a LoRA adapter needs its weights")
    tensors = load_file(weights_path)
    pairs: dict[str, dict[str, Tensor]] = {}
    embeddings: set[str] = set()
    whole: dict[str, tuple[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(_PREFIX):
            raise ModelError(f"{weights_path}: tensor {key!r} does not start with {_PREFIX!r}")
        name = key.removeprefix(_PREFIX)
        match = _FACTOR.match(name)
        if match:
            pairs.setdefault(match.group("module"), {})[match.group("ab") or match.group("eab")] = (
                tensor
            )
            if match.group("eab"):
                embeddings.add(match.group("module"))
        elif "lora_" in name:
            raise ModelError(
                f"{weights_path}: tensor {key!r} is not a LoRA factor accord merges (lora_A, "
                "lora_B, lora_embedding_A/B); DoRA magnitudes and LoRA biases are not supported"
            )
        else:  # saved whole: modules_to_save, trained biases, an embedding's base layer
            whole[name.replace(".base_layer.", ".")] = (key, tensor)
    factors = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ModelError(f"{weights_path}: module {module!r} lacks its lora_A or lora_B")
        rank, alpha = _rank_and_alpha(config, module)
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        factors[f"{module}.weight"] = LoraFactors(pair["A"], pair["B"], scale, module in embeddings)
    return LoraAdapter(path, config, factors, whole)


def _check_config(config: Any, where: Path) -> None:
    if not isinstance(config, dict):
        raise ModelError(f"{where}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ModelError(
            f"{where}: peft_type={config.get('peft_type')!r}; only LoRA adapters (LORA) merge"
        )
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise ModelError(f"{where}: {key}=true is not supported (the delta is not B·A)")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ModelError(f"{where}: {key}={value!r}; expected a positive number")


def _rank_and_alpha(config: dict[str, Any], module: str) -> tuple[float, float]:
    """``r`` and ``lora_alpha`` of ``module``: peft's first pattern key matching the end of the
    module name, else the global values."""

    def pattern(patterns: dict[str, Any] | None, default: float) -> float:
        for key, value in (patterns or {}).items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    return pattern(config.get("rank_pattern"), config["r"]), pattern(
        config.get("alpha_pattern"), config["lora_alpha"]
    )


class AdapterState(LazyState):
    """The tensors of ``base`` with an adapter applied (``W + ΔW``), read lazily, and
    :meth:`delta`, the task vector ``ΔW`` itself (exact, not ``(W + ΔW) − W``)."""

    def __init__(self, adapter: LoraAdapter, base: Checkpoint) -> None:
        super().__init__({name: base.state.file(name) for name in base.state})
        self.adapter, self.base = adapter, base
        self.transposed = {name: self._orientation(name) for name in adapter.factors}
        for name, (_, tensor) in adapter.whole.items():
            self._check_shape(name, tuple(tensor.shape))

    def __getitem__(self, name: str) -> Tensor:
        base = self.base.state[name]
        if name not in self.adapter.factors and name not in self.adapter.whole:
            return base
        delta = self.delta(name)
        return (base.to(delta.dtype) + delta).to(base.dtype)

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``W + ΔW`` (computed whole: ``ΔW`` is not stored by rows)."""
        return self[name][start:stop]

    def delta(self, name: str) -> Tensor:
        """``ΔW`` of tensor ``name`` (zeros where the adapter leaves it), in float32 (float64
        for a float64 base); ModelError if it is not finite."""
        base = self.base.state[name]
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        delta = torch.zeros(base.shape, dtype=dtype)
        if name in self.adapter.whole:
            delta += self.adapter.whole[name][1].to(dtype) - base.to(dtype)
        if name in self.adapter.factors:
            delta += self.adapter.factors[name].delta(self.transposed[name]).to(dtype)
        problem = describe_non_finite(delta)
        if problem is not None:
            raise ModelError(f"{self.adapter.path}: the delta of {name!r} has {problem}")
        return delta

    def _orientation(self, name: str) -> bool:
        """Whether the base weight holds ``B A`` transposed: always for an embedding; else from
        the shapes, and for a square weight from the family (GPT-2's Conv1D) or, for a family
        accord has no table for, the adapter's ``fan_in_fan_out`` (peft decides by the module's
        class, which a checkpoint does not record)."""
        factors = self.adapter.factors[name]
        product = (factors.b.shape[0], factors.a.shape[1])
        if factors.embedding:
            self._check_shape(name, product[::-1])
            return True
        shape = self._check_shape(name, product, product[::-1])
        if product[0] != product[1]:
            return shape != product
        family = FAMILIES.get(next(iter(self.base.config.get("architectures") or []), ""))
        if family is not None:
            return family.conv1d
        return bool(self.adapter.config.get("fan_in_fan_out"))

    def _check_shape(self, name: str, *allowed: tuple[int, ...]) -> tuple[int, ...]:
        """The base's shape of ``name``; ModelError unless it is one of ``allowed``."""
        if name not in self:
            raise ModelError(
                f"{self.adapter.path}: the adapter changes {name!r}, which the base "
                f"{self.base.path} does not have; is it the adapter's base model?"
            )
        shape = tuple(self.info(name).shape)
        if shape not in [tuple(a) for a in allowed]:
            raise ModelError(
                f"{self.adapter.path}: the adapter's {name!r} is {tuple(allowed[0])}, the "
                f"base's {shape} in {self.base.path}; is it the adapter's base model?"
            )
        return shape


def open_adapter(directory: str | os.PathLike[str], base: Checkpoint) -> Checkpoint:
    """The adapter in ``directory`` applied to ``base``, as a checkpoint whose state is an
    :class:`AdapterState` (the base's config and tensor names)."""
    return Checkpoint(Path(directory), base.config, AdapterState(read_adapter(directory), base))


def open_model(directory: str | os.PathLike[str], base: Checkpoint | None) -> Checkpoint:
    """``directory`` opened as a checkpoint, or as an adapter of ``base`` when it holds one
    (ConfigError when an adapter has no base to apply to)."""
    if not is_adapter(directory):
        return open_checkpoint(directory)
    if base is None:
        raise ConfigError(
            f"models: {directory} is a LoRA adapter; its task vector needs the base model it was "
            "trained on as base, with a task-vector method (task_arithmetic, ties, dare, ...)"
        )
    return open_adapter(directory, base)


def merge_adapters(
    adapters: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    scale: float = 1.0,
    normalize: bool = False,
    overwrite: bool = False,
) -> Path:
    """Task arithmetic of LoRA ``adapters`` of ``base`` written as one adapter that peft loads
    (see the module docs): ``λ Σ wᵢ ΔWᵢ`` with ``weights`` wᵢ (default 1 each), ``scale`` λ,
    divided by ``Σ wᵢ`` when ``normalize``. Tensors an adapter saves whole are merged as task
    vectors of the base (``W + λ Σ wᵢ (savedᵢ − W)``). Returns the output folder."""
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if not adapters or len(weights) != len(adapters):
        raise ConfigError(f"weights: {len(weights)} given for {len(adapters)} adapters")
    total = sum(weights)
    if normalize and total == 0:
        raise ConfigError("normalize: the weights sum to 0")
    coefficients = [scale * w / (total if normalize else 1.0) for w in weights]
    base_ck = open_checkpoint(base)
    states = [AdapterState(read_adapter(path), base_ck) for path in adapters]
    _check_mergeable(states)
    ranks = [max((f.a.shape[0] for f in s.adapter.factors.values()), default=0) for s in states]
    tensors = dict(_stacked_factors(states, coefficients, ranks))
    tensors |= dict(_whole_tensors(states, coefficients))
    config = _merged_config(states, max(sum(ranks), 1))
    for key, tensor in tensors.items():
        problem = describe_non_finite(tensor)
        if problem is not None:
            raise ModelError(
                f"merged adapter tensor {key!r} has {problem} in {tensor.dtype}: the weights or "
                "scale overflow it"
            )

    def fill(staging: Path) -> None:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")

    inputs = [*adapters, base]
    return write_folder(output, ADAPTER_OUTPUT, fill, overwrite=overwrite, inputs=inputs)


def _check_mergeable(states: Sequence[AdapterState]) -> None:
    for state in states:
        for name, (key, _) in state.adapter.whole.items():
            if ".base_layer." in key:  # the LoRA layer's own base weight: loads under its factors
                continue
            if any(name in other.adapter.factors for other in states):
                raise ConfigError(
                    f"{state.adapter.path} saves {name!r} whole while an adapter has LoRA "
                    "factors on it; merge them into a full checkpoint (merge_checkpoints)"
                )


def _stacked_factors(
    states: Sequence[AdapterState], coefficients: Sequence[float], ranks: Sequence[int]
) -> Iterator[tuple[str, Tensor]]:
    """Per module, ``A = [A₁; A₂; …]`` and ``B = [c₁ s₁ B₁, …]`` under peft's key names. Adapter
    ``i`` takes the same ``rᵢ`` rows of every module (its largest rank), zero where it has a
    smaller rank or leaves the module, so every module has rank ``Σ rᵢ``."""
    names = list(dict.fromkeys(name for s in states for name in s.adapter.factors))
    for name in names:
        present = [s.adapter.factors.get(name) for s in states]
        some = next(f for f in present if f is not None)
        a = torch.zeros(sum(ranks), some.a.shape[1], dtype=some.a.dtype)
        b = torch.zeros(some.b.shape[0], sum(ranks), dtype=some.b.dtype)
        start = 0
        for factors, c, rank in zip(present, coefficients, ranks, strict=True):
            if factors is not None:
                k = factors.a.shape[0]
                a[start : start + k] = factors.a
                scaled = factors.b.to(torch.float64) * (c * factors.scale)
                b[:, start : start + k] = scaled.to(b.dtype)
            start += rank
        module = _PREFIX + name.removesuffix(".weight")
        if some.embedding:
            yield f"{module}.lora_embedding_A", a
            yield f"{module}.lora_embedding_B", b
        else:
            yield f"{module}.lora_A.weight", a
            yield f"{module}.lora_B.weight", b


def _whole_tensors(
    states: Sequence[AdapterState], coefficients: Sequence[float]
) -> Iterator[tuple[str, Tensor]]:
    """Tensors some adapter saves whole: ``W + Σ cᵢ (savedᵢ − W)`` under the first such key."""
    names = list(dict.fromkeys(name for s in states for name in s.adapter.whole))
    for name in names:
        holder = next(s for s in states if name in s.adapter.whole)
        key, saved = holder.adapter.whole[name]
        base = holder.base.state[name]
        dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
        merged = base.to(dtype).clone()
        for state, c in zip(states, coefficients, strict=True):
            if name in state.adapter.whole:  # the saved part only: factors stay factors
                merged += c * (state.adapter.whole[name][1].to(dtype) - base.to(dtype))
        yield key, merged.to(saved.dtype)


def _merged_config(states: Sequence[AdapterState], rank: int) -> dict[str, Any]:
    """The first adapter's config at the stacked ``rank``, scale 1, every module with factors
    targeted by its name, the union of the ``modules_to_save``."""
    modules = dict.fromkeys(n.removesuffix(".weight") for s in states for n in s.adapter.factors)
    saved = dict.fromkeys(m for s in states for m in s.adapter.config.get("modules_to_save") or [])
    return {
        **states[0].adapter.config,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "target_modules": list(modules),
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
        "modules_to_save": list(saved) or None,
    }
