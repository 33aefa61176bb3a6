"""The YAML file of ``accord llm-merge``: one pydantic model, validated whole before any weight
is read, every problem reported at once with the key it concerns.

Example ``ties.yaml`` (run with ``accord llm-merge ties.yaml``)::

    method: ties              # any tensor-wise combiner (accord.llm.merge.METHODS)
    base: models/llama-base   # the task vectors' base (task-vector methods)
    models:                   # fine-tuned models (a path, or {path, weight, density, ...})
      - models/llama-math
      - {path: models/llama-code, weight: 0.5}
    parameters: {density: 0.2, scale: 1.0}   # also normalize, rescale, and per-model defaults
    receiver: models/llama-other   # optional: add the task vectors to this model instead
    align: true                    # move the receiver into the base's coordinates first
    dtype: bfloat16                # optional; default: the receiver's
    tokenizer_source: base         # optional: copy tokenizer files from base (or a folder)
    shard_size: 2GB                # optional: bytes per shard (or 500MB, 1.5GiB, 1000000)
    seed: 0                        # optional: DARE's and DELLA's drops, 0 <= seed < 2**32
    output: merged/ties            # or OUT on the command line, which wins

The parameters are the options of the methods' records (``accord.registry.COMBINERS``);
numeric ones are settings: a number, a gradient across the layers or name filters
(:mod:`accord.llm.settings`); switches are true or false.
A mergekit YAML (``merge_method: ...``) is read by :mod:`accord.llm.mergekit` and
validated here once translated. Paths are relative to the current directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    create_model,
    field_validator,
)

from accord._outputs import check_output
from accord.config import read_yaml_mapping, validated
from accord.errors import ConfigError, OutputError
from accord.llm.io import DEFAULT_SHARD_SIZE, parse_size
from accord.llm.merge import (
    MERGE_OUTPUT,
    METHODS,
    SEED_LIMIT,
    alignment_problems,
    check_merge,
    tokenizer_problems,
)
from accord.llm.settings import Setting, parse_setting
from accord.registry import Option

SettingValue = Annotated[Setting, PlainValidator(parse_setting)]


def _field(option: Option) -> tuple[Any, Any]:
    """A pydantic field for ``option``: a setting (numbers), or its plain type."""
    kind = SettingValue if option.type is float else option.type
    return (kind | None, Field(None, description=option.help))


def _options(per_model: bool) -> dict[str, tuple[Any, Any]]:
    """Fields for every option of the methods (only the per-model ones with ``per_model``)."""
    fields: dict[str, tuple[Any, Any]] = {}
    for record in METHODS.values():
        for option in record.options:
            if option.per_model or not per_model:
                fields.setdefault(option.name, _field(option))
    return fields


class _ModelPath(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str

    def own_parameters(self) -> dict[str, Setting]:
        """The parameters set for this model alone."""
        return {key: value for key, value in self if key != "path" and value is not None}


class _GivenParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def given(self) -> dict[str, Any]:
        """The parameters the config sets."""
        return {key: value for key, value in self if value is not None}


# A model directory and its own values of the per-model parameters (weight, density, ...),
# where they differ from ``parameters``; the fields come from the methods' records.
ModelEntry = create_model("ModelEntry", __base__=_ModelPath, **_options(per_model=True))
# Method parameters, the options of every method's record; each method reads only its own
# (others are refused).
Parameters = create_model("Parameters", __base__=_GivenParameters, **_options(per_model=False))


class LLMMergeConfig(BaseModel):
    """What ``accord llm-merge`` does."""

    model_config = ConfigDict(extra="forbid")

    method: str = Field(description=f"one of {', '.join(METHODS)}")
    models: list[ModelEntry] = Field(min_length=1, description="models to merge")
    base: str | None = Field(None, description="task vectors' base (task-vector methods)")
    receiver: str | None = Field(None, description="model the task vectors are added to")
    parameters: Parameters = Field(default_factory=Parameters)
    align: bool = Field(False, description="align the receiver to the base (weight matching)")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = Field(
        None, description="copy tokenizer files from: base (or the first model) or a folder"
    )
    shard_size: int = Field(
        DEFAULT_SHARD_SIZE,
        validate_default=True,
        description="bytes per shard: 500MB, 1.5GiB or a number",
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seed of DARE's and DELLA's drops")
    output: str | None = Field(
        None, description="output directory (an existing one: refused unless overwrite)"
    )
    overwrite: bool = False

    @field_validator("models", mode="before")
    @classmethod
    def _paths_as_entries(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"path": item} if isinstance(item, str) else item for item in value]
        return value

    @field_validator("shard_size", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_size(value)

    def tokenizer_folder(self) -> str | None:
        """The folder ``tokenizer_source`` names: ``base`` is the base, else the first model."""
        if self.tokenizer_source != "base":
            return self.tokenizer_source
        return self.base or self.models[0].path


def load_llm_merge_config(
    path: str | os.PathLike[str], output: str | os.PathLike[str] | None = None
) -> LLMMergeConfig:
    """Read and validate a YAML merge config, accord's or mergekit's (``merge_method``);
    ``output`` (the command line's OUT) replaces the config's. ConfigError listing every
    problem by key."""
    from accord.llm.mergekit import is_mergekit_config, translate_mergekit_config

    data = read_yaml_mapping(path, "method, models, output")
    if is_mergekit_config(data):
        data = translate_mergekit_config(data, where=str(path))
    if output is not None:
        data = {**data, "output": str(output)}
    return validate_llm_merge_config(data, where=str(path))


def validate_llm_merge_config(
    data: dict[str, Any], where: str = "llm-merge config"
) -> LLMMergeConfig:
    """An :class:`LLMMergeConfig` from plain data; ConfigError naming each bad key."""
    config = validated(LLMMergeConfig, data, where, _fields)
    problems = _semantic_problems(config)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return config


def _fields(path: list[str]) -> Iterable[str]:
    """The keys known where a key of ``path`` stands."""
    return {"parameters": Parameters, "models": ModelEntry}.get(
        path[0], LLMMergeConfig
    ).model_fields


def _semantic_problems(config: LLMMergeConfig) -> list[str]:
    problems = check_merge(
        config.method,
        config.parameters.given(),
        len(config.models),
        has_base=config.base is not None,
        has_receiver=config.receiver is not None,
        align=config.align,
        model_parameters=[m.own_parameters() for m in config.models],
    )
    paths = [(f"models[{i}].path", m.path) for i, m in enumerate(config.models)]
    paths += [(key, getattr(config, key)) for key in ("base", "receiver") if getattr(config, key)]
    missing = [(key, value) for key, value in paths if not Path(value).is_dir()]
    problems += [f"{key}: {value} is not a directory" for key, value in missing]
    if config.align and not missing:
        problems += alignment_problems(value for _, value in paths)
    tokenizer = config.tokenizer_folder()
    if tokenizer is not None and (config.tokenizer_source != "base" or not missing):
        problems += tokenizer_problems(tokenizer, "tokenizer_source")
    if config.output is None:
        problems.append(
            "output: no output folder; set output: in the config or give it on the command "
            "line (accord llm-merge CONFIG OUT)"
        )
    else:
        inputs = [value for _, value in paths] + ([tokenizer] if tokenizer is not None else [])
        try:
            check_output(config.output, MERGE_OUTPUT, overwrite=config.overwrite, inputs=inputs)
        except OutputError as exc:
            problems.append(f"output: {exc}")
    return problems
