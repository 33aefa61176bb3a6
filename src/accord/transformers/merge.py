"""Merging Llama-family checkpoints on disk, one tensor at a time.

Methods (:data:`METHODS`; the formulas are in :mod:`accord.transformers.methods`):

- ``linear`` and ``slerp`` combine the ``models`` themselves (slerp: exactly two);
- ``task_arithmetic``, ``ties``, ``dare`` and ``dare_ties`` combine the task vectors
  ``τ_i = θ_i − θ_base`` of the ``models`` and add the result to the receiver: the ``base``
  itself by default, or another model of the same architecture (``receiver``), which
  ``align=True`` first moves into the base's coordinates by weight matching
  (:func:`accord.transformers.find_alignment`), so that the task vectors land on the features
  they were learned for (Horoi et al. 2025).

With ``align=True``, linear and slerp align every model to the first one.

Only a few tensors are in memory at once: the inputs are read lazily, the header of every
output shard is planned from the input headers, and each merged tensor is written as soon as it
is computed. The output (sharded safetensors, index, ``config.json`` of the receiver or first
model) appears atomically; nothing is left behind on failure.
"""

from __future__ import annotations

import difflib
import math
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from accord._finite import describe_non_finite
from accord.errors import ConfigError, ModelError
from accord.transformers import methods
from accord.transformers.align import find_alignment
from accord.transformers.arch import Architecture, check_compatible
from accord.transformers.io import (
    Checkpoint,
    TensorInfo,
    check_output,
    open_checkpoint,
    parse_size,
    write_checkpoint,
)
from accord.transformers.symmetry import Symmetry, transform_tensor


@dataclass(frozen=True)
class MethodInfo:
    """A merge method's name, paper and the parameters it reads."""

    name: str
    paper: str
    parameters: tuple[str, ...]
    task_vectors: bool


METHODS = {
    info.name: info
    for info in (
        MethodInfo("linear", "Wortsman et al., ICML 2022 (model soups)", (), False),
        MethodInfo("slerp", "Shoemake 1985; as in mergekit", ("t",), False),
        MethodInfo("task_arithmetic", "Ilharco et al., ICLR 2023", ("scale",), True),
        MethodInfo("ties", "Yadav et al., NeurIPS 2023", ("density", "scale"), True),
        MethodInfo("dare", "Yu et al., ICML 2024", ("drop_rate", "scale"), True),
        MethodInfo("dare_ties", "Yu et al., ICML 2024 + TIES", ("drop_rate", "scale"), True),
    )
}


_LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "density": (lambda v: 0 < v <= 1, "0 < density <= 1"),
    "drop_rate": (lambda v: 0 <= v < 1, "0 <= drop_rate < 1"),
    "t": (lambda v: 0 <= v <= 1, "0 <= t <= 1"),
    "scale": (lambda v: math.isfinite(v), "a finite number"),
}


# torch's CPU generator (mt19937) keeps the low 32 bits of its seed.
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class _Inputs:
    models: list[Checkpoint]
    base: Checkpoint | None
    receiver: Checkpoint
    arch: Architecture


def check_merge(
    method: str,
    parameters: dict[str, float],
    n_models: int,
    *,
    has_base: bool,
    has_receiver: bool = False,
    align: bool = False,
) -> list[str]:
    """Every problem with a method, its parameters and its inputs, each naming its key (empty
    when all is well); checked before any weight is read."""
    if method not in METHODS:
        close = difflib.get_close_matches(method, list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"method: {method!r} is unknown{hint}; choose one of {', '.join(METHODS)}"]
    info = METHODS[method]
    problems = [
        f"parameters.{key}: not used by method {method!r} (it reads {list(info.parameters)})"
        for key in parameters
        if key not in info.parameters
    ]
    for key, value in parameters.items():
        if key in _LIMITS and not _LIMITS[key][0](float(value)):
            problems.append(f"parameters.{key}={value}: expected {_LIMITS[key][1]}")
    if info.task_vectors and not has_base:
        problems.append(f"base: method {method!r} needs the task vectors' base model")
    if not info.task_vectors and has_base:
        problems.append(f"base: method {method!r} has no task vectors; remove the base")
    if not info.task_vectors and has_receiver:
        problems.append(f"receiver: method {method!r} has no task vectors to add to it")
    if info.task_vectors and align and not has_receiver:
        problems.append("align: aligning needs a receiver that differs from the base")
    if n_models == 0:
        problems.append("models: at least one model is needed")
    if method == "slerp" and n_models != 2:
        problems.append(f"models: slerp merges exactly 2 models, got {n_models}")
    return problems


def _open(
    models: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str] | None,
    receiver: str | os.PathLike[str] | None,
) -> _Inputs:
    opened = [open_checkpoint(path) for path in models]
    base_ck = open_checkpoint(base) if base is not None else None
    receiver_ck = open_checkpoint(receiver) if receiver is not None else base_ck or opened[0]
    every = [*opened, *([base_ck] if base_ck else []), receiver_ck]
    check_compatible({str(ck.path): ck.config for ck in every})
    arch = Architecture.from_config(receiver_ck.config, str(receiver_ck.path))
    names = _output_names(receiver_ck, arch)
    for ck in every:
        missing = [name for name in names if name not in ck.state]
        if missing:
            raise ModelError(
                f"{ck.path} lacks tensor {missing[0]!r} (present in {receiver_ck.path})"
            )
        arch.check_shapes({name: ck.state.info(name).shape for name in names}, str(ck.path))
    return _Inputs(opened, base_ck, receiver_ck, arch)


def _output_names(receiver: Checkpoint, arch: Architecture) -> list[str]:
    names = list(receiver.state)
    for name in names:
        arch.role(name)  # refuses tensors this layout does not know before any work is done
    return [n for n in names if not (arch.tied and n == "lm_head.weight")]


def merge_checkpoints(
    models: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    method: str = "linear",
    base: str | os.PathLike[str] | None = None,
    receiver: str | os.PathLike[str] | None = None,
    weights: Sequence[float] | None = None,
    parameters: dict[str, float] | None = None,
    align: bool = False,
    dtype: torch.dtype | None = None,
    shard_size: int | str = "2GB",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Merge checkpoint directories into ``output`` (see the module docs); returns its path.

    ``weights``: one per model (default 1); ``parameters``: ``t`` (slerp, default 0.5),
    ``scale`` (λ, default 1), ``density`` (TIES, default 0.2), ``drop_rate`` (DARE, default 0.9);
    ``dtype``: of the output tensors (default: the receiver's); ``shard_size``: bytes per
    output shard, or a size such as ``500MB`` or ``1.5GiB``; ``seed``: DARE's drops,
    ``0 <= seed < 2**32`` (each tensor draws from a generator seeded by ``seed`` and its name,
    so results do not depend on the order of work or the shards); ``progress``: a tqdm bar over
    the tensors written. The output's tensors are in the receiver's order (its index, or its
    shards' names in order), so reruns write the same bytes.
    """
    parameters = dict(parameters or {})
    problems = check_merge(
        method,
        parameters,
        len(models),
        has_base=base is not None,
        has_receiver=receiver is not None,
        align=align,
    )
    if not 0 <= seed < SEED_LIMIT:
        problems.append(f"seed: {seed} is out of range; expected 0 <= seed < 2**32")
    if weights is not None and len(weights) != len(models):
        problems.append(f"weights: {len(weights)} given for {len(models)} models")
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        problems.append(f"shard_size: {exc}")
    if problems:
        raise ConfigError("; ".join(problems))
    check_output(output, overwrite)  # before the alignment, which can take minutes
    inputs = _open(models, base, receiver)
    symmetries = _alignments(inputs, method) if align else {}
    combine = _combiner(method, weights, parameters, seed)
    infos = [
        TensorInfo(name, info.shape, dtype or info.dtype)
        for name in _output_names(inputs.receiver, inputs.arch)
        for info in [inputs.receiver.state.info(name)]
    ]

    def produce(info: TensorInfo) -> Tensor:
        merged = _merged(info, inputs, symmetries, combine, method).to(info.dtype)
        problem = describe_non_finite(merged)
        if problem is not None:
            raise ModelError(
                f"merged tensor {info.name!r} has {problem} in {info.dtype}, from finite "
                f"inputs: method {method!r} overflowed; check its parameters and weights, or "
                "write a wider dtype"
            )
        return merged

    with tqdm(total=len(infos), desc=method, unit="tensor", disable=not progress) as bar:
        return write_checkpoint(
            output,
            inputs.receiver.config,
            infos,
            produce,
            shard_size=shard_bytes,
            overwrite=overwrite,
            on_tensor=lambda name: bar.update(1),
        )


def _alignments(inputs: _Inputs, method: str) -> dict[int, Symmetry]:
    """Symmetries keyed by ``id`` of the checkpoint they move."""
    if METHODS[method].task_vectors:
        pairs = [(inputs.receiver, inputs.base)]
    else:
        pairs = [(model, inputs.models[0]) for model in inputs.models[1:]]
    return {
        id(ck): find_alignment((ck.state, ck.config), (ref.state, ref.config)) for ck, ref in pairs
    }


def _read(ck: Checkpoint, name: str, symmetries: dict[int, Symmetry], arch: Architecture) -> Tensor:
    tensor = ck.state[name]
    problem = describe_non_finite(tensor)
    if problem is not None:
        raise ModelError(
            f"{ck.path}: tensor {name!r} has {problem}, which would make the merge "
            "non-finite; the checkpoint is corrupt or its training diverged: merge without it"
        )
    if id(ck) in symmetries:
        tensor = transform_tensor(name, tensor, symmetries[id(ck)], arch)
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


Combine = Callable[[str, Iterable[Tensor]], Tensor]


def _merged(
    info: TensorInfo,
    inputs: _Inputs,
    symmetries: dict[int, Symmetry],
    combine: Combine,
    method: str,
) -> Tensor:
    arch, name = inputs.arch, info.name
    if not METHODS[method].task_vectors:
        return combine(name, [_read(ck, name, symmetries, arch) for ck in inputs.models])
    base = _read(inputs.base, name, symmetries, arch)
    # A generator: each model is read, turned into its task vector and pruned before the next
    # is read, so only the pruned task vectors are held together.
    deltas = (_read(ck, name, symmetries, arch) - base for ck in inputs.models)
    merged = combine(name, deltas)
    if inputs.receiver is inputs.base:
        return merged.add_(base)
    return merged.add_(_read(inputs.receiver, name, symmetries, arch))


def _combiner(
    method: str, weights: Sequence[float] | None, p: dict[str, float], seed: int
) -> Combine:
    scale = float(p.get("scale", 1.0))

    def generator(name: str) -> torch.Generator:
        # XOR keeps within the generator's 32 bits and, for one tensor, maps distinct seeds to
        # distinct streams; the name's CRC makes each tensor's stream its own.
        return torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode("utf-8")))

    table: dict[str, Combine] = {
        "linear": lambda name, ts: methods.linear(ts, weights),
        "slerp": lambda name, ts: methods.slerp(ts[0], ts[1], float(p.get("t", 0.5))),
        "task_arithmetic": lambda name, ds: methods.task_arithmetic(ds, weights, scale),
        "ties": lambda name, ds: methods.ties(
            ds, weights, density=float(p.get("density", 0.2)), scale=scale
        ),
        "dare": lambda name, ds: methods.dare(
            ds,
            weights,
            drop_rate=float(p.get("drop_rate", 0.9)),
            generator=generator(name),
            scale=scale,
        ),
        "dare_ties": lambda name, ds: methods.dare(
            ds,
            weights,
            drop_rate=float(p.get("drop_rate", 0.9)),
            generator=generator(name),
            scale=scale,
            sign_election=True,
        ),
    }
    return table[method]
