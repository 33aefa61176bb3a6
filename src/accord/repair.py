"""Normalisation repair after merging: BatchNorm statistics reset and REPAIR.

Averaging aligned weights shrinks the variance of the merged features; BatchNorm networks
recover by recomputing running statistics on training data (one pass, cumulative average),
networks without BatchNorm by REPAIR (Jordan et al., ICLR 2023): rescale each merged channel
so its mean and standard deviation match the average of the endpoints' statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from accord.errors import MergeError


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_batchnorm(
    model: nn.Module,
    data: Any,
    *,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> nn.Module:
    """Recompute every BatchNorm's running statistics on ``data`` in one pass, in place.

    Momentum is set to None (cumulative average over the pass) and restored afterwards;
    the model is returned in eval mode.
    """
    from accord.evaluate import batches

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.to(device).train()
    seen = 0
    for index, batch in enumerate(
        tqdm(batches(data), desc="BN reset", leave=False, disable=not progress)
    ):
        if max_batches is not None and index >= max_batches:
            break
        inputs = batch[0] if isinstance(batch, tuple | list) else batch
        model(inputs.to(device))
        seen += 1
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    if seen == 0:
        raise MergeError("BatchNorm reset needs training data; the data given was empty")
    return model.eval()
