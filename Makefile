# Two commands set up a fresh machine: `make demo` runs the main job, `make test` passes the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# GPTQModel asks for more CPU workers than a 2-core box has.
export GPTQMODEL_CPU_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test clean

$(BIN)/qrun: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# plain pip: it takes the torch that lies on this disk (uv and poetry would download GBs)
	$(BIN)/pip uninstall -q -y qrun 2>/dev/null || true  # the distribution's name before it became qrun-quant
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/qrun

demo: install
	QRUN_HOME=$${QRUN_HOME:-$(CURDIR)/.qrun-demo} $(BIN)/qrun demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .qrun-demo .pytest_cache
