"""Tracing rules for layers with parameters: writers, readers, norms and attention.

A Linear / Conv creates a new space for its output (weight rows and bias are its writers)
and reads its input's spaces with its weight columns. A norm keeps its input's spaces and
adds its per-feature parameters as elementwise axes. Attention creates a query/key space and
a value space, both split into heads.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from accord.spec import AxisRef, FoldedNorm
from accord.trace.rules import mark_activation
from accord.trace.state import Call, Feat, Seg, Tup, layouts_match, plain, seg_offsets

WRITER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def read(call: Call, x: Any, tensor: str, axis: int, node_index: int = 0) -> None:
    """Axis 1 of ``tensor`` reads ``x``'s features, which must lie on ``axis`` of ``x``."""
    if not isinstance(x, Feat) or not x.featured:
        return
    if x.axis != axis:
        reason = f"{call.desc} reads axis {axis}, but the features lie on axis {x.axis}"
        call.table.fix_value(x, reason)
        return
    call.table.add_per_feature(x, "readers", tensor, 1)
    node = call.input_node(node_index)
    if node is not None:
        call.event("reader_in", node)


def write(
    call: Call,
    name: str,
    size: int,
    shape: tuple[int, ...],
    axis: int,
    refs: tuple[AxisRef | None, ...],
    groups: int = 1,
) -> Feat:
    """A new space ``name`` written by ``refs`` (None entries: absent biases); ``groups`` > 1:
    a grouped convolution, whose output groups never move as wholes (its input would have to
    move with them)."""
    space = call.table.new(size, name, groups=groups)
    call.table.record(space).kept_groups = groups > 1
    for ref in refs:
        if ref is not None:
            call.table.add_ref(space, "writers", ref)
    call.event("writer_out")
    return Feat(tuple(shape), axis, (Seg(space, size),))


def _param(call: Call, name: str) -> str | None:
    return name if name in call.walk.keys else None


def _rows(call: Call, name: str, offset: int = 0) -> AxisRef | None:
    key = _param(call, name)
    return AxisRef(key, 0, 1, offset) if key else None


def linear(call: Call) -> Any:
    """nn.Linear: reads the last axis, writes a new space on the last axis."""
    x, module, name, shape = call.x, call.module, call.node.target, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    read(call, x, f"{name}.weight", x.ndim - 1)
    refs = (_rows(call, f"{name}.weight"), _rows(call, f"{name}.bias"))
    return write(call, name, module.out_features, shape, len(shape) - 1, refs)


def conv(call: Call) -> Any:
    """Conv1d/2d/3d. A depthwise conv (groups = in_channels, ``k`` outputs per input) keeps
    its input's spaces, each feature owning ``k`` output channels, and allows permutations
    only; other grouped convs fix their input and give their output ``groups`` blocks."""
    x, module, name, shape = call.x, call.module, call.node.target, call.out_shape
    if not isinstance(x, Feat) or shape is None:
        return None
    weight, bias = f"{name}.weight", _param(call, f"{name}.bias")
    refs = (AxisRef(weight, 0), AxisRef(bias, 0) if bias else None)
    if module.groups == 1:
        read(call, x, weight, 1)
        return write(call, name, module.out_channels, shape, 1, refs)
    if module.groups == module.in_channels and x.featured and x.axis == 1:
        k = module.out_channels // module.in_channels
        for ref in refs:
            if ref is not None:
                call.table.add_per_feature(x, "elementwise", ref.tensor, 0, scale=k)
        call.table.downgrade_value(x, "permutation")
        return Feat(shape, 1, tuple(Seg(s.space, s.size, s.block * k) for s in x.segs))
    reason = f"grouped convolution {name!r} (groups={module.groups}) reads its input by group"
    call.table.fix_value(x, reason)
    return write(call, name, module.out_channels, shape, 1, refs, groups=module.groups)


def functional_writer(call: Call) -> Any:
    """F.linear / F.conv*d with a parameter as weight, as if it were the module."""
    x, weight, bias = call.x, call.arg(1, "weight"), call.arg(2, "bias", None)
    shape = call.out_shape
    conv_like = call.node.target is not nn.functional.linear
    if not _whole(weight) or (bias is not None and not _whole(bias)) or shape is None:
        return None
    if not isinstance(x, Feat) or (conv_like and call.arg(6, "groups", 1) != 1):
        return None
    call.use(weight)
    if bias is not None:
        call.use(bias)
    read(call, x, weight.param, 1 if conv_like else x.ndim - 1)
    refs = (AxisRef(weight.param, 0), AxisRef(bias.param, 0) if bias is not None else None)
    name = weight.param.removesuffix(".weight")
    return write(call, name, weight.shape[0], shape, 1 if conv_like else len(shape) - 1, refs)


def _whole(value: Any) -> bool:
    return (
        isinstance(value, Feat)
        and value.param is not None
        and value.dims == tuple(range(value.ndim))
    )


def embedding(call: Call) -> Any:
    """nn.Embedding: its weight columns write a new space on the last axis."""
    x, name, shape = call.x, call.node.target, call.out_shape
    if shape is None or call.module.max_norm is not None:
        # max_norm rescales rows by their norm, which only some maps keep.
        return None
    call.table.fix_value(x, f"used as indices by {call.desc}")
    ref = AxisRef(f"{name}.weight", 1)
    return write(call, name, call.module.embedding_dim, shape, len(shape) - 1, (ref,))


def _per_feature_norm(call: Call, axis: int, names: tuple[str, ...]) -> Feat | None:
    """Shared checks of norms: the features must lie on ``axis``; adds their parameters."""
    x = call.x
    if not isinstance(x, Feat) or call.out_shape != x.shape or not x.featured:
        return None
    if x.axis != axis:
        return None
    for name in names:
        key = _param(call, f"{call.node.target}.{name}")
        if key:
            call.table.add_per_feature(x, "elementwise", key, 0)
    return x


def batchnorm(call: Call) -> Any:
    """BatchNorm right after a writer's only use is foldable; any other one allows only
    permutations. ``num_batches_tracked`` is a scalar and never listed."""
    x = call.x
    if isinstance(x, Feat) and not x.featured:
        return call.plain()
    stats = ("weight", "bias", "running_mean", "running_var")
    if _per_feature_norm(call, 1, stats) is None:
        return None
    writer = _foldable_writer(call)
    if writer is None:
        call.table.downgrade_value(x, "permutation")
        return x
    call.table.record(x.segs[0].space).batchnorms.append(FoldedNorm(call.node.target, writer))
    call.walk.events.pop(("writer_out", call.input_node()), None)
    call.event("writer_out")
    return x


def _foldable_writer(call: Call) -> str | None:
    source, module, counts = call.node.args[0], call.module, call.walk.call_counts
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        return None
    writer = call.walk.modules[source.target]
    if type(writer) not in WRITER_TYPES or getattr(writer, "groups", 1) != 1:
        return None
    # Folding edits the writer's weights: both modules must serve this call alone.
    if counts[source.target] != 1 or counts[call.node.target] != 1:
        return None
    if module.running_var is None or module.bias is None:
        return None
    return source.target


def instancenorm(call: Call) -> Any:
    """InstanceNorm: per-channel statistics, so permutations only."""
    x = call.x
    if isinstance(x, Feat) and not x.featured:
        return call.plain()
    names = ("weight", "bias", "running_mean", "running_var")
    if _per_feature_norm(call, 1, names) is None:
        return None
    call.table.downgrade_value(x, "permutation")
    return x


def layernorm(call: Call) -> Any:
    """LayerNorm over axes that include the features: permutations only."""
    x = call.x
    if not isinstance(x, Feat) or call.out_shape != x.shape:
        return None
    if not x.featured:
        return call.plain()
    first = x.ndim - len(call.module.normalized_shape)
    if x.axis < first:
        reason = f"{call.desc} normalises axes that do not hold the features"
        call.table.fix_value(x, reason)
        return x
    for name in ("weight", "bias"):
        key = _param(call, f"{call.node.target}.{name}")
        if key:
            call.table.add_per_feature(x, "elementwise", key, x.axis - first)
    call.table.downgrade_value(x, "permutation")
    return x


def groupnorm(call: Call) -> Any:
    """GroupNorm: permutations that keep every channel in its group (one block per group)."""
    x = call.x
    if isinstance(x, Feat) and not x.featured:
        return call.plain()
    if _per_feature_norm(call, 1, ("weight", "bias")) is None:
        return None
    return tie_channel_groups(call, x, call.module.num_groups, call.module.num_channels)


def tie_channel_groups(call: Call, x: Feat, groups: int, channels: int) -> Feat:
    """Permutations only, each channel kept in its group of ``channels // groups``: a segment
    whose features do not split into whole groups is fixed."""
    call.table.downgrade_value(x, "permutation")
    width = channels // groups
    if 1 < groups < channels:
        for seg, offset in seg_offsets(x):
            entries = seg.size * seg.block
            if seg.space is None:
                continue
            if offset % width or entries % width or width % seg.block:
                call.table.fix(seg.space, f"{call.desc} groups do not align with its features")
            else:
                call.table.constrain_groups(seg.space, entries // width)
    return x


def prelu(call: Call) -> Any:
    """PReLU: one slope is an activation; one slope per channel (axis 1) ties permutations."""
    x = call.x
    if not isinstance(x, Feat) or call.out_shape != x.shape:
        return None
    if not x.featured:
        return call.plain()
    if call.module.num_parameters > 1:
        if x.axis != 1:
            return None
        call.table.add_per_feature(x, "elementwise", f"{call.node.target}.weight", 0)
        call.table.downgrade_value(x, "permutation")
    call.table.downgrade_value(x, "dense")
    mark_activation(call)
    return x


def _add(call: Call, space: int, role: str, *refs: AxisRef | None) -> None:
    for ref in refs:
        if ref is not None:
            call.table.add_ref(space, role, ref)


def multihead_attention(call: Call) -> Any:
    """nn.MultiheadAttention: q rows write the "qk" space whose readers are the k rows (a map
    shared by q and k keeps q·k), v rows write the "v" space read by out_proj's columns."""
    module, name, meta = call.module, call.node.target, call.meta
    inputs = [call.arg(i, key) for i, key in enumerate(("query", "key", "value"))]
    if not all(isinstance(v, Feat) for v in inputs) or not isinstance(meta, tuple):
        return None
    masks = [call.resolve(a) for a in (*call.node.args[3:], *call.node.kwargs.values())]
    if any(isinstance(m, Feat) and m.featured for m in masks):
        return None
    size, heads = module.embed_dim, module.num_heads
    rows = _mha_rows(call, size)
    _mha_read(call, inputs)
    qk = call.table.new(size, f"{name}.qk", maps="orthogonal", groups=heads)
    _add(call, qk, "writers", *rows["q"])
    _add(call, qk, "readers", *rows["k"], _extra_bias(call, "bias_k"))
    v = call.table.new(size, f"{name}.v", groups=heads)
    _add(call, v, "writers", *rows["v"], _extra_bias(call, "bias_v"))
    _add(call, v, "readers", AxisRef(f"{name}.out_proj.weight", 1))
    out_refs = (_rows(call, f"{name}.out_proj.weight"), _rows(call, f"{name}.out_proj.bias"))
    out = write(call, f"{name}.out_proj", size, meta[0].shape, len(meta[0].shape) - 1, out_refs)
    return Tup((out, plain(meta[1])))


def _mha_rows(call: Call, size: int) -> dict[str, tuple[AxisRef | None, ...]]:
    """The q, k and v rows of the projection weights and of ``in_proj_bias``."""
    name, packed = call.node.target, call.module._qkv_same_embed_dim
    rows = {}
    for i, part in enumerate("qkv"):
        if packed:
            weight = _rows(call, f"{name}.in_proj_weight", i * size)
        else:
            weight = _rows(call, f"{name}.{part}_proj_weight")
        rows[part] = (weight, _rows(call, f"{name}.in_proj_bias", i * size))
    return rows


def _extra_bias(call: Call, which: str) -> AxisRef | None:
    """``bias_k`` / ``bias_v`` (1, 1, E): an extra key or value token, features on axis 2."""
    key = _param(call, f"{call.node.target}.{which}")
    return AxisRef(key, 2) if key else None


def _mha_read(call: Call, inputs: list[Feat]) -> None:
    """Packed weights read query, key and value with the same columns: one space for all."""
    name = call.node.target
    if not call.module._qkv_same_embed_dim:
        for i, part in enumerate("qkv"):
            read(call, inputs[i], f"{name}.{part}_proj_weight", inputs[i].ndim - 1, i)
        return
    featured = [x for x in inputs if x.featured]
    if not featured:
        return
    first = featured[0]
    # a parameter as an input (a learned query) writes the features the others carry
    learned = [x for x in inputs if not x.featured and x.param is not None]
    last = [x.dims[-1] for x in learned if x.dims and not x.applied]
    if (
        len(featured) + len(last) < 3
        or any(d is None or d < 0 for d in last)
        or any(x.shape[-1] != first.shape[first.axis] for x in learned)
        or not all(x.axis == x.ndim - 1 and layouts_match(first, x) for x in featured)
    ):
        call.table.fix_value(inputs, f"{call.desc} reads query, key and value with one matrix")
        return
    for x in featured[1:]:
        call.table.union_layouts(first, x, residual=False)
    for x in learned:
        call.use(x)
        call.table.add_per_feature(first, "writers", x.param, x.dims[-1])
    read(call, first, f"{name}.in_proj_weight", first.ndim - 1)
