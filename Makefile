# Two entry points for a fresh machine (see README): `make serve` and `make test`.
# Everything goes into .venv; it sees the system's site-packages so that an existing (CUDA)
# torch is reused, and the CPU wheel torch==2.13.0 is installed only where no torch exists.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ditserve-installed

.PHONY: install serve test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in default model.
serve: install
	$(BIN)/ditserve generate --prompt "a red circle on a blue background" --seed 0 --output out.png

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache out.png
