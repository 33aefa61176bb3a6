"""Combining aligned state dicts: plain (weighted) averaging and NP Merge's learned weights."""

from accord.combine.average import average_states
from accord.combine.npmerge import NPMergeResult, coefficient_histograms, loss_curve, np_merge

__all__ = ["NPMergeResult", "average_states", "coefficient_histograms", "loss_curve", "np_merge"]
