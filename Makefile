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

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/quantize_speed.py
	$(PY) benchmarks/pipeline_throughput.py

clean:
	rm -rf demo_out .pytest_cache
