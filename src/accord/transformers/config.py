"""The YAML file of ``accord llm-merge``: one pydantic model, validated whole before any weight
is read, every problem reported at once with the key it concerns.

Example ``ties.yaml`` (run with ``accord llm-merge ties.yaml``)::

    method: ties              # linear | slerp | task_arithmetic | ties | dare | dare_ties
    base: models/llama-base   # the task vectors' base (task-vector methods)
    models:                   # fine-tuned models (a path, or {path, weight})
      - models/llama-math
      - {path: models/llama-code, weight: 0.5}
    parameters: {density: 0.2, scale: 1.0}
    receiver: models/llama-other   # optional: add the task vectors to this model instead
    align: true                    # move the receiver into the base's coordinates first
    dtype: bfloat16                # optional; default: the receiver's
    shard_size: 2GB                # optional: bytes per shard (or 500MB, 1.5GiB, 1000000)
    seed: 0                        # optional: DARE's random drops, 0 <= seed < 2**32
    output: merged/ties

Paths are relative to the current directory.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from accord.config import read_yaml_mapping
from accord.errors import ConfigError
from accord.transformers.io import parse_size
from accord.transformers.merge import METHODS, SEED_LIMIT, check_merge


class ModelEntry(BaseModel):
    """A model directory and its weight in the merge."""

    model_config = ConfigDict(extra="forbid")

    path: str
    weight: float = 1.0


class Parameters(BaseModel):
    """Method parameters; each method reads only its own (others are refused)."""

    model_config = ConfigDict(extra="forbid")

    t: float | None = Field(None, description="slerp: interpolation position, 0 (first) to 1")
    scale: float | None = Field(None, description="λ multiplying the merged task vector")
    density: float | None = Field(None, description="TIES: fraction of entries kept per tensor")
    drop_rate: float | None = Field(None, description="DARE: probability of dropping an entry")


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
    shard_size: int = Field(
        "2GB", validate_default=True, description="bytes per shard: 500MB, 1.5GiB or a number"
    )
    seed: int = Field(0, ge=0, lt=SEED_LIMIT, description="seed of DARE's random drops")
    output: str = Field(description="output directory (refused if it exists)")
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


def load_llm_merge_config(path: str | os.PathLike[str]) -> LLMMergeConfig:
    """Read and validate a YAML merge config; ConfigError listing every problem by key."""
    data = read_yaml_mapping(path, "method, models, output")
    return validate_llm_merge_config(data, where=str(path))


def validate_llm_merge_config(
    data: dict[str, Any], where: str = "llm-merge config"
) -> LLMMergeConfig:
    """An :class:`LLMMergeConfig` from plain data; ConfigError naming each bad key."""
    try:
        config = LLMMergeConfig(**data)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"{where}: " + "; ".join(problems)) from None
    problems = _semantic_problems(config)
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))
    return config


def _describe(error: Any) -> str:
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc) or "(top level)"
    hint = ""
    if error["type"] == "extra_forbidden":
        model = {"parameters": Parameters, "models": ModelEntry}.get(loc[0], LLMMergeConfig)
        close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
    # a validator's ValueError already says what is wrong; pydantic prefixes "Value error, "
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{key}: {message}{hint}"


def _semantic_problems(config: LLMMergeConfig) -> list[str]:
    problems = check_merge(
        config.method,
        config.parameters.model_dump(exclude_none=True),
        len(config.models),
        has_base=config.base is not None,
        has_receiver=config.receiver is not None,
        align=config.align,
    )
    paths = [(f"models[{i}].path", m.path) for i, m in enumerate(config.models)]
    paths += [(key, getattr(config, key)) for key in ("base", "receiver") if getattr(config, key)]
    problems += [
        f"{key}: {value} is not a directory" for key, value in paths if not Path(value).is_dir()
    ]
    if Path(config.output).exists() and not config.overwrite:
        problems.append(
            f"output: {config.output} already exists (set overwrite: true to replace it)"
        )
    return problems
