"""Combining aligned state dicts into one: one module per combiner, each registering its record
(:func:`accord.registry.combiner`), for vision merges and LLM checkpoints alike.

Plain averaging and NP Merge's learned weights combine aligned vision models; linear, SLERP,
task arithmetic, TIES, DARE, DELLA, Model Breadcrumbs, SCE, Model Stock and NuSLERP combine
tensors, or task vectors against a base, one tensor at a time
(:func:`merge_state_dicts`, :func:`combine_tensor`).
"""

from accord.combine import (
    average,
    breadcrumbs,
    dare,
    della,
    linear,
    model_stock,
    npmerge,
    nuslerp,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
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
from accord.combine.npmerge import NPMergeResult, coefficient_histograms, loss_curve, np_merge

# The method modules register themselves when imported.
__all__ = [
    "NPMergeResult",
    "average",
    "average_states",
    "breadcrumbs",
    "coefficient_histograms",
    "combine_tensor",
    "dare",
    "della",
    "disjoint_merge",
    "elect_sign",
    "l1_rescaled",
    "largest_mask",
    "linear",
    "loss_curve",
    "magnitude_prune",
    "merge_state_dicts",
    "model_stock",
    "np_merge",
    "npmerge",
    "nuslerp",
    "random_prune",
    "rescaled",
    "sce",
    "slerp",
    "sparse_task_arithmetic",
    "task_arithmetic",
    "ties",
]
