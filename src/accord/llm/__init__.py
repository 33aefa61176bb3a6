"""Hugging Face checkpoints: lazy safetensors I/O, exact symmetries, alignment and merges.

Tensor-wise merges (the tensor-wise combiners of :data:`accord.registry.COMBINERS`: linear,
slerp, task arithmetic, TIES, DARE, DARE-TIES, DELLA, Model Breadcrumbs, SCE, Model Stock,
NuSLERP; :data:`METHODS`) take checkpoints of any family whose
tensors agree by name and shape; mergekit's YAML configs run through
:mod:`accord.llm.mergekit`. Symmetries and alignment know the families of
:data:`SUPPORTED_ARCHITECTURES` (Llama, Mistral, Qwen2, Qwen3, Gemma 2/3, Phi-3, OLMo 2,
GPT-2; tables in :mod:`accord.llm.families`). peft LoRA adapters of a base merge as task
vectors (:mod:`accord.llm.adapters`; task arithmetic also into one adapter). Everything
works on state dicts (name → tensor) and the ``config.json`` dict, tensor by tensor, so a merge
of checkpoints on disk holds a few tensors in memory at a time. ``transformers`` is needed only
to run a model (activation alignment, tests), not to read, align or merge weights.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from accord.checkpoint import Checkpoint, LazyState, load_state_and_config, open_checkpoint
from accord.combine.dare import dare
from accord.combine.linear import linear
from accord.combine.slerp import slerp
from accord.combine.task_arithmetic import task_arithmetic
from accord.combine.ties import ties
from accord.llm._models import ModelLike, repack, unpack
from accord.llm.adapters import merge_adapters, open_adapter
from accord.llm.align import align, find_alignment
from accord.llm.arch import SUPPORTED_ARCHITECTURES, Architecture
from accord.llm.cli import llm_merge_main
from accord.llm.io import save_checkpoint
from accord.llm.merge import METHODS, merge_checkpoints
from accord.llm.symmetry import (
    SYMMETRY_KINDS,
    LayerSymmetry,
    Symmetry,
    apply_symmetry,
    sample_symmetry,
    transform_tensor,
)


def random_symmetry(
    model: ModelLike,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    *,
    kinds: Collection[str] | None = None,
    vo: str = "orthogonal",
) -> Any:
    """A copy of ``model`` moved by a random exact symmetry of every kind in ``kinds``.

    ``random_symmetry(state, config, seed)`` takes a state dict and its config dict and returns
    a new state dict; ``random_symmetry(hf_model, seed=...)`` returns a new module. The logits
    are unchanged up to rounding. See :mod:`accord.llm.symmetry` for the maps and
    :func:`accord.llm.symmetry.sample_symmetry` for ``kinds`` (default: every kind exact in
    the model's family) and ``vo``.
    """
    unpacked = unpack(model if config is None else (model, config), "model")
    symmetry = sample_symmetry(unpacked.arch, seed, kinds, vo)
    moved = apply_symmetry(unpacked.state, symmetry, unpacked.arch)
    return moved if config is not None else repack(unpacked, moved)


__all__ = [
    "METHODS",
    "SUPPORTED_ARCHITECTURES",
    "SYMMETRY_KINDS",
    "Architecture",
    "Checkpoint",
    "LayerSymmetry",
    "LazyState",
    "Symmetry",
    "align",
    "apply_symmetry",
    "dare",
    "find_alignment",
    "linear",
    "llm_merge_main",
    "load_state_and_config",
    "merge_adapters",
    "merge_checkpoints",
    "open_adapter",
    "open_checkpoint",
    "random_symmetry",
    "sample_symmetry",
    "save_checkpoint",
    "slerp",
    "task_arithmetic",
    "ties",
    "transform_tensor",
]
