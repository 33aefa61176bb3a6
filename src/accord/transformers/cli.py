"""``accord llm-merge CONFIG.yaml``: merge Llama-family checkpoints as a YAML file says.

The file is described in :mod:`accord.transformers.config`; it is validated whole (every bad key
reported at once) before any weight is read.
"""

from __future__ import annotations

import os
import sys

import torch

from accord.errors import AccordError
from accord.transformers.config import LLMMergeConfig, load_llm_merge_config
from accord.transformers.merge import merge_checkpoints


def run_llm_merge(config: LLMMergeConfig, progress: bool = True) -> str:
    """Run a validated merge config; returns the output directory."""
    path = merge_checkpoints(
        [m.path for m in config.models],
        config.output,
        method=config.method,
        base=config.base,
        receiver=config.receiver,
        weights=[m.weight for m in config.models],
        parameters=config.parameters.model_dump(exclude_none=True),
        align=config.align,
        dtype=getattr(torch, config.dtype) if config.dtype else None,
        shard_size=config.shard_size,
        seed=config.seed,
        overwrite=config.overwrite,
        progress=progress,
    )
    return str(path)


def llm_merge_main(config_path: str | os.PathLike[str], progress: bool = True) -> int:
    """Entry point of ``accord llm-merge CONFIG.yaml``: 0 on success; 2 with the error on
    stderr when the config or the models are invalid."""
    try:
        output = run_llm_merge(load_llm_merge_config(config_path), progress=progress)
    except AccordError as exc:
        print(f"accord llm-merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"written to {output}")
    return 0
