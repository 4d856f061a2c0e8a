# Concord: two commands on a fresh machine.
#   make demo   run the main job end to end on the embedded model; results in out/demo/
#   make test   run the whole test suite
# Both create (or refresh, when pyproject.toml changed) the virtual environment .venv from the project's own files.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.concord-installed
PYTEST_ARGS ?=

.PHONY: demo test venv bench openapi clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Concord needs Python 3.11 (the bpy wheel pins it); set PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,blender]"
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/concord demo --out out/demo

bench: $(STAMP)
	$(BIN)/python bench/server.py

openapi: $(STAMP)
	$(BIN)/concord openapi --out docs/openapi.json

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
