"""Memory layout of a pass over data: 2-d convolutions in channels-last format on the CPU.

oneDNN's CPU convolutions run natively on channels-last (NHWC) tensors; on the default
(NCHW) layout every convolution reorders its input and output. Converting the weights once
makes every activation after the first convolution channels-last, so whole passes are
cheaper (``accord bench speed`` measures it). The values are those of the model as given up
to the rounding of another summation order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


def wants_channels_last(device: str | torch.device) -> bool:
    """Whether passes on ``device`` run convolutions channels-last: on the CPU only (on a GPU
    the better layout depends on the dtype and the kernels)."""
    return torch.device(device).type == "cpu"


@contextmanager
def channels_last(models: Sequence[nn.Module], enabled: bool = True) -> Iterator[None]:
    """The 2-d convolution weights of ``models`` in channels-last format inside the block;
    every weight gets its own tensor back afterwards (values and layout as given)."""
    saved: list[tuple[nn.Parameter, torch.Tensor]] = []
    if enabled:
        for model in models:
            for module in model.modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, nn.Conv2d) and isinstance(weight, nn.Parameter):
                    saved.append((weight, weight.data))
                    weight.data = weight.data.contiguous(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for weight, data in reversed(saved):  # a weight shared by two models: its own first
            weight.data = data
