# Quick start: `make demo` (set up + run the demo job), `make test` (set up + run the tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean
setup: $(STAMP)

$(STAMP): setup.py pyproject.toml tools/setup_env.sh
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
