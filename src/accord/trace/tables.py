"""Which tracing rule handles which module type, function and tensor method.

Module types match exactly: a subclass may override ``forward``, so it is unknown (its
spaces become fixed) unless listed here.
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch import nn
from torch.nn import functional as F

from accord.trace import heads as heads
from accord.trace import layers as layers
from accord.trace import rules as rules
from accord.trace.rules import Rule

_activation = rules.elementwise("dense")
_math = rules.elementwise("dense", activation=False)

_ACTIVATION_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.CELU,
    nn.SELU, nn.Softplus, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softsign,
    nn.Tanhshrink, nn.Softshrink, nn.Hardshrink, nn.LogSigmoid,
)  # fmt: skip
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_PAD_MODULES = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
    nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d,
    nn.CircularPad2d, nn.CircularPad3d,
)  # fmt: skip


def _pools(dims: int) -> dict[type[nn.Module], Rule]:
    """Pools over the last ``dims`` axes: max pools are nonlinear per feature."""
    kinds = {
        "MaxPool": "dense", "AvgPool": None, "AdaptiveAvgPool": None,
        "AdaptiveMaxPool": "dense", "LPPool": "dense",
    }  # fmt: skip
    found = {
        getattr(nn, f"{kind}{dims}d", None): rules.spatial(dims, k) for kind, k in kinds.items()
    }
    return {cls: rule for cls, rule in found.items() if cls is not None}


MODULE_RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: layers.linear,
    nn.Conv1d: layers.conv,
    nn.Conv2d: layers.conv,
    nn.Conv3d: layers.conv,
    nn.BatchNorm1d: layers.batchnorm,
    nn.BatchNorm2d: layers.batchnorm,
    nn.BatchNorm3d: layers.batchnorm,
    nn.InstanceNorm1d: layers.instancenorm,
    nn.InstanceNorm2d: layers.instancenorm,
    nn.InstanceNorm3d: layers.instancenorm,
    nn.LayerNorm: layers.layernorm,
    nn.GroupNorm: layers.groupnorm,
    nn.Embedding: layers.embedding,
    nn.PReLU: layers.prelu,
    nn.MultiheadAttention: layers.multihead_attention,
    nn.Flatten: heads.reshape,
    nn.Unflatten: heads.reshape,
    nn.Softmax: rules.softmax,
    nn.LogSoftmax: rules.softmax,
    nn.Upsample: rules.spatial(None),
    **{cls: _activation for cls in _ACTIVATION_MODULES},
    **{cls: rules.passthrough for cls in _PASS_MODULES},
    **{cls: rules.pad for cls in _PAD_MODULES},
    **_pools(1),
    **_pools(2),
    **_pools(3),
}

_ACTIVATION_FUNCTIONS = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid,
    F.tanh, torch.tanh, F.leaky_relu, F.leaky_relu_, F.elu, F.elu_, F.celu, F.selu,
    torch.selu, F.softplus, F.hardswish, F.hardsigmoid, F.hardtanh, F.mish, F.logsigmoid,
    F.softsign,
)  # fmt: skip
_MATH_FUNCTIONS = (
    torch.abs, torch.exp, torch.square, torch.sqrt, torch.clamp, torch.clip, torch.pow,
    operator.pow,
)  # fmt: skip
_PASS_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clone)
_LIKE_FUNCTIONS = (
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like,
)  # fmt: skip
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_POOL_FUNCTIONS = {
    1: (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d),
    2: (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d),
    3: (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d),
}
_ARITHMETIC = {
    "add": (operator.add, operator.iadd, torch.add),
    "sub": (operator.sub, operator.isub, torch.sub, torch.subtract),
    "mul": (operator.mul, operator.imul, torch.mul, torch.multiply),
    "div": (operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide),
}


def _pool_functions() -> dict[object, Rule]:
    table: dict[object, Rule] = {}
    for dims, (max_pool, avg_pool, adaptive_avg, adaptive_max) in _POOL_FUNCTIONS.items():
        table[max_pool] = table[adaptive_max] = rules.spatial(dims, "dense")
        table[avg_pool] = table[adaptive_avg] = rules.spatial(dims)
    return table


FUNCTION_RULES: dict[object, Rule] = {
    **{fn: _activation for fn in _ACTIVATION_FUNCTIONS},
    **{fn: _math for fn in _MATH_FUNCTIONS},
    **{fn: rules.passthrough for fn in _PASS_FUNCTIONS},
    **{fn: heads.reshape for fn in _RESHAPE_FUNCTIONS},
    **{fn: rules.binary(op) for op, fns in _ARITHMETIC.items() for fn in fns},
    **_pool_functions(),
    F.interpolate: rules.spatial(None),
    F.pad: rules.pad,
    F.softmax: rules.softmax,
    F.log_softmax: rules.softmax,
    torch.softmax: rules.softmax,
    torch.log_softmax: rules.softmax,
    torch.transpose: rules.transpose,
    torch.swapaxes: rules.transpose,
    torch.permute: rules.permute,
    torch.movedim: rules.movedim,
    torch.broadcast_to: rules.expand,
    torch.cat: rules.cat,
    torch.concat: rules.cat,
    torch.concatenate: rules.cat,
    torch.stack: rules.stack,
    torch.mean: rules.reduce(None),
    torch.sum: rules.reduce(None),
    torch.amax: rules.reduce("dense"),
    torch.amin: rules.reduce("dense"),
    operator.neg: rules.passthrough,
    torch.neg: rules.passthrough,
    operator.getitem: rules.getitem,
    builtins.getattr: rules.getattr_rule,
    **{fn: rules.constant for fn in _LIKE_FUNCTIONS},
    F.scaled_dot_product_attention: heads.attention,
    F.linear: layers.functional_writer,
    F.conv1d: layers.functional_writer,
    F.conv2d: layers.functional_writer,
    F.conv3d: layers.functional_writer,
}

METHOD_RULES: dict[str, Rule] = {
    **dict.fromkeys(("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_"), _activation),
    **dict.fromkeys(("abs", "exp", "square", "sqrt", "clamp", "clamp_", "clip", "pow"), _math),
    **dict.fromkeys(("clamp_min", "clamp_max"), _math),
    **dict.fromkeys(
        ("contiguous", "clone", "to", "type_as", "float", "double", "half", "bfloat16"),
        rules.passthrough,
    ),
    **dict.fromkeys(("detach", "cpu", "cuda", "neg"), rules.passthrough),
    **dict.fromkeys(
        ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"),
        heads.reshape,
    ),
    "reshape_as": heads.reshape,
    "transpose": rules.transpose,
    "swapaxes": rules.transpose,
    "permute": rules.permute,
    "movedim": rules.movedim,
    "expand": rules.expand,
    "expand_as": rules.expand,
    "mean": rules.reduce(None),
    "sum": rules.reduce(None),
    "amax": rules.reduce("dense"),
    "amin": rules.reduce("dense"),
    **{m: rules.binary(op) for op in _ARITHMETIC for m in (op, f"{op}_")},
    "softmax": rules.softmax,
    "log_softmax": rules.softmax,
    **dict.fromkeys(("size", "dim", "numel"), rules.metadata),
    **dict.fromkeys(("new_zeros", "new_ones", "new_empty", "new_full"), rules.constant),
}

# The rules that understand a space split into attention heads; any other rule seeing one
# treats its call as unknown.
HEAD_RULES = frozenset(
    {
        _activation,
        _math,
        rules.passthrough,
        rules.transpose,
        rules.permute,
        rules.movedim,
        heads.reshape,
        heads.attention,
    }
)
