"""What the torch.fx and the torch.export walks share: unknown calls, parameter taint, outputs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from torch import fx

from accord.trace.state import Call, Feat, Other, Tup, Walk


def call_args(call: Call) -> list[Any]:
    """Every argument of the call, resolved."""
    return [call.resolve(a) for a in (*call.node.args, *call.node.kwargs.values())]


def unknown(call: Call) -> Any:
    """Fix every space touching the call; nothing may move the parameters inside a module."""
    reason = f"consumed by {call.desc}, which accord cannot prove safe"
    node = call.node
    call.table.fix_value(call_args(call), reason)
    if node.op == "call_module":
        prefix = f"{node.target}."
        for key in call.walk.keys:
            if key.startswith(prefix):
                call.walk.taint(key, f"{key} is used inside {call.desc}")
    return call.plain()


def taint_unused(call: Call, result: Any) -> None:
    """A parameter that reaches a call which neither claims nor passes it on is opaque."""
    passed = {feat.param for feat in feats(result)}
    for feat in feats(call_args(call)):
        param = feat.param
        if param is not None and param not in call.used and param not in passed:
            call.walk.taint(param, f"{param} is also used by {call.desc}")


def output(walk: Walk, node: fx.Node) -> Any:
    """The model's outputs: their spaces are fixed, parameters returned as they are opaque."""
    value = Call(walk, node, None, "output").resolve(node.args[0])
    for space in walk.table.spaces(value):
        walk.table.fix(space, "output")
        walk.table.record(space).is_output = True
    for feat in feats(value):
        if feat.param is not None:
            walk.taint(feat.param, f"{feat.param} is returned by the model")
    return Other()


def feats(value: Any) -> Iterator[Feat]:
    if isinstance(value, Feat):
        yield value
    elif isinstance(value, Tup):
        yield from feats(value.items)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for item in value:
            yield from feats(item)
    elif isinstance(value, dict):
        yield from feats(list(value.values()))


def admits(rule: Any, head_rules: frozenset[Any], call: Call) -> bool:
    """Whether ``rule`` understands the call's arguments: heads need a head rule, repeated
    heads the reshape that joins them (the one head rule named ``reshape``), the pieces of a
    fused projection a rule that moves its axes or takes the pieces apart; a rule reading
    only the input's shape (``new_empty``) any input."""
    found = list(feats(call_args(call)))
    name = getattr(rule, "__name__", "")
    if name in _SHAPE_RULES:
        return True
    if any(feat.heads is not None for feat in found) and rule not in head_rules:
        return False
    if any(feat.pieces is not None for feat in found) and name not in _PIECE_RULES:
        return False
    repeated = any(feat.repeat is not None for feat in found)
    return not repeated or name == "reshape"


# the rules that read only their input's shape (accord.trace.rules)
_SHAPE_RULES = frozenset({"constant", "metadata"})
# the rules that keep or take apart the pieces of a fused projection (Feat.pieces)
_PIECE_RULES = frozenset({"transpose", "permute", "movedim", "select", "split", "passthrough"})
