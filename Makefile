# Everything a fresh machine needs: `make demo` runs the built-in demo, `make test` runs the tests.
# Both create .venv when missing, installing the CPU build of torch first (an unpinned torch would
# pull a multi-GB CUDA build), then chatrl with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Pinned versions the suite passed with; `make install CONSTRAINTS=` installs the newest allowed by pyproject.toml
CONSTRAINTS ?= constraints.txt
export CHATRL_HOME ?= $(HOME)/.cache/chatrl
export TORCH_EXTENSIONS_DIR ?= $(CHATRL_HOME)/torch_extensions
# pytest-xdist workers, one test file each at a time (module fixtures are built once): most of a test's time is a CLI
# subprocess importing torch/DeepSpeed on one core, so 2 workers on 2 cores took the suite from 34.5 to 18 minutes
TEST_WORKERS ?= 2

.PHONY: install demo demo-grpo demo-distill demo-dpo demo-feedback demo-tools demos-check test test-fast lint bench bench-quick clean constraints

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

demo: install
	$(VENV)/bin/chatrl demo

# GRPO from a checkable reward: SmolLM2-135M-Instruct learns two-digit addition (configs/grpo-arithmetic.yaml)
demo-grpo: install
	$(VENV)/bin/chatrl pipeline --config configs/grpo-arithmetic.yaml

# after demo-grpo: its actor is the teacher
demo-distill: install
	$(VENV)/bin/chatrl pipeline --config configs/distill-arithmetic.yaml

# tool use: SFT on the environment's calculator demonstrations, then GRPO with the calculator on two-digit
# multiplication; held-out success without tools, and with tools before and after (configs/demo-tools.yaml)
demo-tools: install
	$(VENV)/bin/chatrl pipeline --config configs/demo-tools.yaml

# after a green `make test`: pin what it passed with (torch's local +cpu tag dropped: the pin must work anywhere)
constraints: install
	{ head -2 constraints.txt; $(PY) -m pip freeze | grep -v '^-e\|^#' | sed 's/+cpu$$//' | sort -f; } > constraints.new
	mv constraints.new constraints.txt

# DPO instead of reward model + PPO; its eval scores with `make demo`'s reward model (configs/demo-dpo.yaml)
demo-dpo: install
	$(VENV)/bin/chatrl pipeline --config configs/demo-dpo.yaml

# the dialog system learns from its users: simulated users (a reward model's taste) chat and rate through
# `chatrl serve --db`, KTO on the export, /admin/reload, then old vs new in the arena (bench/demo_feedback.py)
demo-feedback: install
	$(PY) bench/demo_feedback.py --readme

# every demo for 3 seeds against the issue-19 bars; writes bench/results/demos/ and the README's demo tables
# (DTYPE=fp32 on a bf16 machine runs what an AVX2 machine runs)
DTYPE ?= auto
demos-check: install
	$(PY) bench/demos.py --seeds 1,2,3 --dtype $(DTYPE) --readme

lint: install
	$(VENV)/bin/ruff check src tests bench

test: install lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

test-fast: install lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

# the speed suite (bench/run.py): limits, generate, ppo, grpo, vs-trl, score, serve; ~1 h on 2 cores, writes
# bench/results/*.json and the README's results table. `make bench-quick`: the tiny-model smoke run CI does.
bench: install
	$(PY) bench/run.py --readme

bench-quick: install
	$(PY) bench/run.py --quick

clean:
	rm -rf $(VENV) .pytest_cache
