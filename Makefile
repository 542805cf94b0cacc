# The two commands of the README's quick start:
#   make demo   set up .venv and run the main job on the built-in real Gemma 3 270M (export, check, generate)
#   make test   set up .venv and run the whole test suite (slow tests included)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup tools demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 is pinned in pyproject.toml: its CPU build is on local disk.
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in real Gemma 3 270M: export it to ONNX (int8 layers, int4 table calibrated by
# GPTQ with the calibration text's rows 8-bit: x0.999 / x1.024 on prose / code) and to a .pte of the same
# recipe (rounded to nearest, the head's worst columns corrected, its int8 layers' inputs smoothed:
# x0.999 / x1.032), each in the
# recipe --recipe auto picks (benchmarks/QUALITY.md), once (delete out/ to redo); the .pte with its prefill
# method (prompts 1.4-1.75x faster, for a minute more of export); verify each against transformers, then
# generate with each, with speeds.
DEMO_PROMPT := Photosynthesis is the process by which
demo: setup out/gemma3-onnx/gemma_edge.json out/gemma3-pte/gemma_edge.json
	$(BIN)/gemma-edge verify out/gemma3-onnx
	$(BIN)/gemma-edge verify out/gemma3-pte
	$(BIN)/gemma-edge generate out/gemma3-onnx "$(DEMO_PROMPT)" -n 48
	$(BIN)/gemma-edge generate out/gemma3-pte "$(DEMO_PROMPT)" -n 48

out/gemma3-onnx/gemma_edge.json: | setup
	$(BIN)/gemma-edge export gemma-3-270m --format onnx --quant int8 --embedding-quant int4 -o out/gemma3-onnx --overwrite

out/gemma3-pte/gemma_edge.json: | setup
	$(BIN)/gemma-edge export gemma-3-270m --format pte --quant int8 --embedding-quant int4 --prefill-method -o out/gemma3-pte --overwrite

# The arm64 parity tests (verify --target arm64) unpack an arm64 Debian userland with mmdebstrap
# and cross-compile the native .pte runner with aarch64-linux-gnu-g++.
ARM64_TOOLS := mmdebstrap:mmdebstrap aarch64-linux-gnu-g++:g++-aarch64-linux-gnu
tools:
	@missing=""; for t in $(ARM64_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  else echo "the arm64 tests need:$$missing (sudo apt-get install$$missing)"; exit 1; fi; fi

# One test process per core (at most 2: a real-model test process takes a few GiB); a module's tests
# stay in one process, so its fixtures are made once, and modules start in the order conftest.py
# gives (the real model's exports first). Lowering a .pte is single-threaded Python for minutes, so
# two processes nearly halve a run whose exports are not cached yet.
PYTEST_PARALLEL := -n auto --maxprocesses 2 --dist loadscope --no-loadscope-reorder
test: setup tools
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)
	$(MAKE) -C android_demo check

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info out
