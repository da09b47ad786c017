# femurseg: the two set-up commands are `make demo` and `make test`.
PY      ?= $(shell command -v python3.11 || command -v python3)
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= demo_out

.PHONY: demo test test-slow test-avx2 smoke-avx2 browser bench bench-nnunet venv clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	# torch is pinned to the CPU build on disk; an unpinned torch pulls GBs of CUDA wheels.
	$(BIN)/pip install -qq torch==2.13.0
	$(BIN)/pip install -qq -e '.[test,onnx,distributed]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/femurseg demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Debian's chromium for the report's browser test (needs root and apt; CI runs it). Without it the
# test is skipped with its reason.
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "chromium could not be installed: the report's browser test will be skipped"

# What an AVX2-only CPU runs (oneDNN capped to AVX2): a timed cv + predict smoke and the precision tests.
smoke-avx2: $(STAMP)
	bash .ci/avx2_smoke.sh

# The whole default suite under the AVX2 cap.
test-avx2: $(STAMP)
	ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# femurseg against nnU-Net v2 (benchmarks/bench_nnunet.py) in its own environment: nnunetv2 pulls a
# torchvision that wants a newer torch, so it never shares .venv. ARGS=--quick for the short run.
NNVENV ?= .venv-nnunet
$(NNVENV)/.installed: pyproject.toml
	$(PY) -m venv $(NNVENV)
	$(NNVENV)/bin/pip install -qq torch==2.13.0
	$(NNVENV)/bin/pip install -qq -e '.[nnunet]'
	touch $@

bench-nnunet: $(NNVENV)/.installed
	$(NNVENV)/bin/python benchmarks/bench_nnunet.py $(ARGS)

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
