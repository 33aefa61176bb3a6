"""Analysis of trained networks: layer-by-layer similarity (mean CCA, linear CKA), CKA's
failure mode demonstrated (:func:`cka_attack`), which checkpoints to merge
(:func:`select_checkpoints`) and what matched units encode (:func:`visualize_models`)."""

from accord.analysis.cka_attack import CkaAttack, cka_attack, plot_cka_attack
from accord.analysis.selection import Selection, select_checkpoints
from accord.analysis.selection_report import add_select_parser, plot_selection, write_selection
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
from accord.analysis.visualize import (
    SpaceVisual,
    add_visualize_parser,
    visualize_models,
    write_visuals,
)

__all__ = [
    "CAVEATS",
    "CkaAttack",
    "Selection",
    "Similarity",
    "SpaceVisual",
    "add_analyze_parser",
    "add_select_parser",
    "add_visualize_parser",
    "analyze_checkpoints",
    "canonical_correlations",
    "cka_attack",
    "compare_layers",
    "layer_features",
    "linear_cka",
    "mean_cca",
    "pair_similarity",
    "plot_cka_attack",
    "plot_selection",
    "prepare",
    "select_checkpoints",
    "visualize_models",
    "write_selection",
    "write_similarity",
    "write_visuals",
]
