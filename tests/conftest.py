"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from hypothesis import settings
from torch import nn

from accord.check import check_spec, randomly_permuted
from accord.spec import Spec

Preserved = Callable[[nn.Module, Any, Spec], None]

# `make test` draws the same examples on every machine, so a run is reproducible;
# HYPOTHESIS_PROFILE=explore draws new ones on each run, to search for bugs.
settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Under pytest-xdist each worker takes one core: two workers with two threads each would
# fight over the cores of a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """One intra-op thread: tiny models run many times faster without thread hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def assert_preserved() -> Preserved:
    """Check ``spec`` on ``model``: ``Spec.check`` passes and a randomly permuted copy gives
    the same outputs with different weights (when a free space has two or more features)."""

    def check(model: nn.Module, x: Any, spec: Spec) -> None:
        check_spec(spec, model, x)
        model.eval()
        permuted = randomly_permuted(model, spec, seed=1).eval()
        with torch.no_grad():
            torch.testing.assert_close(permuted(x), model(x), rtol=1e-5, atol=1e-5)
        if any(space.size > 1 and space.groups < space.size for space in spec.free_spaces):
            before, after = model.state_dict(), permuted.state_dict()
            assert any(not torch.equal(before[k], after[k]) for k in before)

    return check
