# Every target sets itself up: a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install. torch==2.13.0 is the CPU wheel on these machines' disk (fast, no download).
# On a GPU machine: make test TORCH_SPEC="torch" (or the CUDA build you want, e.g. from PyTorch's own index
# with PIP_EXTRA_INDEX_URL set) -- pip keeps whatever torch is installed first.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m rlhf_lightning.demo

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

lint: venv
	$(PY) -m ruff check rlhf_lightning tests

clean:
	rm -rf $(VENV) runs demo_out lightning_logs
