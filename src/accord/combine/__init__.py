"""Combining aligned state dicts into one: one module per combiner, each registering its record
(:func:`accord.registry.combiner`), for vision merges and LLM checkpoints alike.

Plain averaging and NP Merge's learned weights combine aligned vision models; linear, SLERP,
task arithmetic, TIES, DARE, DELLA, Model Breadcrumbs, SCE, Model Stock and NuSLERP combine
tensors, or task vectors against a base, one tensor at a time
(:func:`merge_state_dicts`, :func:`combine_tensor`).
"""

import importlib
import pkgutil

from accord.combine._sparse import (
    disjoint_merge,
    elect_sign,
    l1_rescaled,
    largest_mask,
    magnitude_prune,
    random_prune,
    rescaled,
    sparse_task_arithmetic,
)
from accord.combine._state_dicts import combine_tensor, merge_state_dicts
from accord.combine.average import average_states
from accord.combine.npmerge import NPMergeResult, np_merge

__all__ = [
    "NPMergeResult",
    "average_states",
    "combine_tensor",
    "disjoint_merge",
    "elect_sign",
    "l1_rescaled",
    "largest_mask",
    "magnitude_prune",
    "merge_state_dicts",
    "np_merge",
    "random_prune",
    "rescaled",
    "sparse_task_arithmetic",
]

# Every method module registers its record when imported: adding one is adding its file.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")
