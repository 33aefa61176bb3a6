"""Merge methods beyond :mod:`accord.llm.methods`, one paper per module, as plain
functions on one tensor at a time; registered in :data:`accord.llm.merge.METHODS`.

- :mod:`.model_stock`: Model Stock (Jang et al., ECCV 2024);
- :mod:`.della`: DELLA-Merging (Deep et al., 2024);
- :mod:`.breadcrumbs`: Model Breadcrumbs (Davari & Belilovsky, ECCV 2024);
- :mod:`.sce`: SCE of FuseChat (Wan et al., 2024);
- :mod:`.nuslerp`: mergekit's NuSLERP.

Like the task-vector methods of :mod:`accord.llm.methods`, those that take task
vectors return the merged task vector, which the merge adds to the receiver.
"""

from accord.llm.merge_methods.breadcrumbs import breadcrumbs, breadcrumbs_prune
from accord.llm.merge_methods.della import della, della_prune
from accord.llm.merge_methods.model_stock import model_stock
from accord.llm.merge_methods.nuslerp import nuslerp, nuslerp_t
from accord.llm.merge_methods.sce import sce

__all__ = [
    "breadcrumbs",
    "breadcrumbs_prune",
    "della",
    "della_prune",
    "model_stock",
    "nuslerp",
    "nuslerp_t",
    "sce",
]
