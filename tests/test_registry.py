"""The method records: every method module registers one, records agree with their functions,
the README's table is the records', and the records drive merge_state_dicts and merge(align=,
combine=)."""

from __future__ import annotations

import copy
import importlib
import re
from pathlib import Path

import pytest
import torch

import accord
from accord.combine.ties import ties
from accord.errors import MergeError
from accord.registry import (
    ALIGNMENTS,
    COMBINERS,
    FRACTION,
    AlignMethod,
    CombineMethod,
    Limits,
    Option,
    alignment,
    combiner,
    function_keywords,
    method_table,
    plan_methods,
)
from test_match import one_space, permuted_pair, states

README = Path(__file__).parent.parent / "README.md"
RECORDS = [*ALIGNMENTS.values(), *COMBINERS.values()]


@pytest.mark.parametrize(("package", "table"), [("match", ALIGNMENTS), ("combine", COMBINERS)])
def test_every_method_module_registers_a_record(package: str, table: dict) -> None:
    folder = Path(accord.__file__).parent / package
    modules = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert len(modules) >= 6
    registered = {record.function.__module__ for record in table.values()}
    for stem in modules:
        module = importlib.import_module(f"accord.{package}.{stem}")
        assert module.__name__ in registered, f"accord/{package}/{stem}.py registers no method"


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_each_record_agrees_with_its_function(record: AlignMethod | CombineMethod) -> None:
    import inspect

    parameters = inspect.signature(record.function).parameters.values()
    keywords = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == function_keywords(record)
    assert all(p.default is inspect.Parameter.empty for p in parameters)  # defaults: the record's
    assert record.paper and record.label
    for option in record.options:
        assert option.problem(option.default) is None, (record.name, option.name)
        assert all(option.problem(value) is None for value in option.grid), option.name
    assert len({o.name for o in record.options}) == len(record.options)
    if isinstance(record, CombineMethod):
        assert record.default_align in ALIGNMENTS


def _public_defaults(record: CombineMethod) -> dict[str, object]:
    """The defaults that the public function a combiner's record function names (":func:`x`"
    in its docstring) gives to the record's options (None: a default derived from others)."""
    import inspect

    function = getattr(record.function, "func", record.function)  # a variant's: a partial
    named = re.search(r":func:`(\w+)`", function.__doc__ or "")
    if named is None:
        return {}
    public = getattr(importlib.import_module(function.__module__), named.group(1))
    parameters = inspect.signature(public).parameters
    options = {option.name for option in record.options}
    return {
        name: p.default
        for name, p in parameters.items()
        if name in options and p.default not in (inspect.Parameter.empty, None)
    }


DEFAULTED = [r for r in COMBINERS.values() if _public_defaults(r)]


@pytest.mark.parametrize("record", DEFAULTED, ids=lambda r: r.name)
def test_public_functions_default_as_their_records(record: CombineMethod) -> None:
    # ties(), dare(), np_merge(), ... keep defaults for direct calls: they must be the record's
    for name, default in _public_defaults(record).items():
        assert default == record.option(name).default, (record.name, name)


def test_the_comparison_has_one_place_per_method() -> None:
    places = [r.compare for r in RECORDS if r.compare is not None]
    assert len(places) == len(set(places)) >= 2


def test_registering_a_function_that_disagrees_with_its_record_fails() -> None:
    def matcher(spec, statistics, states, reference, *, alpha):  # type: ignore[no-untyped-def]
        raise AssertionError

    option = Option("beta", float, 1.0, "-")
    with pytest.raises(TypeError, match="differ from the registered options"):
        alignment("never", paper="-", label="-", options=(option,))(matcher)
    with pytest.raises(TypeError, match="differ from the registered options"):
        combiner("never", paper="-", label="-", random=True)(lambda tensors: tensors)
    with pytest.raises(TypeError, match="registered twice"):
        combiner("ties", paper="-", label="-")(lambda tensors: tensors)
    assert "never" not in ALIGNMENTS and "never" not in COMBINERS


def test_option_names_say_which_method_they_belong_to() -> None:
    aligning = {o.name for r in ALIGNMENTS.values() for o in r.options}
    combining = {o.name for r in COMBINERS.values() for o in r.options}
    assert not aligning & combining  # merge() routes an option to its method by name
    assert not (aligning | combining) & {"align", "combine"}
    assert not set(ALIGNMENTS) & set(COMBINERS)  # method= names one of them


def test_the_readme_table_is_the_records() -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- methods:start -->\n(.*?)\n<!-- methods:end -->", text, re.S)
    assert found is not None, "README.md has no <!-- methods:start --> table"
    assert found.group(1) == method_table(), "regenerate: accord.registry.method_table()"


def test_limits_are_written_and_checked_alike() -> None:
    assert FRACTION.describe("density") == "0 < density <= 1"
    assert Limits(0, 1, high_open=True).describe("p") == "0 <= p < 1"
    assert [FRACTION.holds(v) for v in (0, 1e-9, 1, 1.5, float("nan"))] == [
        False,
        True,
        True,
        False,
        False,
    ]
    option = Option("epochs", int, 3, "-", Limits(0), nullable=True)
    assert option.parse("7") == 7 and option.parse("null") is None
    with pytest.raises(ValueError, match="epochs takes null or an integer"):
        option.parse("x")


def _outside(limits: Limits, integer: bool) -> list[float]:
    """Values just past each bound of ``limits``."""
    step = 1 if integer else 0.5
    values = []
    if limits.low is not None:
        values.append(limits.low if limits.low_open else limits.low - step)
    if limits.high is not None:
        values.append(limits.high if limits.high_open else limits.high + step)
    return values


@pytest.mark.parametrize("record", ALIGNMENTS.values(), ids=lambda r: r.name)
def test_alignments_refuse_values_outside_their_records_limits(record: AlignMethod) -> None:
    stats, _ = permuted_pair(4, 0)
    for option in record.options:
        if option.limits is None:
            continue
        for value in _outside(option.limits, option.type is int):
            with pytest.raises(MergeError, match=option.name):
                accord.match.match(
                    record.name, one_space(4), stats, states(2), **{option.name: value}
                )


@pytest.mark.parametrize(
    "record", [r for r in COMBINERS.values() if r.tensorwise], ids=lambda r: r.name
)
def test_combiners_refuse_values_outside_their_records_limits(record: CombineMethod) -> None:
    tensors = [{"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(i))} for i in (1, 2)]
    base = {"w": torch.zeros(4, 3)} if record.needs.base == "yes" else None
    for option in record.options:
        for value in _outside(option.limits, False) if option.limits else []:
            with pytest.raises(MergeError, match=rf"{option.name}="):
                accord.merge_state_dicts(tensors, record.name, base=base, **{option.name: value})


def _vit(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return accord.build_model("vit", in_channels=1, image_size=8, num_classes=3)


def test_ties_on_two_vit_state_dicts_is_ties_per_tensor() -> None:
    base = _vit(0).state_dict()
    tuned = [_vit(seed).state_dict() for seed in (1, 2)]
    merged = accord.merge_state_dicts(
        tuned, "ties", base=base, density=[0.5, 0.3], weight=[1.0, 2.0], scale=0.7
    )
    assert merged.keys() == base.keys()
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            assert torch.equal(merged[name], tensor)
            continue
        deltas = [state[name] - tensor for state in tuned]
        expected = tensor + ties(deltas, [1.0, 2.0], density=[0.5, 0.3], scale=0.7)
        torch.testing.assert_close(merged[name], expected)
        assert merged[name].dtype == tensor.dtype


def test_merge_state_dicts_refuses_what_its_records_forbid() -> None:
    states_ = [_vit(seed).state_dict() for seed in (1, 2, 3)]
    base = _vit(0).state_dict()
    for call, message in (
        (lambda: accord.merge_state_dicts(states_, "ties"), "give the base"),
        (lambda: accord.merge_state_dicts(states_, "slerp"), "exactly 2 models, got 3"),
        (lambda: accord.merge_state_dicts(states_, "linear", base=base), "remove the base"),
        (lambda: accord.merge_state_dicts(states_, "npmerge"), "use accord.merge"),
        (lambda: accord.merge_state_dicts(states_, "tie", base=base), "did you mean 'ties'"),
        (lambda: accord.merge_state_dicts(states_, "ties", base=base, dens=1), "'density'"),
        (lambda: accord.merge_state_dicts(states_, "ties", base=base, density=[1, 1]), "3 models"),
        (
            lambda: accord.merge_state_dicts(states_, "della", base=base, epsilon=0.3),
            r"model 0: density=0.2 ± epsilon=0.3",
        ),
    ):
        with pytest.raises(MergeError, match=message):
            call()
    broken = [dict(states_[0]), states_[1]]
    broken[0].pop(next(iter(broken[0])))
    with pytest.raises(MergeError, match=r"tensor '.+' is in state 1 but not in state 0; "):
        accord.merge_state_dicts(broken, "linear")
    reshaped = {**states_[1], "head.bias": torch.zeros(4)}
    with pytest.raises(MergeError, match=r"'head.bias' has shape \(4,\) in the base but \(3,\)"):
        accord.merge_state_dicts(states_[:2], "ties", base=reshaped)


def test_method_is_a_shorthand_for_align_and_combine() -> None:
    assert plan_methods().align.name == "cca" and plan_methods().combine.name == "average"
    plan = plan_methods("npmerge")
    assert (plan.align.name, plan.combine.name, plan.name) == ("cca", "npmerge", "npmerge")
    plan = plan_methods("zipit", combine="linear")
    assert (plan.align.name, plan.combine.name) == ("zipit", "linear")
    assert plan_methods(align="ot", combine="npmerge").name == "ot+npmerge"
    with pytest.raises(MergeError, match="shorthand for align='cca'"):
        plan_methods("cca", align="zipit")
    with pytest.raises(MergeError, match=r"did you mean 'npmerge'.*combiners:"):
        plan_methods("npmerg")


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return accord.build_model("mlp", width=8, depth=2, in_channels=1, image_size=4, num_classes=3)


def test_merge_takes_align_and_combine_and_the_old_shorthand() -> None:
    generator = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 1, 4, 4, generator=generator), torch.randint(0, 3, (64,)))]
    models = [_mlp(0), _mlp(1)]
    old = accord.merge(models, data, method="npmerge", align="permutation", epochs=0)
    new = accord.merge(models, data, align="permutation", combine="npmerge", epochs=0)
    averaged = accord.merge(models, data, align="permutation", repair="none")
    for merged in (old, new):
        assert merged.report["alignment"] == "permutation" and "npmerge" in merged.report
        for key, value in averaged.model.state_dict().items():
            torch.testing.assert_close(merged.model.state_dict()[key], value)  # epochs=0: mean
    soup = accord.merge(models, data, align="permutation", combine="linear", repair="none")
    assert soup.report["combine"] == "linear" and soup.report["combine_options"]["normalize"]
    for key, value in averaged.model.state_dict().items():
        torch.testing.assert_close(soup.model.state_dict()[key], value)
    with pytest.raises(MergeError, match=r"combine='ties' merges task vectors: give the base"):
        accord.merge(models, data, combine="ties")
    with pytest.raises(MergeError, match="exactly 2 models, got 3"):
        accord.merge([*models, copy.deepcopy(models[0])], data, combine="slerp")
    with pytest.raises(MergeError, match=r"'rige' \(did you mean 'ridge'\?\)"):
        accord.merge(models, data, align="cca", combine="npmerge", rige=1)


def test_a_record_with_a_default_or_grid_value_outside_its_range_fails_to_register() -> None:
    def matcher(spec, statistics, states, reference, *, ridge):  # type: ignore[no-untyped-def]
        raise AssertionError

    for option in (
        Option("ridge", float, -1.0, "-", Limits(0, None, low_open=True)),
        Option("ridge", float, 1.0, "-", Limits(0, None, low_open=True), grid=(0.1, 0.0)),
    ):
        with pytest.raises(TypeError, match=r"'never': ridge=-?[01]\.0: expected 0 < ridge"):
            alignment("never", paper="-", label="-", options=(option,))(matcher)
    assert "never" not in ALIGNMENTS


class _Unread:
    """Data that fails the test when anything reads it: a merge that refuses its options
    must do so before tracing, a statistics pass or a dtype check looks at a batch."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the data was read before the options were checked")


@pytest.mark.parametrize(
    ("methods", "option", "value", "message"),
    [
        ({}, "ridge", -1.0, "method 'cca': ridge=-1.0: expected 0 < ridge (it is added to"),
        ({"align": "cca"}, "absolute_ridge", 0.0, "absolute_ridge=0.0: expected 0 < abs"),
        ({"align": "gcca"}, "ridge", 0.0, "method 'gcca': ridge=0.0: expected 0 < ridge (it"),
        (
            {"method": "zipit"},
            "alpha",
            1.5,
            "method 'zipit': alpha=1.5: expected 0 <= alpha <= 1 (it discounts a repeated",
        ),
        ({"align": "zipit"}, "beta", -0.1, "beta=-0.1: expected 0 <= beta <= 1 (it is the"),
        ({"align": "weight_matching"}, "max_iter", 0, "max_iter=0: expected 1 <= max_iter"),
        ({"combine": "npmerge"}, "lr", 0.0, "method 'npmerge': lr=0.0: expected 0 < lr"),
        ({"combine": "npmerge"}, "loss", "mse", "loss='mse': expected one of ce, kl"),
        ({"combine": "linear"}, "weight", [1.0, float("nan")], "weight=nan: expected a fin"),
        ({"method": "cca"}, "ridg", 1.0, "'ridg' (did you mean 'ridge'?); accepted options:"),
    ],
)
@pytest.mark.parametrize("auto", [False, True], ids=["fixed", "auto"])
def test_merge_refuses_an_option_out_of_its_range_before_reading_data(
    methods: dict, option: str, value: object, message: str, auto: bool
) -> None:
    """Under options="auto" too: the tuner searches the records' grids, the values given are
    the user's, checked as they are."""
    extra = {"options": "auto", "validation": _Unread()} if auto else {}
    with pytest.raises(MergeError) as error:
        accord.merge([_mlp(0), _mlp(1)], _Unread(), **methods, **extra, **{option: value})
    assert message in str(error.value)


def test_merge_refuses_options_only_wrong_together_or_per_model_before_reading_data() -> None:
    models, base = [_mlp(1), _mlp(2)], _mlp(0)
    with pytest.raises(MergeError, match=r"combine='della', model 0: density=0.2 ± epsilon=0.3"):
        accord.merge(models, _Unread(), combine="della", base=base, epsilon=0.3)
    with pytest.raises(MergeError, match="density has 3 values for 2 models"):
        accord.merge(models, _Unread(), combine="ties", base=base, density=[0.1, 0.2, 0.3])
    with pytest.raises(MergeError, match=r"method 'ties': density=0: expected 0 < density <= 1"):
        accord.merge(models, _Unread(), options={"combine": "ties", "density": 0}, base=base)
