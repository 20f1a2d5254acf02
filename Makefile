# Quick start: `make demo` (set up + run the demo job), `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean lock
setup: $(STAMP)

$(STAMP): setup.py pyproject.toml requirements.lock tools/setup_env.sh
	bash tools/setup_env.sh $(VENV)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tools.demo

# two test processes (at most four on bigger machines): the suite is mostly XLA compiles of small
# programs, which one process cannot spread over two cores (2 cores: 15.6 -> 11.8 min)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n auto --maxprocesses 4

bench: $(STAMP)
	$(PY) benchmarks/quantize_speed.py
	$(PY) benchmarks/pipeline_throughput.py

clean:
	rm -rf demo_out .pytest_cache

# requirements.lock, which setup, CI and `tools.tpu install` install from: every package of a fresh
# Python 3.11 install of the dev extra, exactly. Rerun after changing setup.py's requirements.
# torch's local label is dropped (torch==2.13.0 matches the local CPU wheel and PyPI's build alike).
LOCK_VENV := /tmp/valle-jax-lock-venv
lock:
	rm -rf $(LOCK_VENV) && python3.11 -m venv $(LOCK_VENV)
	cd /tmp && $(LOCK_VENV)/bin/pip install -q "$(CURDIR)[dev]"
	{ echo "# Made by \`make lock\` (Python 3.11, pip freeze of a fresh install of the dev extra); used as pip -c."; \
	  $(LOCK_VENV)/bin/pip freeze | grep -iv "^valle[-_]jax" | sed -E 's/^(torch==[^+]+)\+cpu$$/\1/'; } > requirements.lock
	rm -rf $(LOCK_VENV)
