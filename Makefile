# Everything a fresh machine needs: `make demo` runs the built-in demo, `make test` runs the tests.
# Both create .venv when missing, installing the CPU build of torch first (an unpinned torch would
# pull a multi-GB CUDA build), then chatrl with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export CHATRL_HOME ?= $(HOME)/.cache/chatrl
export TORCH_EXTENSIONS_DIR ?= $(CHATRL_HOME)/torch_extensions

.PHONY: install demo demo-grpo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/chatrl demo

# GRPO from a checkable reward: SmolLM2-135M-Instruct learns two-digit addition (configs/grpo-arithmetic.yaml)
demo-grpo: install
	$(VENV)/bin/chatrl pipeline --config configs/grpo-arithmetic.yaml

lint: install
	$(VENV)/bin/ruff check src tests bench

test: install lint
	$(VENV)/bin/pytest -q tests

test-fast: install lint
	$(VENV)/bin/pytest -q -m "not slow" tests

bench: install
	$(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
