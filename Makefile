# Concord: two commands on a fresh machine.
#   make demo   run the main job end to end on the embedded model; results in out/demo/
#   make test   run the whole test suite
#   make load   load and fuzz benchmarks of a real server (not CI, ~10 min): bench/load.py, bench/fuzz.py;
#               figures in docs/performance.md
# Each creates (or refreshes, when pyproject.toml changed) the virtual environment .venv from the project's own files.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.concord-installed
PYTEST_ARGS ?=

.PHONY: demo test venv bench load openapi clean addon

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

# The Blender extension zip, built and validated by Blender's own packager (shipped inside the bpy wheel).
BLENDER_EXT = $(shell $(BIN)/python -c 'import bpy, os; print(os.path.join(bpy.utils.system_resource("SCRIPTS"), "addons_core", "bl_pkg", "cli", "blender_ext.py"))' 2>/dev/null)
addon: $(STAMP)
	@test -n "$(BLENDER_EXT)" || { echo "make addon: needs the bpy wheel in $(VENV)"; exit 2; }
	$(BIN)/python "$(BLENDER_EXT)" validate blender_addon
	@mkdir -p dist
	$(BIN)/python "$(BLENDER_EXT)" build --source-dir blender_addon --output-dir dist
	$(BIN)/python "$(BLENDER_EXT)" validate dist/concord-$$(sed -n 's/^version = "\(.*\)"/\1/p' blender_addon/blender_manifest.toml).zip

bench: $(STAMP)
	$(BIN)/python bench/server.py

load: $(STAMP)
	$(BIN)/python bench/load.py
	$(BIN)/python bench/fuzz.py

openapi: $(STAMP)
	$(BIN)/concord openapi --out docs/openapi.json

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
