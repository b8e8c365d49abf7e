# Two commands set up a fresh machine: `make demo` runs the main job, `make test` passes the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# GPTQModel asks for more CPU workers than a 2-core box has.
export GPTQMODEL_CPU_WORKERS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test clean postgres chromium

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

# Four test files at a time: most of a test waits on a process, a server or a lease, so two cores
# keep four busy; the slowest files start first (tests/conftest.py).
test: install chromium
	$(BIN)/python -m pytest -q -n 4 --dist loadfile --no-loadscope-reorder

# The db layer's tests also run on PostgreSQL: they start a throwaway cluster with the server's own
# programs (initdb, pg_ctl), which Debian's postgresql package puts under /usr/lib/postgresql/<v>/bin.
# Installed only where they are missing; without them those cases skip (with CI set, they fail).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		echo "PostgreSQL server programs found"; \
	else \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	fi

# The dashboard's tests drive a real browser: Debian's chromium, through Playwright's Python package
# (Playwright's own browser download is not used). Installed only where it is missing.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "Chromium found"; \
	else \
		$(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	fi

clean:
	rm -rf $(VENV) .qrun-demo .pytest_cache
