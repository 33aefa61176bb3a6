# Set-up and checks. `make demo` runs the main job; `make test` runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-slow lint data

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; a bare `torch` requirement would pull CUDA builds.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,llm]'
	touch $@

# Debian's Fashion-MNIST when we can install it (root with apt); the demo falls back to digits.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "Fashion-MNIST not installed; the demo uses digits"; \
	fi

demo: $(VENV)/.installed data
	$(VENV)/bin/accord demo

# one worker per core, at most 4 (each worker holds its own torch). Not --dist loadgroup:
# pytest-xdist 3.8 cannot group tests under pytest 9 (it renames a node id pytest 9 ignores)
test: $(VENV)/.installed
	$(PY) -m pytest -n auto --maxprocesses 4

test-slow: $(VENV)/.installed  # pytest exits 5 when no test is marked slow
	$(PY) -m pytest -m slow || test $$? -eq 5

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
