"""Merging Hugging Face checkpoints on disk, one tensor at a time.

Methods (:data:`METHODS`; the formulas are in :mod:`accord.llm.methods` and, one
module each, :mod:`accord.llm.merge_methods`):

- ``linear`` and ``slerp`` combine the ``models`` themselves (slerp: exactly two);
- ``task_arithmetic``, ``ties``, ``dare``, ``dare_ties``, ``della``, ``della_linear``,
  ``breadcrumbs``, ``breadcrumbs_ties``, ``sce`` and ``model_stock`` (at least two models)
  combine the task vectors ``τ_i = θ_i − θ_base`` of the ``models`` and add the result to the
  receiver: the ``base`` itself by default, or another model of the same architecture
  (``receiver``), which ``align=True`` first moves into the base's coordinates by weight
  matching (:func:`accord.llm.find_alignment`), so that the task vectors land on the
  features they were learned for (Horoi et al. 2025);
- ``nuslerp`` (exactly two models) combines the task vectors when a ``base`` is given, the
  models themselves otherwise.

With ``align=True``, linear and slerp align every model to the first one.

A model may be a peft LoRA adapter folder of the ``base`` (:mod:`accord.llm.adapters`): its
task vector is its low-rank delta.

The tensor-wise methods need no symmetry: any checkpoints (GPT-2, Gemma, Phi-3, Mixtral, BERT,
ViT, ...) merge when their tensors agree by name, shape and kind (floating or not), and the first
tensor that disagrees is named with its two files. Tensors that are not floating point (integer
buffers such as position ids) are copied from the receiver, never averaged; each tensor keeps
its dtype unless ``dtype`` asks for another floating one. A tied output head
(``tie_word_embeddings``) is not stored, as ``save_pretrained`` does. Alignment needs a family's
symmetries, known for :data:`accord.llm.arch.SUPPORTED_ARCHITECTURES` only; other
families are refused by name.

Parameters are settings (:mod:`accord.llm.settings`): a number, a gradient across the
layers, or name filters, as in mergekit. The per-model ones (``weight``, ``density``,
``drop_rate``) are looked up in the model's own settings, then in ``parameters``, then take their
default.

Only a few tensors are in memory at once: the inputs are read lazily, the header of every
output shard is planned from the input headers, and each merged tensor is written as soon as it
is computed. The output (sharded safetensors, index, ``config.json`` of the receiver or first
model, and the tokenizer files of ``tokenizer`` when given) appears atomically; nothing is left
behind on failure. The output folder is checked before any weight is read: it may not be, hold
or lie inside an input folder, and an existing one is replaced (``overwrite``) only when accord
wrote it as a merge output (:mod:`accord._outputs`).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from accord._finite import describe_non_finite
from accord._outputs import check_output
from accord.errors import ConfigError, ModelError, did_you_mean
from accord.llm import merge_methods, methods
from accord.llm.adapters import AdapterState, open_model
from accord.llm.align import find_alignment
from accord.llm.arch import (
    SHAPE_KEYS,
    SUPPORTED_ARCHITECTURES,
    Architecture,
    check_same_family,
)
from accord.llm.io import (
    DEFAULT_SHARD_SIZE,
    TOKENIZER_FILES,
    Checkpoint,
    TensorInfo,
    open_checkpoint,
    parse_size,
    read_config,
    tokenizer_files,
    write_checkpoint,
)
from accord.llm.merge_methods.della import check_della
from accord.llm.settings import (
    Setting,
    layer_positions,
    parse_setting,
    setting_at,
    setting_numbers,
)
from accord.llm.symmetry import Symmetry, transform_tensor


@dataclass(frozen=True)
class MethodInfo:
    """A merge method's name, paper, the parameters it reads (``model_parameters``: those that
    may differ per model), whether it merges task vectors (with ``optional_base``: when a base
    is given, else the models), its default for ``normalize`` and the ``rescale`` choices of its
    pruned entries (the first is the default)."""

    name: str
    paper: str
    parameters: tuple[str, ...]
    task_vectors: bool
    model_parameters: tuple[str, ...] = ()
    normalize: bool | None = None
    rescales: tuple[str, ...] = ()
    optional_base: bool = False


_DARE_PARAMETERS = ("weight", "drop_rate", "scale", "normalize", "rescale")
_DARE_RESCALES = ("expectation", "l1", "none")
_DELLA_PARAMETERS = ("weight", "density", "epsilon", "scale", "normalize", "rescale")
_BREADCRUMBS_PARAMETERS = ("weight", "density", "gamma", "scale", "normalize", "rescale")

METHODS = {
    info.name: info
    for info in (
        MethodInfo(
            "linear",
            "Wortsman et al., ICML 2022 (model soups)",
            ("weight", "normalize"),
            False,
            ("weight",),
            normalize=True,
        ),
        MethodInfo("slerp", "Shoemake 1985; as in mergekit", ("t", "lerp_cosine"), False),
        MethodInfo(
            "task_arithmetic",
            "Ilharco et al., ICLR 2023",
            ("weight", "scale", "normalize"),
            True,
            ("weight",),
            normalize=False,
        ),
        MethodInfo(
            "ties",
            "Yadav et al., NeurIPS 2023",
            ("weight", "density", "scale", "normalize", "rescale"),
            True,
            ("weight", "density"),
            normalize=True,
            rescales=("none", "l1"),
        ),
        MethodInfo(
            "dare",
            "Yu et al., ICML 2024",
            _DARE_PARAMETERS,
            True,
            ("weight", "drop_rate"),
            normalize=False,
            rescales=_DARE_RESCALES,
        ),
        MethodInfo(
            "dare_ties",
            "Yu et al., ICML 2024 + TIES",
            _DARE_PARAMETERS,
            True,
            ("weight", "drop_rate"),
            normalize=True,
            rescales=_DARE_RESCALES,
        ),
        MethodInfo(
            "della",
            "Deep et al., 2024 (DELLA-Merging, arXiv:2406.11617)",
            _DELLA_PARAMETERS,
            True,
            ("weight", "density", "epsilon"),
            normalize=True,
            rescales=_DARE_RESCALES,
        ),
        MethodInfo(
            "della_linear",
            "Deep et al., 2024, without sign election (mergekit's della_linear)",
            _DELLA_PARAMETERS,
            True,
            ("weight", "density", "epsilon"),
            normalize=False,
            rescales=_DARE_RESCALES,
        ),
        MethodInfo(
            "breadcrumbs",
            "Davari & Belilovsky, ECCV 2024 (Model Breadcrumbs, arXiv:2312.06795)",
            _BREADCRUMBS_PARAMETERS,
            True,
            ("weight", "density", "gamma"),
            normalize=False,
            rescales=("none", "l1"),
        ),
        MethodInfo(
            "breadcrumbs_ties",
            "Davari & Belilovsky, ECCV 2024 + TIES (mergekit's breadcrumbs_ties)",
            _BREADCRUMBS_PARAMETERS,
            True,
            ("weight", "density", "gamma"),
            normalize=True,
            rescales=("none", "l1"),
        ),
        MethodInfo("sce", "Wan et al., 2024 (FuseChat, arXiv:2408.07990)", ("select_topk",), True),
        MethodInfo(
            "model_stock",
            "Jang et al., ECCV 2024 (Model Stock, arXiv:2403.19522)",
            ("filter_wise",),
            True,
        ),
        MethodInfo(
            "nuslerp",
            "mergekit's NuSLERP (Shoemake 1985 per tensor or vector)",
            ("weight", "nuslerp_flatten", "nuslerp_row_wise"),
            True,
            ("weight",),
            optional_base=True,
        ),
    )
}

# Defaults of the numeric parameters, for a tensor that no setting names.
DEFAULTS = {
    "t": 0.5,
    "lerp_cosine": 1 - 1e-7,
    "scale": 1.0,
    "weight": 1.0,
    "density": 0.2,
    "drop_rate": 0.9,
    "epsilon": 0.15,
    "gamma": 0.01,
    "select_topk": 1.0,
}

# Defaults of the switches other than normalize (whose default is the method's).
SWITCHES = {"filter_wise": False, "nuslerp_flatten": True, "nuslerp_row_wise": False}

_LIMITS: dict[str, tuple[Callable[[float], bool], str]] = {
    "density": (lambda v: 0 < v <= 1, "0 < density <= 1"),
    "drop_rate": (lambda v: 0 <= v < 1, "0 <= drop_rate < 1"),
    "t": (lambda v: 0 <= v <= 1, "0 <= t <= 1"),
    "lerp_cosine": (lambda v: 0 <= v < 1, "0 <= lerp_cosine < 1"),
    "scale": (lambda v: math.isfinite(v), "a finite number"),
    "weight": (lambda v: math.isfinite(v), "a finite number"),
    "epsilon": (lambda v: 0 <= v < 1, "0 <= epsilon < 1"),
    "gamma": (lambda v: 0 <= v < 1, "0 <= gamma < 1"),
    "select_topk": (lambda v: 0 < v <= 1, "0 < select_topk <= 1"),
}


# torch's CPU generator (mt19937) keeps the low 32 bits of its seed.
SEED_LIMIT = 2**32
MERGE_OUTPUT = "llm-merge-output"  # the kind of output folder a merge writes and overwrites


@dataclass(frozen=True)
class _Inputs:
    models: list[Checkpoint]
    base: Checkpoint | None
    receiver: Checkpoint
    arch: Architecture | None  # the symmetry layout, when aligning
    names: list[str]  # the output tensors, in the receiver's order


@dataclass(frozen=True)
class TensorParameters:
    """One tensor's merge parameters, its settings resolved: per model ``weights``,
    ``densities`` (TIES, DELLA, Breadcrumbs), ``drop_rates`` (DARE), ``epsilons`` (DELLA) and
    ``gammas`` (Breadcrumbs); slerp's ``t`` and ``lerp_cosine``; the scale ``λ``; SCE's
    ``select_topk``."""

    weights: list[float]
    densities: list[float]
    drop_rates: list[float]
    epsilons: list[float]
    gammas: list[float]
    t: float
    lerp_cosine: float
    scale: float
    select_topk: float


def check_merge(
    method: str,
    parameters: Mapping[str, Any],
    n_models: int,
    *,
    has_base: bool,
    has_receiver: bool = False,
    align: bool = False,
    model_parameters: Sequence[Mapping[str, Any]] = (),
) -> list[str]:
    """Every problem with a method, its parameters and its inputs, each naming its key (empty
    when all is well); checked before any weight is read. ``model_parameters``: one mapping
    per model (``weight``, ``density``, ``drop_rate``), reported as ``models[i].key``."""
    if method not in METHODS:
        hint = did_you_mean(method, METHODS)
        return [f"method: {method!r} is unknown{hint}; choose one of {', '.join(METHODS)}"]
    info = METHODS[method]
    problems = []
    for key, value in parameters.items():
        if key not in info.parameters:
            hint = did_you_mean(key, info.parameters)
            problems.append(
                f"parameters.{key}: not used by method {method!r}{hint} "
                f"(it reads {list(info.parameters)})"
            )
        else:
            problems += _value_problems(info, f"parameters.{key}", key, value)
    for i, entry in enumerate(model_parameters):
        for key, value in entry.items():
            if key not in info.model_parameters:
                problems.append(
                    f"models[{i}].{key}: not a per-model parameter of method {method!r} "
                    f"(per model it reads {list(info.model_parameters)})"
                )
            else:
                problems += _value_problems(info, f"models[{i}].{key}", key, value)
    task_vectors = info.task_vectors and (has_base or not info.optional_base)
    if task_vectors and not has_base:
        problems.append(f"base: method {method!r} needs the task vectors' base model")
    if not info.task_vectors and has_base:
        problems.append(f"base: method {method!r} has no task vectors; remove the base")
    if not task_vectors and has_receiver:
        without = " without a base" if info.optional_base else ""
        problems.append(f"receiver: method {method!r} has no task vectors to add to it{without}")
    if task_vectors and align and not has_receiver:
        problems.append("align: aligning needs a receiver that differs from the base")
    if n_models == 0:
        problems.append("models: at least one model is needed")
    if method in ("slerp", "nuslerp") and n_models != 2:
        problems.append(f"models: {method} merges exactly 2 models, got {n_models}")
    if method == "model_stock" and n_models < 2:
        problems.append(
            f"models: model_stock needs at least 2 fine-tuned models besides the base, got "
            f"{n_models} (its ratio comes from the angle between their task vectors)"
        )
    return problems


def _value_problems(info: MethodInfo, where: str, key: str, value: Any) -> list[str]:
    if key == "normalize" or key in SWITCHES:
        return [] if isinstance(value, bool) else [f"{where}={value!r}: expected true or false"]
    if key == "rescale":
        if value in info.rescales:
            return []
        return [f"{where}={value!r}: expected one of {', '.join(info.rescales)}"]
    return setting_problems(where, key, value)


def setting_problems(where: str, key: str, value: Any) -> list[str]:
    """Problems with ``value`` as a setting of numeric parameter ``key`` (a key of
    :data:`DEFAULTS`): not a setting, or a number out of ``key``'s range; each names
    ``where``."""
    try:
        setting = parse_setting(value)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    check, expected = _LIMITS[key]
    bad = [v for v in setting_numbers(setting) if not check(v)]
    return [f"{where}={bad[0]}: expected {expected}"] if bad else []


def alignment_problems(directories: Iterable[str | os.PathLike[str]]) -> list[str]:
    """``align`` needs every model's family to have a symmetry table: a problem naming the first
    family without one (empty when all have one). Reads ``config.json`` only; folders that
    cannot be read are left to the other checks."""
    for directory in directories:
        try:
            config = read_config(directory)
        except ModelError:
            continue
        names = config.get("architectures") or [config.get("model_type", "unnamed")]
        if not any(name in SUPPORTED_ARCHITECTURES for name in names):
            return [
                f"align: family {names[0]} ({directory}) has no symmetry table; tensor-wise "
                f"merges work without align (alignment knows {', '.join(SUPPORTED_ARCHITECTURES)})"
            ]
    return []


def tokenizer_problems(directory: str | os.PathLike[str], key: str = "tokenizer") -> list[str]:
    """A problem when ``directory`` holds none of the tokenizer files a merge copies."""
    if not Path(directory).is_dir():
        return [f"{key}: {directory} is not a directory"]
    if tokenizer_files(directory):
        return []
    return [f"{key}: {directory} holds no tokenizer file ({', '.join(TOKENIZER_FILES[:4])}, ...)"]


def merge_checkpoints(
    models: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    method: str = "linear",
    base: str | os.PathLike[str] | None = None,
    receiver: str | os.PathLike[str] | None = None,
    weights: Sequence[Setting | Sequence[Any] | None] | None = None,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    align: bool = False,
    dtype: torch.dtype | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Merge checkpoint directories into ``output`` (see the module docs); returns its path.

    ``weights``: one per model (None: ``parameters["weight"]``, else 1); ``model_parameters``:
    per model, ``density`` (TIES, DELLA, Breadcrumbs), ``drop_rate`` (DARE), ``epsilon``
    (DELLA) or ``gamma`` (Breadcrumbs) overriding ``parameters``; ``parameters``: ``t`` (slerp,
    default 0.5), ``lerp_cosine`` (slerp interpolates linearly above this ``|cos Ω|``; default
    1 − 1e-7, mergekit's 0.9995), ``scale`` (λ, default 1), ``weight``, ``density`` (default
    0.2), ``drop_rate`` (DARE, default 0.9), ``epsilon`` (DELLA, default 0.15), ``gamma``
    (Breadcrumbs, default 0.01), ``select_topk`` (SCE, default 1), ``normalize`` (divide by the
    (agreeing) weights' sum; default true for linear and the sign-electing methods),
    ``rescale`` of the pruned entries (``expectation``: DARE's ``1/(1−p)`` and DELLA's
    ``1/q``, their default; ``l1``; ``none``), the switches ``filter_wise`` (Model Stock,
    default false), ``nuslerp_flatten`` (default true) and ``nuslerp_row_wise`` (default
    false); numbers or settings (:mod:`accord.llm.settings`). ``dtype``: of the
    output's floating tensors (default: the receiver's); ``tokenizer``: a folder whose tokenizer
    files are copied into the output; ``shard_size``: bytes per output shard, or a size such
    as ``500MB`` or ``1.5GiB``; ``seed``: DARE's and DELLA's drops, ``0 <= seed < 2**32`` (each
    tensor draws from a generator seeded by ``seed`` and its name, so results do not depend on
    the order of work or the shards); ``progress``: a tqdm bar over the tensors written. The
    output's tensors are in the receiver's order (its index, or its shards' names in order), so
    reruns write the same bytes.
    """
    parameters = dict(parameters or {})
    per_model = [dict(entry) for entry in model_parameters or [{} for _ in models]]
    problems = []
    if weights is not None and len(weights) != len(models):
        problems.append(f"weights: {len(weights)} given for {len(models)} models")
    elif weights is not None:
        for entry, weight in zip(per_model, weights, strict=False):
            if weight is not None:
                entry["weight"] = weight
    if len(per_model) != len(models):
        problems.append(f"model_parameters: {len(per_model)} given for {len(models)} models")
    problems += check_merge(
        method,
        parameters,
        len(models),
        has_base=base is not None,
        has_receiver=receiver is not None,
        align=align,
        model_parameters=per_model,
    )
    if not 0 <= seed < SEED_LIMIT:
        problems.append(f"seed: {seed} is out of range; expected 0 <= seed < 2**32")
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        problems.append(f"shard_size: {exc}")
    if align:
        problems += alignment_problems([*models, *(p for p in (base, receiver) if p)])
    if tokenizer is not None:
        problems += tokenizer_problems(tokenizer)
    if problems:
        raise ConfigError("; ".join(problems))
    folders = [*models, *(path for path in (base, receiver, tokenizer) if path is not None)]
    # before any weight is read and the alignment, which can take minutes
    check_output(output, MERGE_OUTPUT, overwrite=overwrite, inputs=folders)
    inputs = _open(models, base, receiver, align)
    info = METHODS[method]
    resolved = _resolve(info, parameters, per_model, inputs.names)
    symmetries = _alignments(inputs) if align else {}
    switches = {key: bool(parameters.get(key, SWITCHES[key])) for key in SWITCHES}
    combine = _combiner(
        method, _normalize(info, parameters), _rescale(info, parameters), seed, switches
    )
    infos = [_planned(inputs.receiver.state.info(name), dtype) for name in inputs.names]

    def produce(planned: TensorInfo) -> Tensor:
        name = planned.name
        if not planned.dtype.is_floating_point:  # an integer buffer: copied, never averaged
            return inputs.receiver.state[name]
        merged = _merged(name, inputs, symmetries, combine, resolved[name])
        merged = merged.to(planned.dtype)
        problem = describe_non_finite(merged)
        if problem is not None:
            raise ModelError(
                f"merged tensor {name!r} has {problem} in {planned.dtype}, from finite "
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
            kind=MERGE_OUTPUT,
            shard_size=shard_bytes,
            overwrite=overwrite,
            inputs=folders,
            on_tensor=lambda name: bar.update(1),
            extra_files=tokenizer_files(tokenizer) if tokenizer is not None else (),
        )


def _planned(stored: TensorInfo, dtype: torch.dtype | None) -> TensorInfo:
    """The output tensor: ``dtype`` for a floating one when given, else the stored dtype."""
    floating = stored.dtype.is_floating_point
    return TensorInfo(stored.name, stored.shape, dtype if dtype and floating else stored.dtype)


def _normalize(info: MethodInfo, parameters: Mapping[str, Any]) -> bool:
    return bool(parameters.get("normalize", info.normalize))


def _rescale(info: MethodInfo, parameters: Mapping[str, Any]) -> str:
    return str(parameters.get("rescale", info.rescales[0] if info.rescales else "none"))


def _open(
    models: Sequence[str | os.PathLike[str]],
    base: str | os.PathLike[str] | None,
    receiver: str | os.PathLike[str] | None,
    align: bool,
) -> _Inputs:
    base_ck = open_checkpoint(base) if base is not None else None
    opened = [open_model(path, base_ck) for path in models]
    receiver_ck = open_checkpoint(receiver) if receiver is not None else base_ck or opened[0]
    every = [*opened, *([base_ck] if base_ck else []), receiver_ck]
    _check_architectures(receiver_ck, every)
    arch = None
    if align:
        check_same_family({str(ck.path): ck.config for ck in every})
        arch = Architecture.from_config(receiver_ck.config, str(receiver_ck.path))
        for name in receiver_ck.state:
            arch.role(name)  # refuses tensors this layout does not know before any work is done
    names = _stored_names(receiver_ck)
    for ck in every:
        _check_same_tensors(receiver_ck, ck, names)
        if arch is not None:
            arch.check_shapes({name: ck.state.info(name).shape for name in names}, str(ck.path))
    return _Inputs(opened, base_ck, receiver_ck, arch, names)


def _check_architectures(reference: Checkpoint, every: Iterable[Checkpoint]) -> None:
    """ConfigError naming the first config entry (``architectures``, then the sizes in
    :data:`SHAPE_KEYS` that both configs give) on which a model differs from ``reference``:
    clearer than the tensor it would make differ."""
    for ck in every:
        for key in ("architectures", *SHAPE_KEYS):
            mine, theirs = reference.config.get(key), ck.config.get(key)
            if mine != theirs and (key == "architectures" or None not in (mine, theirs)):
                raise ConfigError(
                    f"{key} differs: {mine} in {reference.path} vs {theirs} in {ck.path}; the "
                    "models cannot be merged tensor by tensor"
                )


def _stored_names(ck: Checkpoint) -> list[str]:
    """The tensors a merge writes: all stored ones but a tied output head, which
    ``save_pretrained`` leaves out too (transformers ties it to the merged embedding)."""
    tied = bool(ck.config.get("tie_word_embeddings", False))
    return [name for name in ck.state if not (tied and name == "lm_head.weight")]


def _check_same_tensors(reference: Checkpoint, ck: Checkpoint, names: list[str]) -> None:
    """ModelError naming the first tensor of ``reference`` (in its order) that ``ck`` lacks or
    holds with another shape or kind, then the first one ``ck`` holds that ``reference`` lacks."""
    fix = "tensor-wise merges need the same tensors (names and shapes) in every model"
    for name in names:
        here = reference.state.info(name)
        if name not in ck.state:
            raise ModelError(
                f"tensor {name!r} is in {reference.state.file(name)} but not in {ck.path}; {fix}"
            )
        there = ck.state.info(name)
        if there.shape != here.shape:
            raise ModelError(
                f"tensor {name!r} has shape {here.shape} in {reference.state.file(name)} but "
                f"{there.shape} in {ck.state.file(name)}; {fix}"
            )
        if there.dtype.is_floating_point != here.dtype.is_floating_point:
            raise ModelError(
                f"tensor {name!r} is {here.dtype} in {reference.state.file(name)} but "
                f"{there.dtype} in {ck.state.file(name)}; a floating tensor cannot be merged "
                "with an integer one"
            )
    extra = [name for name in _stored_names(ck) if name not in set(names)]
    if extra:
        raise ModelError(
            f"tensor {extra[0]!r} is in {ck.state.file(extra[0])} but not in {reference.path}; "
            f"{fix}"
        )


def _resolve(
    info: MethodInfo,
    parameters: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    names: Sequence[str],
) -> dict[str, TensorParameters]:
    """Every tensor's parameters, resolved before any weight is read, so that a filter that
    leaves a tensor without a value is an error before any work is done."""
    positions = layer_positions(names)
    shared = {k: parse_setting(v) for k, v in parameters.items() if k in DEFAULTS}
    own = [{k: parse_setting(v) for k, v in entry.items()} for entry in per_model]

    def value(key: str, name: str, i: int | None = None) -> float:
        where = f"models[{i}].{key}" if i is not None else f"parameters.{key}"
        chain = [own[i].get(key)] if i is not None else []
        chain.append(shared.get(key))
        given = [setting for setting in chain if setting is not None]
        for setting in given:
            found = setting_at(setting, name, positions[name])
            if found is not None:
                return found
        if not given:
            return DEFAULTS[key]
        raise ConfigError(
            f"{where}: no filter matches tensor {name!r}; add an entry without a filter "
            "(e.g. {value: 1.0}) for the other tensors"
        )

    reads = set(info.parameters)
    n = len(per_model)

    def each(key: str, name: str) -> list[float]:
        return [value(key, name, i) for i in range(n)] if key in reads else []

    def one(key: str, name: str) -> float:
        return value(key, name) if key in reads else DEFAULTS[key]

    def per_tensor(name: str) -> TensorParameters:
        resolved = TensorParameters(
            weights=each("weight", name),
            densities=each("density", name),
            drop_rates=each("drop_rate", name),
            epsilons=each("epsilon", name),
            gammas=each("gamma", name),
            t=one("t", name),
            lerp_cosine=one("lerp_cosine", name),
            scale=one("scale", name),
            select_topk=one("select_topk", name),
        )
        # DELLA's keep probabilities depend on two settings at once, so only a tensor's own
        # values tell whether they lie in (0, 1)
        for i, epsilon in enumerate(resolved.epsilons):
            problem = check_della(resolved.densities[i], epsilon)
            if problem is not None:
                raise ConfigError(f"models[{i}], tensor {name!r}: {problem}")
        return resolved

    return {name: per_tensor(name) for name in names}


def _alignments(inputs: _Inputs) -> dict[int, Symmetry]:
    """Symmetries keyed by ``id`` of the checkpoint they move."""
    if inputs.base is not None:  # check_merge gives a base to the task-vector merges only
        pairs = [(inputs.receiver, inputs.base)]
    else:
        pairs = [(model, inputs.models[0]) for model in inputs.models[1:]]
    return {
        id(ck): find_alignment((ck.state, ck.config), (ref.state, ref.config)) for ck, ref in pairs
    }


def _read(
    ck: Checkpoint, name: str, symmetries: dict[int, Symmetry], arch: Architecture | None
) -> Tensor:
    tensor = ck.state[name]
    problem = describe_non_finite(tensor)
    if problem is not None:
        raise ModelError(
            f"{ck.path}: tensor {name!r} has {problem}, which would make the merge "
            "non-finite; the checkpoint is corrupt or its training diverged: merge without it"
        )
    if id(ck) in symmetries and arch is not None:
        tensor = transform_tensor(name, tensor, symmetries[id(ck)], arch)
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


Combine = Callable[[str, Iterable[Tensor], TensorParameters], Tensor]


def _merged(
    name: str,
    inputs: _Inputs,
    symmetries: dict[int, Symmetry],
    combine: Combine,
    parameters: TensorParameters,
) -> Tensor:
    arch = inputs.arch
    if inputs.base is None:  # check_merge gives a base to the task-vector merges only
        tensors = [_read(ck, name, symmetries, arch) for ck in inputs.models]
        return combine(name, tensors, parameters)
    base = _read(inputs.base, name, symmetries, arch)
    # A generator: each model is read, turned into its task vector and pruned before the next
    # is read, so only the pruned task vectors are held together.
    deltas = (
        ck.state.delta(name)  # a LoRA adapter's own ΔW, exact
        if isinstance(ck.state, AdapterState)
        else _read(ck, name, symmetries, arch) - base
        for ck in inputs.models
    )
    merged = combine(name, deltas, parameters)
    if inputs.receiver is inputs.base:
        return merged.add_(base)
    return merged.add_(_read(inputs.receiver, name, symmetries, arch))


def _combiner(
    method: str, normalize: bool, rescale: str, seed: int, switches: Mapping[str, bool]
) -> Combine:
    def generator(name: str) -> torch.Generator:
        # XOR keeps within the generator's 32 bits and, for one tensor, maps distinct seeds to
        # distinct streams; the name's CRC makes each tensor's stream its own.
        return torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode("utf-8")))

    def dare(name: str, ds: Iterable[Tensor], p: TensorParameters, ties: bool) -> Tensor:
        return methods.dare(
            ds,
            p.weights,
            drop_rate=p.drop_rates,
            generator=generator(name),
            scale=p.scale,
            sign_election=ties,
            normalize=normalize,
            rescale=rescale,
        )

    def della(name: str, ds: Iterable[Tensor], p: TensorParameters, ties: bool) -> Tensor:
        return merge_methods.della(
            ds,
            p.weights,
            density=p.densities,
            epsilon=p.epsilons,
            generator=generator(name),
            scale=p.scale,
            sign_election=ties,
            normalize=normalize,
            rescale=rescale,
        )

    def breadcrumbs(ds: Iterable[Tensor], p: TensorParameters, ties: bool) -> Tensor:
        return merge_methods.breadcrumbs(
            ds,
            p.weights,
            density=p.densities,
            gamma=p.gammas,
            scale=p.scale,
            sign_election=ties,
            normalize=normalize,
            rescale=rescale,
        )

    table: dict[str, Combine] = {
        "linear": lambda name, ts, p: methods.linear(ts, p.weights, normalize=normalize),
        "slerp": lambda name, ts, p: methods.slerp(*ts, p.t, p.lerp_cosine),
        "task_arithmetic": lambda name, ds, p: methods.task_arithmetic(
            ds, p.weights, p.scale, normalize=normalize
        ),
        "ties": lambda name, ds, p: methods.ties(
            ds, p.weights, density=p.densities, scale=p.scale, normalize=normalize, rescale=rescale
        ),
        "dare": lambda name, ds, p: dare(name, ds, p, ties=False),
        "dare_ties": lambda name, ds, p: dare(name, ds, p, ties=True),
        "della": lambda name, ds, p: della(name, ds, p, ties=True),
        "della_linear": lambda name, ds, p: della(name, ds, p, ties=False),
        "breadcrumbs": lambda name, ds, p: breadcrumbs(ds, p, ties=False),
        "breadcrumbs_ties": lambda name, ds, p: breadcrumbs(ds, p, ties=True),
        "sce": lambda name, ds, p: merge_methods.sce(ds, select_topk=p.select_topk),
        "model_stock": lambda name, ds, p: merge_methods.model_stock(
            ds, filter_wise=switches["filter_wise"]
        ),
        "nuslerp": lambda name, ts, p: merge_methods.nuslerp(
            *ts,
            merge_methods.nuslerp_t(p.weights),
            flatten=switches["nuslerp_flatten"],
            row_wise=switches["nuslerp_row_wise"],
        ),
    }
    return table[method]
