"""Merge configurations: one pydantic model for the YAML file and the command line.

Example ``merge.yaml`` (run with ``accord merge --config merge.yaml``)::

    models: [models/fashion-mnist-vgg11-iid0of2-s0-..., models/fashion-mnist-vgg11-iid1of2-s1-...]
    method: cca          # or all, or any alignment or combiner (accord.registry)
    # base: models/BASE  # the model they were fine-tuned from (combine: ties, dare, ...)
    options: {ridge: 0.1}  # or auto: chosen on the validation split
    reference: 0         # or best (validation accuracy)
    repair: auto         # bn-reset, repair, none
    samples: 10000       # training examples for the statistics pass and the repair
    output: merged/cca
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from accord.errors import ConfigError, did_you_mean
from accord.models.inputs import SEQUENCE_LENGTH
from accord.registry import DEFAULT_ALIGN, DEFAULT_COMBINE

ConfigModel = TypeVar("ConfigModel", bound=BaseModel)


class MergeConfig(BaseModel):
    """What ``accord merge`` does; every field is also a command-line option."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(
        min_length=2,
        description="checkpoint folders (accord train), Hugging Face model folders, or weights "
        "files (.safetensors, .pt) of the --model class",
    )
    method: str | None = Field(
        None,
        description="an alignment or a combiner (see align, combine), or 'all' for a comparison "
        f"table; default {DEFAULT_ALIGN}",
    )
    align: str | None = Field(
        None, description=f"alignment (default: the method's, else {DEFAULT_ALIGN})"
    )
    combine: str | None = Field(
        None, description=f"combiner (default: the method's, else {DEFAULT_COMBINE})"
    )
    base: str | None = Field(
        None,
        description="the model the others were fine-tuned from, of their kind (a checkpoint "
        "folder, Hugging Face folder or weights file of --model), for the combiners of task "
        "vectors (ties, dare, task_arithmetic, ...); with method all these join the comparison",
    )
    options: dict[str, Any] | Literal["auto"] = Field(
        default_factory=dict, description="method options, or 'auto' (chosen on validation)"
    )
    reference: int | Literal["best"] = Field(0, description="model index, or 'best' on validation")
    repair: Literal["auto", "bn-reset", "repair", "none"] = "auto"
    batchnorm: Literal["fold", "transform"] = Field(
        "fold", description="BatchNorm under dense maps: fold into writers, or transform γ/β"
    )
    samples: int | None = Field(
        10000, gt=0, description="training examples for statistics and repair (None: all)"
    )
    batch_size: int = Field(256, gt=0)
    output: str | None = Field(
        None,
        description="output folder; an existing one is replaced with overwrite, and only when "
        "accord wrote it (leave out to write nothing)",
    )
    overwrite: bool = Field(
        False, description="replace an existing output that accord wrote (never anything else)"
    )
    device: str = "cpu"
    data_dir: str | None = None
    model: str | None = Field(
        None,
        description="your nn.Module class as MODULE:CLASS (mypkg.nets:Net); the models are then "
        "its weights files",
    )
    model_args: dict[str, Any] = Field(
        default_factory=dict,
        description="the --model class's constructor arguments, JSON: '{\"width\": 2}'",
    )
    input_shape: list[int] | None = Field(
        None,
        description="the shape of one input of --model without the batch axis (C,H,W, or N "
        "for flat inputs): it is traced on random inputs of this shape, and the data's images "
        "are fitted to it (default: traced on the data's first batch, as it is)",
    )
    data: str | None = Field(
        None,
        description="statistics data for Hugging Face folders and --model: a dataset name "
        "(images), a .txt file or a .json of token ids (text), or random-tokens (a smoke test "
        "only)",
    )
    sequence_length: int | None = Field(
        None,
        gt=0,
        description=f"tokens per sequence of text --data (default {SEQUENCE_LENGTH}, or the "
        "model's positions when fewer)",
    )

    @field_validator("input_shape", mode="before")
    @classmethod
    def _parse_shape(cls, value: Any) -> Any:
        """``"3,32,32"`` (the command line) or one number as a list of sizes."""
        if isinstance(value, str):
            try:
                value = [int(part) for part in value.split(",")]
            except ValueError:
                raise ValueError(f"{value!r}: expected sizes such as 3,32,32") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, list | tuple) and (
            not value
            or any(isinstance(v, int) and not isinstance(v, bool) and v < 1 for v in value)
        ):
            raise ValueError(f"{value!r}: expected positive sizes such as 3,32,32")
        return value


def read_yaml_mapping(path: str | os.PathLike[str], keys: str) -> dict[str, Any]:
    """The mapping at the top of YAML file ``path``; a ConfigError names the file when it is
    missing, not YAML, or not a mapping (``keys`` lists the expected ones in that message)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys ({keys}, ...)")
    return data


def load_merge_config(path: str | os.PathLike[str], **overrides: Any) -> MergeConfig:
    """Read and validate a YAML merge config; every invalid key is reported at once."""
    data = read_yaml_mapping(path, "models, method")
    return validate_merge_config({**data, **overrides}, where=str(path))


def validate_merge_config(data: dict[str, Any], where: str = "merge config") -> MergeConfig:
    """A :class:`MergeConfig` from plain data, or a ConfigError naming each bad key.

    An ``output`` given but null or empty is an error: whoever wrote it expected a folder.
    """
    if "output" in data and (data["output"] is None or not str(data["output"]).strip()):
        given = "null" if data["output"] is None else repr(data["output"])
        raise ConfigError(
            f"{where}: output (--out) is {given}, which names no folder, so nothing would be "
            "written; give a folder, or leave output out to merge without writing"
        )
    return validated(MergeConfig, data, where, lambda path: MergeConfig.model_fields)


def validated(
    model: type[ConfigModel],
    data: Mapping[str, Any],
    where: str,
    fields: Callable[[list[str]], Iterable[str]],
) -> ConfigModel:
    """``model(**data)``, or a ConfigError naming ``where`` and every bad key: its path, what
    is wrong (a validator's own message, without pydantic's "Value error, " prefix) and, for
    an unknown key, the closest of ``fields(path)``, the keys known where it stands."""
    try:
        return model(**data)
    except ValidationError as exc:
        problems = _validation_problems(exc, fields)
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None


def _validation_problems(
    exc: ValidationError, fields: Callable[[list[str]], Iterable[str]]
) -> list[str]:
    problems = []
    for error in exc.errors():
        path = [str(part) for part in error["loc"]]
        hint = did_you_mean(path[-1], fields(path)) if error["type"] == "extra_forbidden" else ""
        message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
        problems.append(f"{'.'.join(path) or '(top level)'}: {message}{hint}")
    return problems
