"""``accord llm-merge CONFIG.yaml [OUT]``: merge Hugging Face checkpoints as a YAML file says.

The file is accord's (:mod:`accord.llm.config`) or mergekit's (``merge_method``, read
by :mod:`accord.llm.mergekit`), called as ``mergekit-yaml CONFIG OUT`` is; ``OUT``
replaces the config's ``output``. The config is validated whole (every bad key reported at
once) before any weight is read.
"""

from __future__ import annotations

import os
import sys

import torch

from accord.errors import AccordError
from accord.llm.config import LLMMergeConfig, load_llm_merge_config
from accord.llm.merge import merge_checkpoints


def run_llm_merge(config: LLMMergeConfig, progress: bool = True) -> str:
    """Run a validated merge config; returns the output directory."""
    assert config.output is not None  # validation requires one
    path = merge_checkpoints(
        [m.path for m in config.models],
        config.output,
        method=config.method,
        base=config.base,
        receiver=config.receiver,
        parameters=config.parameters.given(),
        model_parameters=[m.own_parameters() for m in config.models],
        align=config.align,
        dtype=getattr(torch, config.dtype) if config.dtype else None,
        tokenizer=config.tokenizer_folder(),
        shard_size=config.shard_size,
        seed=config.seed,
        overwrite=config.overwrite,
        progress=progress,
    )
    return str(path)


def llm_merge_main(
    config_path: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> int:
    """Entry point of ``accord llm-merge CONFIG.yaml [OUT]``: 0 on success; 2 with the error on
    stderr when the config or the models are invalid."""
    try:
        config = load_llm_merge_config(config_path, output)
        written = run_llm_merge(config, progress=progress)
    except AccordError as exc:
        print(f"accord llm-merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"written to {written}")
    return 0
