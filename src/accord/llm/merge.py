"""Merging Hugging Face checkpoints on disk, one tensor at a time.

Methods (:data:`METHODS`): the tensor-wise combiners of the registry
(:data:`accord.registry.COMBINERS`, one module each in :mod:`accord.combine`, with the
formulas; their records give each parameter's type, default and range):

- ``linear``, ``slerp`` (exactly two) and ``average`` combine the ``models`` themselves;
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

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from accord._finite import describe_non_finite
from accord._outputs import check_output
from accord.checkpoint import Checkpoint, TensorInfo, open_checkpoint, read_config
from accord.combine._rows import Rows
from accord.combine._state_dicts import combine_rows, combine_tensor, compute_dtype
from accord.compatible import TensorShapes, check_same_tensors
from accord.errors import ConfigError, ModelError, did_you_mean
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
    parse_size,
    tokenizer_files,
    write_checkpoint,
)
from accord.llm.settings import (
    Setting,
    layer_positions,
    parse_setting,
    setting_at,
    setting_numbers,
)
from accord.llm.symmetry import Symmetry, transform_tensor
from accord.registry import COMBINERS, FINITE, CombineMethod, Option

# The tensor-wise combiners of the registry: every method an LLM merge runs.
METHODS: dict[str, CombineMethod] = {n: r for n, r in COMBINERS.items() if r.tensorwise}


def _numeric_options() -> dict[str, Option]:
    """Every numeric parameter of the methods, by name (a name means one thing everywhere)."""
    return {
        option.name: option
        for record in METHODS.values()
        for option in record.options
        if option.type is float
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
    record = METHODS[method]
    reads = [option.name for option in record.options]
    per_model = [option.name for option in record.options if option.per_model]
    problems = []
    for key, value in parameters.items():
        if key not in reads:
            hint = did_you_mean(key, reads)
            problems.append(
                f"parameters.{key}: not used by method {method!r}{hint} (it reads {reads})"
            )
        else:
            problems += _value_problems(record.option(key), f"parameters.{key}", value)
    for i, entry in enumerate(model_parameters):
        for key, value in entry.items():
            if key not in per_model:
                problems.append(
                    f"models[{i}].{key}: not a per-model parameter of method {method!r} "
                    f"(per model it reads {per_model})"
                )
            else:
                problems += _value_problems(record.option(key), f"models[{i}].{key}", value)
    base = record.needs.base
    task_vectors = record.needs.task_vectors(has_base)
    problem = record.needs.base_problem(f"method {method!r}", has_base)
    problems += [f"base: {problem}"] if problem is not None else []
    if not task_vectors and has_receiver:
        without = " without a base" if base == "optional" else ""
        problems.append(f"receiver: method {method!r} has no task vectors to add to it{without}")
    if task_vectors and align and not has_receiver:
        problems.append("align: aligning needs a receiver that differs from the base")
    if n_models == 0:
        problems.append("models: at least one model is needed")
    else:
        count = record.needs.model_count_problem(method, n_models)
        problems += [f"models: {count}"] if count is not None else []
    return problems


def _value_problems(option: Option, where: str, value: Any) -> list[str]:
    if option.type is not float:  # switches and choices: one value for every tensor
        problem = option.problem(value)
        return [] if problem is None else [f"{where}={value!r}: {problem}"]
    return setting_problems(where, option.name, value)


def setting_problems(where: str, key: str, value: Any) -> list[str]:
    """Problems with ``value`` as a setting of numeric parameter ``key``: not a setting, or a
    number out of ``key``'s range (its record's limits); each names ``where``."""
    try:
        setting = parse_setting(value)
    except ValueError as exc:
        return [f"{where}: {exc}"]
    limits = _numeric_options()[key].limits or FINITE
    bad = [v for v in setting_numbers(setting) if not limits.holds(v)]
    return [f"{where}={bad[0]}: expected {limits.describe(key)}"] if bad else []


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
    per model, the method's per-model parameters (``density``, ``drop_rate``, ``epsilon``,
    ``gamma``) overriding ``parameters``; ``parameters``: the method's options (its record,
    ``accord.registry.COMBINERS[method].options``, gives their defaults and ranges), numbers
    or settings (:mod:`accord.llm.settings`) where numeric. ``dtype``: of the
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
    record = METHODS[method]
    resolved = _resolve(record, parameters, per_model, inputs.names)
    symmetries = _alignments(inputs) if align else {}
    infos = [_planned(inputs.receiver.state.info(name), dtype) for name in inputs.names]

    def produce(planned: TensorInfo) -> Tensor | Iterator[Tensor]:
        name = planned.name
        if not planned.dtype.is_floating_point:  # an integer buffer: copied, never averaged
            return inputs.receiver.state[name]
        blocks = None if symmetries else _merged_rows(planned, inputs, record, resolved[name], seed)
        if blocks is not None:
            return (_checked(planned, block.to(planned.dtype), method) for block in blocks)
        merged = _merged(name, inputs, symmetries, record, resolved[name], seed)
        return _checked(planned, merged.to(planned.dtype), method)

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


def _checked(planned: TensorInfo, merged: Tensor, method: str) -> Tensor:
    """``merged`` (the tensor or a block of it), or ModelError if it is not finite."""
    problem = describe_non_finite(merged)
    if problem is not None:
        raise ModelError(
            f"merged tensor {planned.name!r} has {problem} in {planned.dtype}, from finite "
            f"inputs: method {method!r} overflowed; check its parameters and weights, or "
            "write a wider dtype"
        )
    return merged


def _planned(stored: TensorInfo, dtype: torch.dtype | None) -> TensorInfo:
    """The output tensor: ``dtype`` for a floating one when given, else the stored dtype."""
    floating = stored.dtype.is_floating_point
    return TensorInfo(stored.name, stored.shape, dtype if dtype and floating else stored.dtype)


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
    shapes = _check_same_tensors([receiver_ck, *every], names)
    if arch is not None:
        for ck, table in zip(every, shapes[1:], strict=True):
            arch.check_shapes({name: table[name] for name in names}, str(ck.path))
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


def _check_same_tensors(
    every: Sequence[Checkpoint], names: list[str]
) -> list[dict[str, tuple[int, ...]]]:
    """ModelError naming the first tensor that a checkpoint of ``every`` lacks, holds with
    another shape (:func:`accord.compatible.check_same_tensors`, against ``every[0]``'s
    ``names``) or holds as a float where ``every[0]`` holds an integer, or the reverse; each
    checkpoint's shapes of ``names``."""
    wanted = set(names)

    def compared(ck: Checkpoint) -> list[str]:
        # the reference's tensors, and every other one the checkpoint would write
        stored = set(_stored_names(ck))
        return [name for name in ck.state if name in wanted or name in stored]

    shapes = [
        TensorShapes(
            str(ck.path),
            {name: ck.state.info(name).shape for name in (names if i == 0 else compared(ck))},
            ck.state.file,
        )
        for i, ck in enumerate(every)
    ]
    fix = "tensor-wise merges need the same tensors (names and shapes) in every model"
    check_same_tensors(shapes, what="tensor", remedy=fix, error=ModelError)
    reference = every[0].state
    for ck in every[1:]:
        for name in names:
            here, there = reference.info(name), ck.state.info(name)
            if there.dtype.is_floating_point != here.dtype.is_floating_point:
                raise ModelError(
                    f"tensor {name!r} is {here.dtype} in {reference.file(name)} but "
                    f"{there.dtype} in {ck.state.file(name)}; a floating tensor cannot be merged "
                    "with an integer one"
                )
    return [dict(table.shapes) for table in shapes]


def _resolve(
    record: CombineMethod,
    parameters: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    names: Sequence[str],
) -> dict[str, dict[str, Any]]:
    """Every tensor's options for ``record``'s function (per-model ones as lists), its
    settings resolved before any weight is read, so that a filter that leaves a tensor without
    a value is an error before any work is done."""
    positions = layer_positions(names)
    numeric = [option for option in record.options if option.type is float]
    shared = {o.name: parse_setting(parameters[o.name]) for o in numeric if o.name in parameters}
    own = [{k: parse_setting(v) for k, v in entry.items()} for entry in per_model]
    fixed = {
        option.name: parameters.get(option.name, option.default)
        for option in record.options
        if option.type is not float
    }

    def value(option: Option, name: str, i: int | None = None) -> float:
        key = option.name
        where = f"models[{i}].{key}" if i is not None else f"parameters.{key}"
        chain = [own[i].get(key)] if i is not None else []
        chain.append(shared.get(key))
        given = [setting for setting in chain if setting is not None]
        for setting in given:
            found = setting_at(setting, name, positions[name])
            if found is not None:
                return found
        if not given:
            return option.default
        raise ConfigError(
            f"{where}: no filter matches tensor {name!r}; add an entry without a filter "
            "(e.g. {value: 1.0}) for the other tensors"
        )

    def per_tensor(name: str) -> dict[str, Any]:
        resolved = dict(fixed)
        for option in numeric:
            if option.per_model:
                resolved[option.name] = [value(option, name, i) for i in range(len(per_model))]
            else:
                resolved[option.name] = value(option, name)
        # values valid one by one may not be together (DELLA's keep probabilities depend on
        # density and epsilon at once): only a tensor's own values tell
        found = record.check(resolved) if record.check is not None else None
        if found is not None:
            raise ConfigError(f"models[{found[0]}], tensor {name!r}: {found[1]}")
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
    tensor = _finite(ck, name, ck.state[name])
    if id(ck) in symmetries and arch is not None:
        tensor = transform_tensor(name, tensor, symmetries[id(ck)], arch)
    return compute_dtype(tensor)


def _finite(ck: Checkpoint, name: str, tensor: Tensor, rows: str = "") -> Tensor:
    """``tensor`` (read from ``ck``), or ModelError if it holds NaN or inf."""
    problem = describe_non_finite(tensor)
    if problem is not None:
        raise ModelError(
            f"{ck.path}: tensor {name!r} has {problem}{rows}, which would make the merge "
            "non-finite; the checkpoint is corrupt or its training diverged: merge without it"
        )
    return tensor


def _rows(ck: Checkpoint, name: str) -> Rows:
    """A reader of ``ck``'s tensor ``name`` by rows, each block checked and in the compute
    dtype."""

    def read(start: int, stop: int) -> Tensor:
        block = compute_dtype(ck.state.rows(name, start, stop))  # float32 sums fastest
        return _finite(ck, name, block, f" (in rows {start}:{stop})")

    return read


def _merged_rows(
    planned: TensorInfo,
    inputs: _Inputs,
    record: CombineMethod,
    options: dict[str, Any],
    seed: int,
) -> Iterator[Tensor] | None:
    """Tensor ``planned.name`` merged by row blocks read as needed (None where the method or
    the inputs need the whole tensor: a LoRA adapter's delta is not stored by rows)."""
    if any(isinstance(ck.state, AdapterState) for ck in inputs.models):
        return None
    name = planned.name
    base = _rows(inputs.base, name) if inputs.base is not None else None
    receiver = None
    if inputs.base is not None and inputs.receiver is not inputs.base:
        receiver = _rows(inputs.receiver, name)
    return combine_rows(
        record,
        name,
        planned.shape,
        [_rows(ck, name) for ck in inputs.models],
        options,
        base=base,
        receiver=receiver,
        seed=seed,
    )


def _merged(
    name: str,
    inputs: _Inputs,
    symmetries: dict[int, Symmetry],
    record: CombineMethod,
    options: dict[str, Any],
    seed: int,
) -> Tensor:
    arch = inputs.arch
    if inputs.base is None:  # check_merge gives a base to the task-vector merges only
        tensors = [_read(ck, name, symmetries, arch) for ck in inputs.models]
        return combine_tensor(record, name, tensors, options, seed)
    base = _read(inputs.base, name, symmetries, arch)
    # A generator: each model is read, turned into its task vector and pruned before the next
    # is read, so only the pruned task vectors are held together.
    deltas = (
        ck.state.delta(name)  # a LoRA adapter's own ΔW, exact
        if isinstance(ck.state, AdapterState)
        else _read(ck, name, symmetries, arch) - base
        for ck in inputs.models
    )
    merged = combine_tensor(record, name, deltas, options, seed)
    if inputs.receiver is inputs.base:
        return merged.add_(base)
    return merged.add_(_read(inputs.receiver, name, symmetries, arch))
