"""Tracing rules for ATen operators with parameters: writers, norms, embeddings, attention.

In an exported graph parameters are inputs of the operators (a weight is a view of a
parameter, :class:`~accord.trace.state.Feat` with ``param``), so a writer is recognised by its
weight, whatever module or function called it. A space is named after its writer's weight
(``layers.0.fc`` for ``layers.0.fc.weight``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import fx

from accord.spec import AxisRef, FoldedNorm
from accord.trace import aten_attention
from accord.trace.layers import tie_channel_groups, write
from accord.trace.rules import in_order, mark_activation
from accord.trace.split import split_features
from accord.trace.state import Call, Feat, Routed, Seg, SpaceRecord, Tup, graph_name


def _param_axes(value: Any) -> tuple[int, ...] | None:
    """The parameter axis behind each axis of a parameter view, or None if it is not one."""
    if not isinstance(value, Feat) or value.param is None:
        return None
    if any(d is None or d < 0 for d in value.dims) or len(set(value.dims)) != value.ndim:
        return None
    return tuple(d for d in value.dims if d is not None)


def _optional_param(value: Any) -> tuple[Feat | None, bool]:
    """``(bias, ok)``: no bias, or a bias that is a whole 1-d parameter."""
    if value is None:
        return None, True
    axes = _param_axes(value)
    return value, axes == (0,)


def _space_name(param: str) -> str:
    return param.removesuffix(".weight")


def _matrix_writer(call: Call, x: Any, weight: Any, bias: Any, transposed: bool) -> Any:
    """``x @ Wᵀ + b`` (``transposed``: ``x @ W + b``) with W a 2-d parameter view."""
    axes, shape = _param_axes(weight), call.out_shape
    bias, bias_ok = _optional_param(bias)
    if axes is None or len(axes) != 2 or not bias_ok or shape is None:
        return None
    if not isinstance(x, Feat) or x.param is not None:
        return None
    reads, writes = (axes[0], axes[1]) if transposed else (axes[1], axes[0])
    call.use(weight)
    refs = [AxisRef(weight.param, writes, at=weight.picked)]
    if bias is not None:
        call.use(bias)
        refs.append(AxisRef(bias.param, 0))
    if x.featured:
        _read_axis(call, x, weight.param, reads, x.ndim - 1, weight.picked)
    size = shape[-1]
    name = _space_name(weight.param) + ("" if weight.picked is None else f"[{weight.picked[1]}]")
    out = write(call, name, size, shape, len(shape) - 1, tuple(refs))
    if x.group is not None and weight.picked is not None:
        _by_group(call, x, out, weight, (reads, writes))
    return _computed_weights(call, x, out, weight, bias)


def _by_group(call: Call, x: Feat, out: Feat, weight: Feat, axes: tuple[int, int]) -> None:
    """One expert's slice ``W[e]`` of a packed parameter on the rows of one group (JetMoE's
    experts in a Python loop, each on its piece of the tokens): where the group is expert
    ``e``'s, its claims on ``x``'s spaces and on the output's are made expert by expert, as
    a grouped product's (:func:`grouped_mm`); else those spaces stay one for every expert."""
    (routed, group), (expert_axis, expert) = x.group, weight.picked
    claims = [(space, axes[0]) for space in call.table.spaces(x)]
    claims += [(space, axes[1]) for space in call.table.spaces(out)]
    for space, axis in claims:
        record = call.table.record(space)
        if group == expert:
            _by_expert(record, routed, (weight.param, axis), expert_axis)
        else:
            record.crossed = True


def _computed_weights(call: Call, x: Any, out: Feat, weight: Feat, bias: Feat | None) -> Feat:
    """A weight or bias computed from its parameter (``exp(w)``, a standardized convolution
    weight) follows permutations of the parameter's axes, not other maps: the spaces it reads
    and writes allow permutations only."""
    if weight.applied or (bias is not None and bias.applied):
        call.table.downgrade_value(out, "permutation")
        if isinstance(x, Feat) and x.featured:
            call.table.downgrade_value(x, "permutation")
    return out


def _read_axis(
    call: Call,
    x: Feat,
    tensor: str,
    tensor_axis: int,
    axis: int,
    at: tuple[int, int] | None = None,
) -> None:
    """Axis ``tensor_axis`` of ``tensor`` (in its slice ``at``, see AxisRef) reads ``x``'s
    features, which must lie on ``axis``."""
    if x.axis != axis:
        reason = f"{call.desc} reads axis {axis}, but the features lie on axis {x.axis}"
        call.table.fix_value(x, reason)
        return
    call.table.add_per_feature(x, "readers", tensor, tensor_axis, at=at)
    if call.input_node(_x_index(call)) is not None:
        call.event("reader_in", call.input_node(_x_index(call)))


def _x_index(call: Call) -> int:
    return 1 if call.node.target.__name__.startswith("addmm") else 0


def linear(call: Call) -> Any:
    """aten.linear(x, W, b): W rows and b write, W columns read."""
    return _matrix_writer(call, call.x, call.arg(1, "weight"), call.arg(2, "bias", None), False)


def addmm(call: Call) -> Any:
    """aten.addmm(b, x, W) = b + x @ W (GPT-2's Conv1D: W is (in, out))."""
    if call.arg(3, "beta", 1) != 1 or call.arg(4, "alpha", 1) != 1:
        return None
    return _matrix_writer(call, call.arg(1, "mat1"), call.arg(2, "mat2"), call.arg(0, "self"), True)


def matmul(call: Call) -> Any:
    """aten.mm / matmul / bmm: with a parameter on the right a writer, between activations
    the products of written-out attention (see :mod:`accord.trace.aten_attention`)."""
    a, b = call.arg(0, "self"), call.arg(1, "other")
    if isinstance(b, Feat) and b.param is not None and b.ndim == 2:
        return _matrix_writer(call, a, b, None, True)
    if isinstance(b, Feat) and b.param is not None and b.ndim == 3 and b.gathered is None:
        return _batched_writer(call, a, b)
    for weight, x in ((a, b), (b, a)):
        if isinstance(weight, Feat) and weight.gathered is not None and weight.ndim == 3:
            return _gathered_writer(call, x, weight, weight_first=weight is a)
    from accord.trace.aten_attention import product

    return product(call, a, b)


def einsum(call: Call) -> Any:
    """aten.einsum of an activation and a 2-d parameter that is a Linear (``"...i,oi->...o"``,
    ``"bti,io->bto"``): the last letter of the activation is contracted with one axis of the
    parameter and replaced by its other one in the output."""
    equation, operands = call.arg(0, "equation"), call.arg(1, "tensors")
    if not isinstance(equation, str) or not isinstance(operands, list | tuple):
        return None
    if len(operands) != 2 or "->" not in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    subscripts = inputs.split(",")
    params = [isinstance(t, Feat) and t.param is not None for t in operands]
    if len(subscripts) == 2 and not any(params):
        return _batched_product(call, operands, subscripts, out)
    if len(subscripts) != 2 or sorted(params) != [False, True]:
        return None
    if any(isinstance(t, Feat) and t.heads is not None for t in operands):
        return None
    w_at = params.index(True)
    x, weight, xs, ws = operands[1 - w_at], operands[w_at], subscripts[1 - w_at], subscripts[w_at]
    if len(ws) != 2 or len(set(ws)) != 2 or not xs or xs[-1] not in ws:
        return None
    contracted, written = xs[-1], ws.replace(xs[-1], "")
    if written in xs or out != xs[:-1] + written:
        return None
    return _matrix_writer(call, x, weight, None, transposed=ws == contracted + written)


def _batched_product(call: Call, operands: Any, subscripts: list[str], out: str) -> Any:
    """An einsum of two activations that is a batched matrix product, ``"bhlk,bhtk->bhlt"``
    (``q @ kᵀ``) or ``"bhlt,bhtv->bhlv"`` (``p @ v``): attention's products (CvT), traced as
    :func:`accord.trace.aten_attention.product`."""
    a, b = operands
    (sa, sb), n = subscripts, len(out)
    if not (isinstance(a, Feat) and isinstance(b, Feat)) or not (len(sa) == len(sb) == n >= 2):
        return None
    if len(set(sa)) != n or len(set(sb)) != n or sa[:-2] != sb[:-2] or sa[:-2] != out[:-2]:
        return None
    if out[-2] != sa[-2] or sa[-1] in out:
        return None
    if (sb[-2], sb[-1]) == (sa[-1], out[-1]):
        return aten_attention.product(call, a, b)
    if (sb[-1], sb[-2]) == (sa[-1], out[-1]):
        return aten_attention.product(call, a, _last_swapped(b))
    return None


def _last_swapped(x: Feat) -> Feat:
    """``x.transpose(-1, -2)`` as a traced value."""
    last, before = x.ndim - 1, x.ndim - 2
    swap = {last: before, before: last}
    shape = (*x.shape[:-2], x.shape[-1], x.shape[-2])
    if not x.featured:
        return Feat(shape)
    heads = None if x.heads is None else swap.get(x.heads, x.heads)
    return Feat(shape, swap.get(x.axis, x.axis), x.segs, heads=heads)


def grouped_mm(call: Call) -> Any:
    """aten._grouped_mm(x, W, offs) / transformers' grouped_mm_fallback: the rows of ``x``
    (tokens sorted by expert) in group g times ``W[g]`` (experts, in, out), the mixture of
    experts' projections. Every expert reads ``x``'s features and writes one new space,
    whose rows are grouped by expert (``Feat.routed``); where ``x``'s rows are grouped by the
    same offsets, expert g reads the rows of group g alone. :mod:`accord.trace.experts`
    gives each expert a space of its own where nothing else mixes their rows."""
    x, weight, offsets, shape = call.x, call.arg(1, "mat_b"), call.arg(2, "offs", None), None
    shape = call.out_shape
    axes = _param_axes(weight)
    if axes is None or len(axes) != 3 or not isinstance(x, Feat) or x.param is not None:
        return None
    if shape is None or x.ndim != 2 or len(shape) != 2 or offsets is None:
        return None
    if call.arg(3, "bias", None) is not None:
        return None
    call.use(weight)
    offsets_node = call.node.args[2] if len(call.node.args) > 2 else call.node.kwargs["offs"]
    routed = None
    if isinstance(offsets_node, fx.Node):
        routed = Routed(graph_name(offsets_node, offsets), weight.shape[0])
    if x.featured:
        _read_axis(call, x, weight.param, axes[1], 1)
        if routed is not None and x.routed == routed:
            for space in call.table.spaces(x):
                _by_expert(call.table.record(space), routed, (weight.param, axes[1]), axes[0])
    out = write(
        call, _space_name(weight.param), shape[1], shape, 1, (AxisRef(weight.param, axes[2]),)
    )
    if routed is None:
        return _computed_weights(call, x, out, weight, None)
    _by_expert(call.table.record(out.segs[0].space), routed, (weight.param, axes[2]), axes[0])
    return replace(_computed_weights(call, x, out, weight, None), routed=routed)


def _batched_writer(call: Call, x: Any, weight: Feat) -> Any:
    """aten.bmm / matmul(x, W) with W a 3-d parameter view (experts, in, out) and x
    (experts, tokens, in): entry g of x times ``W[g]``, every expert on every token (Llama 4's
    experts, the tokens scaled by each expert's routing weight). Every expert reads ``x``'s
    features and writes one new space, entry g of axis 0 computed by expert g alone
    (``Routed.batched``); where ``x`` is so already, expert g reads its entry alone.
    :mod:`accord.trace.experts` gives each expert a space of its own where nothing else mixes
    their entries."""
    axes, shape = _param_axes(weight), call.out_shape
    if axes is None or len(axes) != 3 or shape is None or len(shape) != 3:
        return None
    if not isinstance(x, Feat) or x.param is not None or x.ndim != 3 or x.heads is not None:
        return None
    if x.shape[0] != weight.shape[0] or weight.picked is not None:
        return None
    call.use(weight)
    same = x.routed is not None and x.routed.batched and x.routed.groups == weight.shape[0]
    routed = x.routed if same else Routed(call.node.name, weight.shape[0], batched=True)
    if x.featured:
        _read_axis(call, x, weight.param, axes[1], 2)
        if same:
            for space in call.table.spaces(x):
                _by_expert(call.table.record(space), routed, (weight.param, axes[1]), axes[0])
    name = _space_name(weight.param)
    out = write(call, name, shape[2], shape, 2, (AxisRef(weight.param, axes[2]),))
    _by_expert(call.table.record(out.segs[0].space), routed, (weight.param, axes[2]), axes[0])
    return replace(_computed_weights(call, x, out, weight, None), routed=routed)


def _gathered_writer(call: Call, x: Any, weight: Feat, weight_first: bool) -> Any:
    """aten.bmm of each row's own weights ``W[ids]`` (rows of a packed (experts, out, in)
    parameter picked by the token's expert id: transformers' ``batched_mm`` experts) and the
    row as a column, ``W[ids] @ x[:, :, None]``, or as a row, ``x[:, None] @ W[ids]``: every
    expert reads ``x``'s features and writes one new space, the same for all experts (their
    rows are not sorted apart, so one map moves every expert's slice alike, which is exact)."""
    shape = call.out_shape
    if not isinstance(x, Feat) or x.param is not None or not x.featured or shape is None:
        return None
    if x.ndim != 3 or len(shape) != 3 or x.heads is not None:
        return None
    # (rows, out, in) @ (rows, in, 1) -> (rows, out, 1); (rows, 1, in) @ (rows, in, out)
    if weight_first and x.shape[2] == 1 and x.axis == 1:
        reads, writes, axis = weight.dims[2], weight.dims[1], 1
    elif not weight_first and x.shape[1] == 1 and x.axis == 2:
        reads, writes, axis = weight.dims[1], weight.dims[2], 2
    else:
        return None
    call.use(weight)
    _read_axis(call, x, weight.param, reads, x.axis)
    out = write(
        call, _space_name(weight.param), shape[axis], shape, axis, (AxisRef(weight.param, writes),)
    )
    return _computed_weights(call, x, out, weight, None)


def _by_expert(record: SpaceRecord, routed: Routed, claim: tuple[str, int], expert: int) -> None:
    """The grouped product claims ``claim`` (tensor, feature axis) of ``record``'s space row
    group by row group, expert ``g`` at entry ``g`` of the tensor's axis ``expert``."""
    record.routed.add(routed)
    record.expert_axes[claim] = expert


def convolution(call: Call) -> Any:
    """aten.conv1d/2d/3d and aten.convolution (not transposed).

    A depthwise convolution (groups = input channels, ``k`` outputs each) keeps its input's
    spaces, each feature owning ``k`` output channels, and allows permutations only; other
    grouped convolutions read one map shared by the input's groups (:func:`_read_groups`)
    and give their output ``groups`` blocks.
    """
    x, weight, shape = call.x, call.arg(1, "weight"), call.out_shape
    bias, bias_ok = _optional_param(call.arg(2, "bias", None))
    if call.node.target.__name__.startswith("convolution"):
        if call.arg(6, "transposed"):
            return _transposed_convolution(call, call.arg(8, "groups", 1))
        groups = call.arg(8, "groups", 1)
    else:
        groups = call.arg(6, "groups", 1)
    axes = _param_axes(weight)
    if axes is None or axes[:2] != (0, 1) or not bias_ok or shape is None:
        return None
    if not isinstance(x, Feat) or x.param is not None:
        return None
    call.use(weight)
    refs = (AxisRef(weight.param, 0), AxisRef(bias.param, 0) if bias is not None else None)
    if bias is not None:
        call.use(bias)
    name, channels = _space_name(weight.param), x.shape[1]
    if groups == 1:
        if x.featured:
            _read_axis(call, x, weight.param, 1, 1)
        return _computed_weights(call, x, write(call, name, shape[1], shape, 1, refs), weight, bias)
    if groups == channels and x.featured and x.axis == 1:
        k = shape[1] // channels
        for ref in refs:
            if ref is not None:
                call.table.add_per_feature(x, "elementwise", ref.tensor, 0, scale=k)
        call.table.downgrade_value(x, "permutation")
        return Feat(shape, 1, tuple(Seg(s.space, s.size, s.block * k) for s in x.segs))
    if x.featured:
        _read_groups(call, x, weight.param, groups, name)
    out = write(call, name, shape[1], shape, 1, refs, groups=groups)
    return _computed_weights(call, x, out, weight, bias)


def conv_transpose(call: Call) -> Any:
    """aten.conv_transpose1d/2d/3d(x, W, b, stride, padding, output_padding, groups)."""
    return _transposed_convolution(call, call.arg(6, "groups", 1))


def _transposed_convolution(call: Call, groups: int) -> Any:
    """A transposed convolution's weight is (in, out, taps...): its axis 0 reads the input's
    channels, its axis 1 and the bias write the output's (DPT's upsampling of its
    reassembled features). Grouped ones are unknown."""
    x, weight, shape = call.x, call.arg(1, "weight"), call.out_shape
    bias, bias_ok = _optional_param(call.arg(2, "bias", None))
    axes = _param_axes(weight)
    if groups != 1 or axes is None or axes[:2] != (0, 1) or not bias_ok or shape is None:
        return None
    if not isinstance(x, Feat) or x.param is not None:
        return None
    call.use(weight)
    refs = [AxisRef(weight.param, 1)]
    if bias is not None:
        call.use(bias)
        refs.append(AxisRef(bias.param, 0))
    if x.featured:
        _read_axis(call, x, weight.param, 0, 1)
    out = write(call, _space_name(weight.param), shape[1], shape, 1, tuple(refs))
    return _computed_weights(call, x, out, weight, bias)


def _read_groups(call: Call, x: Feat, weight: str, groups: int, name: str) -> None:
    """A grouped convolution reads input group j with the weight columns of its output
    group j, the columns (axis 1) being shared by all groups: one map for every group keeps
    it, so the groups of the input become one space (a fresh input space is split into one
    part per group, the parts united). Output groups are permuted within each group by the
    output space (``groups`` blocks); whole groups would move input and output together,
    which one space cannot describe."""
    width = x.shape[1] // groups
    pieces = [(j * width, (j + 1) * width) for j in range(groups)]
    found = split_features(call, x, pieces, set(), per_feature=True) if x.axis == 1 else None
    if found is not None and all(call.table.union_layouts(found[0], f, False) for f in found):
        call.table.add_per_feature(found[0], "readers", weight, 1)
        if call.input_node() is not None:
            call.event("reader_in", call.input_node())
        return
    reason = f"grouped convolution {name!r} (groups={groups}) reads its input by group"
    call.table.fix_value(x, reason)


def embedding(call: Call) -> Any:
    """aten.embedding(W, indices): W's columns write a new space on the last axis."""
    weight, indices, shape = call.arg(0, "weight"), call.arg(1, "indices"), call.out_shape
    if _param_axes(weight) != (0, 1) or shape is None:
        return None
    call.use(weight)
    call.table.fix_value(indices, f"used as indices by {call.desc}")
    ref = AxisRef(weight.param, 1)
    out = write(call, _space_name(weight.param), shape[-1], shape, len(shape) - 1, (ref,))
    return _computed_weights(call, None, out, weight, None)


def _elementwise(call: Call, x: Feat, params: list[Any], offset: int = 0) -> bool:
    """Per-feature parameters (1-d, whole, or None); False if one is anything else."""
    found = [p for p in params if p is not None]
    if not all(_param_axes(p) == (0,) for p in found):
        return False
    for p in found:
        call.use(p)
        call.table.add_per_feature(x, "elementwise", p.param, 0)
    return True


def layer_norm(call: Call) -> Any:
    """aten.layer_norm(x, shape, w, b) / rms_norm(x, shape, w): permutations only, the
    gain and shift move with them. The features must be the last, normalised axis."""
    x, normalized = call.x, call.arg(1, "normalized_shape")
    is_rms = call.node.target.__name__.startswith("rms_norm")
    params = [call.arg(2, "weight", None)] + ([] if is_rms else [call.arg(3, "bias", None)])
    if not isinstance(x, Feat) or call.out_shape != x.shape:
        return None
    if not x.featured:
        return call.plain()
    if x.param is not None or len(normalized) != 1 or x.axis != x.ndim - 1:
        reason = f"{call.desc} normalises axes that do not hold the features"
        call.table.fix_value(x, reason)
        return call.plain()
    if not _elementwise(call, x, params):
        return None
    call.table.downgrade_value(x, "permutation")
    return x


def group_norm(call: Call) -> Any:
    """aten.group_norm(x, groups, w, b): permutations keeping every channel in its group."""
    x, groups = call.x, call.arg(1, "num_groups")
    if not isinstance(x, Feat) or call.out_shape != x.shape or x.param is not None:
        return None
    if not x.featured:
        return call.plain()
    if x.axis != 1 or not _elementwise(call, x, [call.arg(2, "weight"), call.arg(3, "bias")]):
        return None
    return tie_channel_groups(call, x, groups, x.shape[1])


_BATCHNORM_STATS = (1, 2, 3, 4)  # weight, bias, running_mean, running_var


def batch_norm(call: Call) -> Any:
    """aten.batch_norm / _native_batch_norm_legit_no_training / instance_norm.

    Right after a writer's only use (and with the only use of its own parameters) it is
    folded into the writer and keeps the space linear; otherwise permutations only."""
    x = call.x
    if isinstance(x, Feat) and x.param is not None:
        return _standardized(call, x)
    if not isinstance(x, Feat):
        return None
    name = call.node.target.__name__
    tupled = name.startswith("_native_batch_norm")
    shape = call.meta[0].shape if tupled else call.out_shape
    if shape != x.shape:
        return None
    stats = [call.arg(i, "") for i in _BATCHNORM_STATS]
    if name.startswith("batch_norm") and call.arg(5, "training"):
        return None
    result = x if not tupled else Tup((x, *(call.plain().items[1:])))
    if not x.featured:
        return call.plain()
    if x.axis != 1 or not _elementwise(call, x, stats):
        return None
    writer = None if name.startswith("instance_norm") else _foldable_writer(call, stats)
    if writer is None:
        call.table.downgrade_value(x, "permutation")
        return result
    norm = _space_name(stats[0].param)
    call.table.record(x.segs[0].space).batchnorms.append(FoldedNorm(norm, writer))
    call.walk.events.pop(("writer_out", call.input_node()), None)
    call.event("writer_out")
    return result


def _standardized(call: Call, x: Feat) -> Feat | None:
    """Weight standardization (BiT): ``batch_norm(w.reshape(1, out, -1), training=True)``
    without statistics or affine parameters standardizes each output channel of ``w`` over
    all its other entries, which commutes with permutations of every axis of ``w``."""
    name = call.node.target.__name__
    stats = [call.arg(i, "", None) for i in _BATCHNORM_STATS]
    whole = call.walk.shapes.get(x.param)
    if not name.startswith("batch_norm") or any(s is not None for s in stats) or whole is None:
        return None
    if not call.arg(5, "training") or x.ndim < 2 or call.out_shape != x.shape:
        return None
    if in_order(x, whole) is None or x.dims[1] != 0:
        return None
    return replace(x, applied=True)


def _foldable_writer(call: Call, stats: list[Any]) -> str | None:
    """The writer module before a BatchNorm that can absorb it, or None."""
    source = call.node.args[0]
    if not isinstance(source, fx.Node) or len(source.users) != 1 or source.op != "call_function":
        return None
    if not source.target.__name__.startswith(("conv", "linear")):
        return None
    if source.target.__name__.startswith("conv_transpose") or (
        source.target.__name__.startswith("convolution") and source.args[6:7] == (True,)
    ):
        return None  # its output channels are the weight's axis 1, which folding does not scale
    if source.target.__name__.startswith("convolution") and source.args[8:9] not in ((), (1,)):
        return None
    if source.target.__name__.startswith("conv") and source.args[6:7] not in ((), (1,)):
        return None
    weight = source.args[1]
    params = [weight, *(call.node.args[i] for i in _BATCHNORM_STATS)]
    if not all(isinstance(p, fx.Node) and len(p.users) == 1 for p in params):
        return None  # folding edits these tensors: they must serve this call alone
    writer = call.walk.values.get(weight.name)
    if any(s is None for s in stats) or not isinstance(writer, Feat) or writer.param is None:
        return None
    writer_name, norm_name = _space_name(writer.param), _space_name(stats[0].param)
    expected = [f"{norm_name}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    if [s.param for s in stats] != expected or not writer.param.endswith(".weight"):
        return None  # apply.fold_batchnorms finds the tensors by module name
    return writer_name


def prelu(call: Call) -> Any:
    """aten.prelu(x, w): one slope is an activation; one per channel (axis 1) ties
    permutations."""
    x, weight = call.x, call.arg(1, "weight")
    if not isinstance(x, Feat) or call.out_shape != x.shape or _param_axes(weight) != (0,):
        return None
    if not x.featured:
        return call.plain()
    call.use(weight)
    if weight.shape[0] > 1:
        if x.axis != 1:
            return None
        call.table.add_per_feature(x, "elementwise", weight.param, 0)
        call.table.downgrade_value(x, "permutation")
    call.table.downgrade_value(x, "dense")
    mark_activation(call)
    return x
