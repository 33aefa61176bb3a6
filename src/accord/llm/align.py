"""Align one model to another of its family through the family's exact symmetries.

``align(model_b, to=model_a)`` returns B moved into A's coordinates: the same function as B
(logits unchanged), with weights as close to A's as the symmetries allow. Task vectors of A's
fine-tunes can then be added to it (Horoi et al. 2025, symmetry-aware task-vector transfer).

Without data, the maps come from the weights (Git Re-Basin weight matching over the residual
permutation, SwiGLU units, key/value groups and query heads, with orthogonal Procrustes for the
value/output maps and per-plane rotary rotations; see :mod:`accord.llm._weights`).
With calibration tokens, from activations (:mod:`accord.llm._activations`). Both end
by giving B exactly A's pre-norm gains (the gain-scale symmetry) and A's balance of q/k and
up/down norms (the scale symmetries, where the family has them). Only the maps of the family's
exact kinds are searched (:data:`accord.llm.families.FAMILIES`).

The value/output maps found are orthogonal: a general invertible map is a symmetry too (see
:func:`accord.llm.random_symmetry`), but is not recovered from the weights.

Example::

    >>> import torch, transformers
    >>> from accord.llm import align, random_symmetry
    >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    >>> a = transformers.LlamaForCausalLM(config)
    >>> b = random_symmetry(a, seed=1)
    >>> back = align(b, to=a)
    >>> max(float((back.state_dict()[k] - t).abs().max()) for k, t in a.state_dict().items()) < 1e-5
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from accord.llm._models import ModelLike, repack, to_module, unpack
from accord.llm._weights import weight_alignment
from accord.llm.arch import check_same_family
from accord.llm.symmetry import Symmetry, apply_symmetry

Batch = Any  # a LongTensor of token ids (batch, length), or a dict with input_ids/attention_mask


def find_alignment(
    model_b: ModelLike,
    to: ModelLike,
    data: Iterable[Batch] | None = None,
    *,
    max_iter: int = 5,
) -> Symmetry:
    """The :class:`Symmetry` moving ``model_b`` onto ``to`` (from weights when ``data`` is None,
    else from activations on the token batches in ``data``).

    Models are Hugging Face modules, ``(state, config)`` pairs or checkpoint directories; the
    configs must agree on every size (ConfigError naming the key).
    """
    b, a = unpack(model_b, "model_b"), unpack(to, "to")
    check_same_family({a.label: a.config, b.label: b.config})
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter}; expected at least 1 sweep")
    with torch.no_grad():
        if data is None:
            return weight_alignment(b.state, a.state, a.arch, max_iter=max_iter)
        from accord.llm._activations import activation_alignment

        return activation_alignment(to_module(b), to_module(a), b.state, a.state, a.arch, data)


def align(
    model_b: ModelLike,
    to: ModelLike,
    data: Iterable[Batch] | None = None,
    *,
    max_iter: int = 5,
) -> Any:
    """``model_b`` moved into the coordinates of ``to``, in the form it was given: a new module
    for a module, a ``(state, config)`` pair otherwise (``model_b``'s config). Inputs are not
    modified. See :func:`find_alignment` for the arguments."""
    symmetry = find_alignment(model_b, to, data, max_iter=max_iter)
    b = unpack(model_b, "model_b")
    return repack(b, apply_symmetry(b.state, symmetry, b.arch))
