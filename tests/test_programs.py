"""One export per architecture and input signature in a merge (accord.trace.programs): shared
only where the graph is the same, and every model run with its own tensors."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

import accord
from accord.trace.observe import observed_model
from accord.trace.programs import bound_module, program_for, shared_exports


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The class name of every model torch.export.export is called on, in order."""
    calls: list[str] = []
    export = torch.export.export

    def counted(model: nn.Module, *args: object, **kwargs: object) -> object:
        calls.append(type(model).__name__)
        return export(model, *args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    yield calls


def _resnets(count: int) -> list[nn.Module]:
    """Tiny ResNet20s with different weights and BatchNorm statistics."""
    models = []
    for seed in range(count):
        torch.manual_seed(seed)
        model = accord.build_model("resnet20", width=0.25, in_channels=1, image_size=8)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
        models.append(model.eval())
    return models


@pytest.mark.parametrize("repair", ["none", "bn-reset"])
def test_a_merge_exports_the_architecture_once(exports: list[str], repair: str) -> None:
    """Trace, BatchNorm lookup (CCA's dense maps fold the BatchNorms when there is a repair)
    and the statistics pass of all three models read one program."""
    data = [(torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(5)),)]
    result = accord.merge(_resnets(3), data, method="cca", repair=repair)
    assert exports == ["ResNet20"]
    assert bool(result.statistics.norms) == (repair == "bn-reset")  # the lookup ran
    with torch.no_grad():
        assert torch.isfinite(result.model(data[0][0])).all()
    exports.clear()
    accord.collect_statistics(_resnets(3), data, progress=False)  # its own trace: one more
    assert exports == ["ResNet20"]


def test_a_shared_program_runs_each_models_own_weights_and_batchnorm_statistics(
    exports: list[str],
) -> None:
    first, second = _resnets(2)
    with shared_exports():
        program = program_for(first, torch.randn(2, 1, 8, 8))
        # another model of the architecture, another batch size (the batch axis is dynamic)
        assert program_for(second, torch.randn(5, 1, 8, 8)) is program
        nodes = [node.name for node in program.graph.nodes]
        # observers go into each model's own copy of the graph, never into the program
        observed_model(first, ["fc"], torch.randn(3, 1, 8, 8))
        assert [node.name for node in program.graph.nodes] == nodes
    assert len(exports) == 1
    x = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        ran = bound_module(program, second)(x)
        torch.testing.assert_close(ran, second(x), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(ran, first(x), atol=1e-3)


class _Tied(nn.Module):
    """An output layer sharing the embedding, and a non-persistent buffer."""

    def __init__(self, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.mid = nn.Linear(8, 8)
        self.act = activation()
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("gain", torch.rand(8) + 0.5, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.mid(self.embed(tokens))) * self.gain)


def test_tied_weights_and_non_persistent_buffers_are_each_models_own(exports: list[str]) -> None:
    torch.manual_seed(0)
    first, second = _Tied(), _Tied()
    tokens = torch.randint(0, 10, (3, 5))
    with shared_exports():
        program = program_for(first, tokens)
        assert program_for(second, tokens) is program
        module = bound_module(program, second)
    assert len(exports) == 1
    assert module.head.weight is second.embed.weight
    with torch.no_grad():
        torch.testing.assert_close(module(tokens), second(tokens), rtol=1e-6, atol=1e-6)


class _FixedBatch(nn.Module):
    """A model whose forward branches on the batch size: torch.export fixes that axis."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (2.0 if x.shape[0] == 4 else 1.0)


def _untied() -> nn.Module:
    model = _Tied()
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    return model


@pytest.mark.parametrize(
    ("make_first", "make_second", "first_input", "second_input"),
    [
        # another width
        (
            lambda: accord.build_model("mlp", width=8, depth=1, in_channels=1, image_size=4),
            lambda: accord.build_model("mlp", width=9, depth=1, in_channels=1, image_size=4),
            torch.randn(2, 1, 4, 4),
            torch.randn(2, 1, 4, 4),
        ),
        # the same tensors, another activation module
        (_Tied, lambda: _Tied(nn.GELU), torch.zeros(2, 5, dtype=torch.long), None),
        # the same tensors, not tied
        (_Tied, _untied, torch.zeros(2, 5, dtype=torch.long), None),
        # another input size for a convolutional network
        (
            lambda: accord.build_model("resnet20", width=0.25, in_channels=1, image_size=8),
            lambda: accord.build_model("resnet20", width=0.25, in_channels=1, image_size=8),
            torch.randn(2, 1, 8, 8),
            torch.randn(2, 1, 12, 12),
        ),
        # another input dtype
        (_Tied, _Tied, torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 5, dtype=torch.int)),
        # a program whose batch axis is fixed, on another batch size
        (_FixedBatch, _FixedBatch, torch.randn(4, 6), torch.randn(6, 6)),
        # a program with a dynamic batch axis that excludes a batch size
        (_FixedBatch, _FixedBatch, torch.randn(6, 6), torch.randn(4, 6)),
    ],
    ids=["width", "activation", "ties", "image-size", "input-dtype", "fixed-batch", "guard"],
)
def test_another_architecture_or_input_signature_is_exported_anew(
    exports: list[str], make_first, make_second, first_input, second_input
) -> None:
    second_input = first_input if second_input is None else second_input
    first, second = make_first().eval(), make_second().eval()
    with shared_exports():
        programs = [program_for(first, first_input), program_for(second, second_input)]
        with shared_exports():  # an inner block shares the outer one's programs
            assert program_for(second, second_input) is programs[1]
    assert programs[0] is not programs[1]
    assert len(exports) == 2
    with torch.no_grad():
        torch.testing.assert_close(
            bound_module(programs[1], second)(second_input), second(second_input)
        )


def test_outside_a_block_every_call_exports(exports: list[str]) -> None:
    model = accord.build_model("mlp", width=8, depth=1, in_channels=1, image_size=4)
    x = torch.randn(2, 1, 4, 4)
    assert program_for(model, x) is not program_for(model, x)
    assert len(exports) == 2
