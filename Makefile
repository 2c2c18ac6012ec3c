# The two quick-start commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dwc-installed
EXAMPLE := examples/stdlib-coder
DEMO_BUNDLE := build/stdlib-coder-cpu-bf16

.PHONY: demo test example install clean

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,eval]"
	touch $(STAMP)

# Trains the embedded example model once (about 4 minutes on 2 cores), then reuses it.
example: $(STAMP)
	$(BIN)/python examples/make_example_model.py --out $(EXAMPLE)

demo: example
	$(BIN)/dwc build $(EXAMPLE)/model.yaml --target cpu-bf16 -o $(DEMO_BUNDLE)
	$(BIN)/dwc inspect $(DEMO_BUNDLE)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: example
	$(BIN)/python -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build
