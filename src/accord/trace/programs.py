"""Exported programs: torch.export run on a model, and each architecture exported once per merge.

``torch.export.export`` is the costliest fixed step of a merge (``accord bench speed``
times the stages), and the tracer, the BatchNorm lookup and the statistics pass of every
model read the same graph. Inside :func:`shared_exports` (a merge opens it; so does each
statistics pass), :func:`program_for` returns the program already exported for a model of the
same architecture on inputs of the same signature, and :func:`bound_module` runs it with a
model's own parameters and buffers. Outside, every call exports anew.

Same architecture: the same class, the same module tree with the same settings (types and
``extra_repr``: sizes, strides, eps, inplace flags), the same parameter and buffer names,
shapes, dtypes and devices, and the same tied tensors. The values never count, so N models
of one architecture share one export. Same signature: the same input structure, dtypes,
devices and shapes, the batch size excepted where the program's batch axis is dynamic. A
forward that branches on a plain attribute none of these show would share a program it
should not, which is why the sharing ends with the block: a merge's models are one
architecture already (:func:`accord.merge.check_models`). The programs are held (with
the tensors of the model each was exported from) only while the block runs.
"""

from __future__ import annotations

import re
import sys
import sysconfig
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram
from torch.utils._pytree import tree_flatten

from accord.errors import TraceError
from accord.trace.names import name_nodes

# The programs of the innermost open shared_exports block, by (architecture, inputs); None
# outside every block.
_SHARED: ContextVar[dict[tuple[Any, ...], ExportedProgram] | None] = ContextVar(
    "accord_shared_exports", default=None
)


@contextmanager
def shared_exports() -> Iterator[None]:
    """Inside the block, :func:`program_for` exports each architecture and input signature
    once; a block inside another shares the outer one's programs. Also a decorator."""
    if _SHARED.get() is not None:
        yield
        return
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def program_for(model: nn.Module, example_input: Any) -> ExportedProgram:
    """``model`` exported on ``example_input`` (:func:`export_program`), its nodes named by
    :func:`accord.trace.names.name_nodes`; inside :func:`shared_exports`, the program of an
    earlier model of the same architecture on inputs of the same signature when there is one.
    Its parameters may be another model's: run it through :func:`bound_module`."""
    shared = _SHARED.get()
    if shared is None:
        return _named(model, example_input)
    architecture = _architecture(model)
    any_batch, exact = _signatures(example_input)
    for key in ((architecture, any_batch), (architecture, exact)):
        if key in shared:
            return shared[key]
    program = _named(model, example_input)
    shared[(architecture, any_batch if _batch_free(program) else exact)] = program
    return program


def bound_module(program: ExportedProgram, model: nn.Module) -> fx.GraphModule:
    """The unlifted module of ``program`` (a GraphModule, nodes named as in the spec) running
    ``model``'s own parameters and buffers (the very tensors, not copies), so N models of one
    architecture run one exported graph, each with its weights and BatchNorm statistics.
    Tensor constants that are neither (plain tensor attributes) stay the exported model's."""
    module = program.module()
    name_nodes(module.graph, model)
    for slots, leaf, tensor in bindings(module, model):
        slots[leaf] = tensor
    return module


Binding = tuple[dict[str, Any], str, torch.Tensor]


def bindings(module: fx.GraphModule, model: nn.Module, derived: str | None = None) -> list[Binding]:
    """``(slots, name, tensor)``: setting ``slots[name] = tensor`` for each points the
    parameters and buffers of ``module`` (one of :func:`bound_module`'s, edited or not) at
    ``model``'s own, a model of the architecture it was exported from; so one graph runs each
    of N models in turn. The tensors of the submodule ``derived`` are no model's (computed
    from them: :func:`accord.trace.lean.lean_bindings` binds those)."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    held = [
        *module.named_parameters(remove_duplicate=False),
        *module.named_buffers(remove_duplicate=False),
    ]
    found = []
    for name, _ in held:
        if derived is not None and name.startswith(f"{derived}."):
            continue
        path, _, leaf = name.rpartition(".")
        owner = module.get_submodule(path)
        slots = owner._parameters if leaf in owner._parameters else owner._buffers
        found.append((slots, leaf, own[name]))
    return found


def _named(model: nn.Module, example_input: Any) -> ExportedProgram:
    program = export_program(model, example_input)
    name_nodes(program.graph, model)
    return program


def _architecture(model: nn.Module) -> tuple[Any, ...]:
    """What the exported graph of ``model`` depends on besides its inputs (module docstring)."""
    modules = tuple(
        (name, type(module), module.extra_repr())
        for name, module in model.named_modules(remove_duplicate=False)
    )
    tensors = [
        *(("parameter", *item) for item in model.named_parameters(remove_duplicate=False)),
        *(("buffer", *item) for item in model.named_buffers(remove_duplicate=False)),
    ]
    held: dict[int, list[str]] = {}
    for _, name, tensor in tensors:
        held.setdefault(id(tensor), []).append(name)
    ties = tuple(tuple(names) for names in held.values() if len(names) > 1)
    layout = tuple((kind, name, tuple(t.shape), t.dtype, t.device) for kind, name, t in tensors)
    return type(model), modules, layout, ties


def _signatures(example_input: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The input signature with any batch size ≥ 2 left open, and the exact one."""
    leaves, structure = tree_flatten(_arguments(example_input))
    any_batch, exact = [str(structure)], [str(structure)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            shape = tuple(leaf.shape)
            batch = len(shape) >= 1 and shape[0] >= 2  # the axis _dynamic asks to be dynamic
            any_batch.append((("batch", *shape[1:]) if batch else shape, leaf.dtype, leaf.device))
            exact.append((shape, leaf.dtype, leaf.device))
        else:  # exported as a constant
            any_batch.append((type(leaf), repr(leaf)))
            exact.append((type(leaf), repr(leaf)))
    return tuple(any_batch), tuple(exact)


def _batch_free(program: ExportedProgram) -> bool:
    """Whether every input tensor of ``program`` that :func:`_dynamic` asked for a dynamic
    batch axis (a first size ≥ 2) got one for any size from 2 up, so that the program runs on
    any batch size (a forward that branches on the batch size gets a fixed one), and no guard
    (``x.size()[0] != 4`` from a branch not taken) restricts the sizes it accepts."""
    if getattr(program, "_guards_code", None):  # torch 2.13 lists them there
        return False
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        value = node.meta.get("val")
        if node.op != "placeholder" or node.name not in inputs:
            continue
        if isinstance(value, torch.Tensor) and value.ndim >= 1:
            first = value.shape[0]
            symbolic = isinstance(first, torch.SymInt)
            bounds = program.range_constraints.get(first.node.expr) if symbolic else None
            if bounds is None:  # a fixed size (a guard may have fixed a symbolic one)
                size = first.node.hint if symbolic else first
                if size is None or size >= 2:
                    return False
            elif not (bounds.lower <= 2 and bounds.upper >= sys.maxsize):
                return False
    return True


class ExportError(TraceError):
    """torch.export could not export the model (the tracer then tries torch.fx)."""


def export_program(model: nn.Module, example_input: Any) -> ExportedProgram:
    """``model`` exported on ``example_input`` in eval mode (training flags restored), with a
    dynamic batch axis where the model allows it. Raises TraceError with the exporter's reason."""
    args, kwargs = _arguments(example_input)
    training = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        try:
            return torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic(args, kwargs))
        except Exception:  # a batch axis the model fixes: export it as it is
            return torch.export.export(model, args, kwargs)
    except Exception as exc:  # any failure of the user's model under the exporter
        reason = _reason(exc)
        raise ExportError(
            f"torch.export could not export {type(model).__name__} on example_input: "
            f"{type(exc).__name__}: {reason}. Pass an input the model accepts; make the code "
            "it names exportable (torch.export's guide lists the rewrites: torch.cond for "
            "data-dependent branches, no Python side effects); keep the submodule it names "
            "opaque (leaf_modules=['name', ...]: torch.fx then traces around it and fixes "
            "its spaces); or write a spec file (accord.Spec.load) instead of tracing"
        ) from exc
    finally:
        for module, flag in training:
            module.training = flag


# where a frame's code is not the model's: torch, accord and Python's standard library (the
# packages installed beside it, transformers among them, are models' code)
_NOT_THE_MODEL = (str(Path(torch.__file__).parent), str(Path(__file__).resolve().parents[1]))
_STANDARD = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")})
_INSTALLED = tuple({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})


def _models_code(filename: str) -> bool:
    """Whether a traceback frame's file is the model's code (see ``_NOT_THE_MODEL``)."""
    if filename.startswith(_NOT_THE_MODEL):
        return False
    return filename.startswith(_INSTALLED) or not filename.startswith(_STANDARD)


def _reason(exc: Exception) -> str:
    """The exporter's first line, and the user's line of code it names; where its message
    names none (an error of the model's own Python under the exporter: a branch on an input
    left as None), the innermost line of the traceback in the model's code, if any."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else ""
    found = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)', text)
    if not found:
        found = [
            (frame.filename, frame.lineno, frame.name, frame.line or "")
            for frame in traceback.extract_tb(exc.__traceback__)
            if _models_code(frame.filename)
        ][-1:]
    if found:
        path, line, function, code = found[-1]
        reason += f" (raised by {code.strip()!r} in {function}, {path}:{line})"
    return reason


def _arguments(example_input: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, tuple):
        return example_input, {}
    return (example_input,), {}


def _dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    def batch(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] >= 2:
            return {0: Dim.AUTO}
        return None

    if kwargs:
        return {key: batch(value) for key, value in kwargs.items()}
    return tuple(batch(value) for value in args)
