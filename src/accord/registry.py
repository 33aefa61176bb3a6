"""The method records: one per alignment and one per combiner, and their lookup.

A method's facts are written once, in its record, next to its function (one decorator in the
method's own file): its name, paper, display label, options (type, default, valid range,
tuning grid) and what it needs (activation statistics, labels, a base, how many models).
Everything else reads the records: :func:`accord.merge` and its option checks, the command
line's choices and ``--option`` parsing, the tuning grids of ``options="auto"``, the comparison
of ``accord merge --method all``, the benchmarks' labels, the README's method table and the
test suites' method lists.

Alignments (:data:`ALIGNMENTS`, ``accord/match/``) find one transform per model and feature
space; combiners (:data:`COMBINERS`, ``accord/combine/``) turn aligned states into one, for
vision models and LLM checkpoints alike. A record's function takes its options as
keyword-only arguments without defaults, exactly the record's option names (checked when it
registers), so the record is the one place a default is written.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from accord.errors import MergeError, did_you_mean

_NULL = ("none", "null", "~")
_BOOLEANS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


@dataclass(frozen=True)
class Limits:
    """The valid range of a numeric option: finite, and between ``low`` and ``high`` (each
    excluded when ``*_open``; None: unbounded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        """Whether ``value`` lies in the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, name: str) -> str:
        """The range as text, e.g. ``0 < density <= 1``."""
        if self.low is None and self.high is None:
            return "a finite number"
        text = name
        if self.low is not None:
            text = f"{self.low:g} {'<' if self.low_open else '<='} {text}"
        if self.high is not None:
            text = f"{text} {'<' if self.high_open else '<='} {self.high:g}"
        return text


FINITE = Limits()
FRACTION = Limits(0, 1, low_open=True)  # 0 < x <= 1
PROBABILITY = Limits(0, 1, high_open=True)  # 0 <= x < 1
POSITIVE = Limits(0, None, low_open=True)


@dataclass(frozen=True)
class Option:
    """One option of a method: its type (``float``, ``int``, ``bool`` or ``str``), default,
    valid range (``limits``, numbers) or ``choices`` (text), the values ``options="auto"``
    tries (``grid``), whether None is allowed (``nullable``), whether each model may have
    its own value (``per_model``: the function gets one value per model) and why the range is
    what it is (``why``, said with a value outside it)."""

    name: str
    type: type
    default: Any
    help: str
    limits: Limits | None = None
    choices: tuple[str, ...] = ()
    grid: tuple[Any, ...] = ()
    nullable: bool = False
    per_model: bool = False
    why: str = ""

    def parse(self, text: str) -> Any:
        """``text`` (a command-line value) as this option's type; ValueError saying what the
        option takes."""
        lowered = text.strip().lower()
        if self.nullable and lowered in _NULL:
            return None
        try:
            if self.type is bool:
                return _BOOLEANS[lowered]
            if self.type is int:
                return int(text)
            if self.type is float:
                return float(text)
        except (KeyError, ValueError):
            raise ValueError(
                f"{self.name} takes {self.kind()} (default {self.default!r})"
            ) from None
        return text

    def kind(self) -> str:
        """What the option takes, in words."""
        words = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
        text = words[self.type]
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        return f"null or {text}" if self.nullable else text

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not valid for this option, or None (one value, not per model)."""
        if value is None:
            return None if self.nullable else f"expected {self.kind()}"
        if self.type is bool:
            return None if isinstance(value, bool) else "expected true or false"
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                hint = did_you_mean(str(value), self.choices) if self.choices else ""
                return f"expected one of {', '.join(self.choices)}{hint}"
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected {self.kind()}"
        if self.type is int and not isinstance(value, int):
            return "expected an integer"
        if self.limits is not None and not self.limits.holds(float(value)):
            because = f" ({self.why})" if self.why else ""
            return f"expected {self.limits.describe(self.name)}{because}"
        return None


@dataclass(frozen=True)
class Needs:
    """What a method needs: activation statistics or calibration batches (``data``), labels
    with them (``labels``), a base model whose task vectors it merges (``base``: ``"yes"``,
    ``"no"`` or ``"optional"``), how many models (``min_models``..``max_models``), and, for
    alignments merging N > 2 models, the cross-statistics of every pair, not only those with
    the reference (``all_pairs``)."""

    data: bool = False
    labels: bool = False
    base: Literal["yes", "no", "optional"] = "no"
    min_models: int = 1
    max_models: int | None = None
    all_pairs: bool = False

    def model_count_problem(self, name: str, count: int) -> str | None:
        """Why ``count`` models are too few or too many for method ``name``, or None."""
        which = "fine-tuned models besides the base" if self.base == "yes" else "models"
        if self.max_models is not None and self.min_models == self.max_models:
            if count != self.max_models:
                return f"{name} merges exactly {self.max_models} models, got {count}"
        elif count < self.min_models:
            return f"{name} needs at least {self.min_models} {which}, got {count}"
        elif self.max_models is not None and count > self.max_models:
            return f"{name} merges at most {self.max_models} {which}, got {count}"
        return None

    def task_vectors(self, has_base: bool) -> bool:
        """Whether the method merges task vectors against a base: it needs one, or takes one
        and is given one."""
        return self.base == "yes" or (self.base == "optional" and has_base)

    def base_problem(self, name: str, has_base: bool) -> str | None:
        """Why method ``name`` (as the message calls it) cannot merge with, or without, a
        base, or None."""
        if self.base == "yes" and not has_base:
            return f"{name} merges task vectors: give the base they start from"
        if self.base == "no" and has_base:
            return f"{name} has no task vectors; remove the base"
        return None


@dataclass(frozen=True)
class Method:
    """A registered method: its record (see the module docs) and its function.

    ``compare``: its place in the comparison of ``accord merge --method all`` (None: not
    compared there).
    """

    name: str
    function: Callable[..., Any]
    paper: str
    label: str
    options: tuple[Option, ...] = ()
    needs: Needs = field(default_factory=Needs)
    compare: int | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Each option's default."""
        return {option.name: option.default for option in self.options}

    def option(self, name: str) -> Option:
        """The option ``name``; MergeError naming the accepted ones (with a suggestion)."""
        check_option_names(self, [name])
        return next(option for option in self.options if option.name == name)

    def grid(self) -> dict[str, tuple[Any, ...]]:
        """The values ``options="auto"`` tries, per option that has some."""
        return {option.name: option.grid for option in self.options if option.grid}


@dataclass(frozen=True)
class AlignMethod(Method):
    """An alignment: ``function(spec, statistics, states, reference, **options)`` returns one
    transform per model and free space (:class:`accord.match.Alignment`).

    ``permutations``: every map it returns is a permutation, so BatchNorms move with their
    channels exactly and the merge needs no BatchNorm-output statistics. ``aligns``: it finds
    the maps between models (a permuted copy of a model is brought back onto it); False for
    direct averaging.
    """

    permutations: bool = False
    aligns: bool = True


@dataclass(frozen=True)
class CombineMethod(Method):
    """A combiner. ``tensorwise``: ``function(tensors, **options)`` merges one tensor of
    every model (their task vectors when a base is given; a list, or an iterator read once),
    per-model options as one value per model, and ``generator=`` a seeded torch.Generator
    when ``random``. Otherwise ``function(states, context, **options)`` merges whole state
    dicts and returns a :class:`Combined`. ``default_align``: the alignment
    ``method=<combiner>`` uses. ``repair_after``: ``repair="auto"`` repairs activation
    statistics after it on models without BatchNorm (False when the combiner fits the data
    itself). ``check``: given one tensor's resolved options, the first model whose values are
    valid one by one but not together, and why (None when all are). ``rowwise``: given one
    tensor's resolved options, how the combiner merges the tensor a block of rows at a time
    with the same result (an :class:`accord.combine._rows.RowForm`), or None where those
    options need the whole tensor at once.
    """

    tensorwise: bool = True
    random: bool = False
    default_align: str = "cca"
    repair_after: bool = True
    check: Callable[[dict[str, Any]], tuple[int, str] | None] | None = None
    rowwise: Callable[[dict[str, Any]], Any] | None = None


@dataclass
class CombineContext:
    """What a whole-state combiner may use besides the states: the models (``models[0]`` is
    the template), the reference index, the calibration batches, where to compute, and the
    validation batches of the merge (None when it has none)."""

    models: list[Any]
    reference: int
    data: Any
    device: str
    progress: bool
    validation: Any = None


@dataclass
class Combined:
    """A whole-state combiner's result: the merged state, what the report records about it,
    and per-parameter weights of each model, ``(N, *shape)``, when it learned some."""

    state: dict[str, Any]
    report: dict[str, Any] | None = None
    coefficients: dict[str, Any] | None = None


# What a merge runs when it is not told: CCA Merge, averaged.
DEFAULT_ALIGN = "cca"
DEFAULT_COMBINE = "average"

ALIGNMENTS: dict[str, AlignMethod] = {}
COMBINERS: dict[str, CombineMethod] = {}

Kind = Literal["align", "combine"]
_TABLES: dict[str, dict[str, Any]] = {"align": ALIGNMENTS, "combine": COMBINERS}


def lookup(kind: Kind, name: str) -> Any:
    """The record of alignment (``kind="align"``) or combiner (``"combine"``) ``name``;
    MergeError listing the registered ones (with a suggestion)."""
    table = _TABLES[kind]
    if isinstance(name, str) and name in table:
        return table[name]
    what = "alignment" if kind == "align" else "combiner"
    raise MergeError(
        f"unknown {what} {name!r}{did_you_mean(str(name), table)}; {what}s: "
        f"{', '.join(sorted(table))}"
    )


@dataclass(frozen=True)
class MethodPlan:
    """The alignment and the combiner of a merge, and the name its report and tables use."""

    align: AlignMethod
    combine: CombineMethod
    name: str


def plan_methods(
    method: str | None = None, align: str | None = None, combine: str | None = None
) -> MethodPlan:
    """The alignment and combiner a merge runs. ``method`` is a shorthand: an alignment's name
    (combined by averaging unless ``combine`` says otherwise), or a combiner's (aligned by its
    record's ``default_align`` unless ``align`` says otherwise). Without any: CCA, averaged."""
    if method is not None:
        if method in ALIGNMENTS and align in (None, method):
            align = method
        elif method in COMBINERS and combine in (None, method):
            combine = method
        elif method in ALIGNMENTS or method in COMBINERS:
            kind = "align" if method in ALIGNMENTS else "combine"
            raise MergeError(
                f"method={method!r} is the shorthand for {kind}={method!r}, but {kind}= "
                "names another method; give one of them"
            )
        else:
            names = [*ALIGNMENTS, *COMBINERS]
            raise MergeError(
                f"unknown method {method!r}{did_you_mean(str(method), names)}; alignments: "
                f"{', '.join(sorted(ALIGNMENTS))}; combiners: {', '.join(sorted(COMBINERS))}"
            )
    combiner = lookup("combine", combine or DEFAULT_COMBINE)
    aligner = lookup("align", align or (combiner.default_align if combine else DEFAULT_ALIGN))
    if method is not None:
        name = method
    else:
        name = "+".join(n for n in (align, combine) if n is not None) or aligner.name
    return MethodPlan(aligner, combiner, name)


def task_vector_combiners(count: int | None = None) -> tuple[str, ...]:
    """The combiners that merge task vectors against a base (their record needs one), sorted;
    with ``count``, those that take that many models."""
    return tuple(
        sorted(
            name
            for name, record in COMBINERS.items()
            if record.needs.base == "yes"
            and (count is None or record.needs.model_count_problem(name, count) is None)
        )
    )


def check_option_names(record: Method, names: Iterable[str]) -> None:
    """MergeError naming each of ``names`` that is not an option of ``record`` (with the
    closest one) and listing the accepted ones."""
    accepted = record.defaults
    unknown = [name for name in names if name not in accepted]
    if unknown:
        listed = ", ".join(sorted(accepted)) or "none"
        hints = [f"{name!r}{did_you_mean(name, accepted)}" for name in unknown]
        raise MergeError(
            f"method {record.name!r} has no option {', '.join(hints)}; accepted options: {listed}"
        )


def resolve_options(record: Method, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option of ``record``: ``given`` over the defaults, each checked (MergeError
    naming the option, its value and its range). Per-model options take one value for all or
    a list of one per model."""
    check_option_names(record, given)
    for name, value in given.items():
        option = record.option(name)
        values = value if option.per_model and isinstance(value, list | tuple) else [value]
        for one in values:
            problem = option.problem(one)
            if problem is not None:
                raise MergeError(f"method {record.name!r}: {name}={one!r}: {problem}")
    return {**record.defaults, **given}


def _keywords(function: Callable[..., Any]) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def function_keywords(record: Method) -> set[str]:
    """The keyword-only parameters ``record``'s function must have: its options (and
    ``generator`` for a random combiner)."""
    names = {option.name for option in record.options}
    return names | {"generator"} if isinstance(record, CombineMethod) and record.random else names


def _add(table: dict[str, Any], record: Method) -> None:
    for option in record.options:  # a default or grid value outside its own range
        for value in (option.default, *option.grid):
            problem = option.problem(value)
            if problem is not None:
                raise TypeError(f"method {record.name!r}: {option.name}={value!r}: {problem}")
    keywords = _keywords(record.function)
    if keywords != function_keywords(record):
        raise TypeError(
            f"method {record.name!r}: keyword-only parameters {sorted(keywords)} differ from the "
            f"registered options {sorted(function_keywords(record))}"
        )
    if record.name in ALIGNMENTS or record.name in COMBINERS:
        raise TypeError(f"method {record.name!r} is registered twice")
    table[record.name] = record


def alignment(name: str, **record: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as alignment ``name`` (fields of :class:`AlignMethod`)."""

    def attach(function: Callable[..., Any]) -> Callable[..., Any]:
        _add(ALIGNMENTS, AlignMethod(name, function, **record))
        return function

    return attach


def combiner(name: str, **record: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated function as combiner ``name`` (fields of :class:`CombineMethod`)."""

    def attach(function: Callable[..., Any]) -> Callable[..., Any]:
        _add(COMBINERS, CombineMethod(name, function, **record))
        return function

    return attach


def _option_text(option: Option) -> str:
    text = f"`{option.name}`={option.default!r}"
    if option.limits is not None and option.type in (int, float):
        text += f" ({option.limits.describe('x')})"
    if option.choices:
        text += f" ({' / '.join(option.choices)})"
    if option.per_model:
        text += " per model"
    if option.grid:
        text += f", auto: {', '.join(repr(v) for v in option.grid)}"
    return text


def _needs_text(record: Method) -> str:
    needs = record.needs
    parts = ["data" if needs.data else "", "labels" if needs.labels else ""]
    parts.append({"yes": "a base", "optional": "a base (optional)", "no": ""}[needs.base])
    if needs.max_models is not None and needs.max_models == needs.min_models:
        parts.append(f"{needs.max_models} models")
    elif needs.min_models > 1:
        parts.append(f"≥ {needs.min_models} models")
    if isinstance(record, AlignMethod) and record.permutations:
        parts.append("permutations only")
    return ", ".join(p for p in parts if p) or "-"


def method_table() -> str:
    """The Markdown table of every registered method (the README's): kind, name, label, what
    it needs, its options (default, range, what ``options="auto"`` tries) and its paper."""
    lines = [
        "| kind | name | method | needs | options | paper |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind, table in (("align", ALIGNMENTS), ("combine", COMBINERS)):
        for name in sorted(table):
            record = table[name]
            options = "; ".join(_option_text(o) for o in record.options) or "-"
            lines.append(
                f"| {kind} | `{name}` | {record.label} | {_needs_text(record)} | {options} "
                f"| {record.paper} |"
            )
    return "\n".join(lines)
