# The two set-up commands of the README: `make run` (install + generate with the built-in model) and
# `make test` (install + the whole test suite). CPU torch comes from the CPU wheel index, never the multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install run test serve clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_CPU)" || $(PY) -m pip install -q "$(TORCH_CPU)" --extra-index-url $(TORCH_INDEX)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/shardserve generate --prompt "The quick brown fox" --prompt "Once upon a time" --max-tokens 32

serve: install
	$(VENV)/bin/shardserve serve

test: install
	$(PY) -m pytest -q -x -n 2 --dist loadgroup tests

clean:
	rm -rf $(VENV)
