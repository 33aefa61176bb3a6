"""Analysis of trained networks: layer-by-layer similarity (mean CCA, linear CKA) and CKA's
failure mode demonstrated (:func:`cka_attack`)."""

from accord.analysis.cka_attack import CkaAttack, cka_attack, plot_cka_attack
from accord.analysis.similarity import (
    CAVEATS,
    Similarity,
    add_analyze_parser,
    analyze_checkpoints,
    canonical_correlations,
    compare_layers,
    layer_features,
    linear_cka,
    mean_cca,
    pair_similarity,
    prepare,
    write_similarity,
)

__all__ = [
    "CAVEATS",
    "CkaAttack",
    "Similarity",
    "add_analyze_parser",
    "analyze_checkpoints",
    "canonical_correlations",
    "cka_attack",
    "compare_layers",
    "layer_features",
    "linear_cka",
    "mean_cca",
    "pair_similarity",
    "plot_cka_attack",
    "prepare",
    "write_similarity",
]
