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

# The main job: serve the built-in default model on http://127.0.0.1:8000 (a local Ray cluster
# is started on demand; set RAY_ADDRESS to join an existing one). Ctrl-C stops it.
serve: install
	$(BIN)/ditserve run

test: install
	$(BIN)/python -m pytest -q tests --durations=25

clean:
	rm -rf $(VENV) .pytest_cache out.png
