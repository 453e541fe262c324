# Two commands for a fresh machine: `make demo` and `make test` (see README.md).
# Both create .venv if it is missing and install the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.glm_train_installed
# CPU path: the CPU wheel of torch (on these machines it lies on disk). On a GPU machine bring your
# own torch into the venv first (or set TORCH_SPEC to the build you want); pyproject asks torch>=2.4.
TORCH_SPEC ?= torch==2.13.0
# The other packages at the versions the test suite passed with (constraints.txt); CONSTRAINTS= lets pip
# choose within pyproject.toml's ranges instead (e.g. next to a cluster's own torch build).
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=

.PHONY: demo test lint install clean-demo

install: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then \
	    echo "GPU machine without torch in $(VENV): installing $(TORCH_SPEC) from the default index"; \
	  fi; \
	  $(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install -q --disable-pip-version-check $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/glm-demo fresh=true

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-demo:
	rm -rf runs/demo data/demo
