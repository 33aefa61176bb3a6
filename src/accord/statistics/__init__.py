"""Activation statistics of N models: means and covariances per feature space, in float64.

Statistics do not depend on any merge hyper-parameter: collect them once and reuse them for
every method and every ridge value.

Accumulation (one pass, float64). For model i with features ``x_i`` (C,) and a shift ``s_i``
(the first batch's mean), :func:`collect_statistics` keeps ``n``, ``t_i = Σ (x_i − s_i)`` and
``P_ij = Σ (x_i − s_i)(x_j − s_j)ᵀ``. Then ``mean_i = s_i + t_i / n`` and

    Cov(x_i, x_j) = (P_ij − t_i t_jᵀ / n) / (n − 1).

A space of blocks (each feature owns B consecutive entries, a whole attention head, that move
only together) keeps of ``P_ij`` only its entries at one position k of two features c and d, as
``P_ij[k, c, d]`` (rows ``cB + k``, columns ``dB + k``), and of the covariances the same
entries: B times fewer values, all that matching whole blocks reads.

The shift keeps the subtraction well conditioned when features have a large offset. Sums add
across processes: each rank re-expresses its sums around one common shift and all-reduces them.

Cost. The models run one after another on each batch, the reference first, under
``torch.inference_mode`` (channels-last convolutions on a CPU; on an exported graph, BatchNorms
fused into the layer before them and in-place ``relu``/``add``: :mod:`accord.trace.lean`);
each observed output is summed as soon as it is produced, in chunks of about 2¹⁸ values
shifted and converted to the product dtype in one pass into one buffer shared by every
observation (it stays in cache), and only
the chunks a later model pairs with (the reference's) are kept, in memory reused batch after
batch, until the batch ends: memory holds one model's activations, not N. The default
``precision="float32"`` multiplies each chunk in float32 and sums the chunks' products in
float64 around the shift; ``"float64"`` multiplies in float64 too, at a higher cost
(``accord bench speed`` measures both; see BENCHMARKS.md). The graph of each
model is traced once per pass.
"""

from accord.statistics.collect import collect_statistics
from accord.statistics.types import SpaceStatistics, Statistics

__all__ = ["SpaceStatistics", "Statistics", "collect_statistics"]
