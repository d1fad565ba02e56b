# The README's two commands: `make demo` and `make test`. Each sets up what it
# needs on a fresh Debian machine with Python 3.11 (virtualenv, pinned
# packages, the Debian Fashion-MNIST files) and then runs.
PYTHON ?= python3
VENV ?= .venv
MODEL_DIR ?= runs/demo
PYTEST_ARGS ?=
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test setup data lint clean

demo: setup data
	$(VENV)/bin/python -m simclr_tf --flagfile=flags/demo.cfg --model_dir=$(MODEL_DIR)

test: setup data
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-test.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements-test.txt -e .
	touch $@

data:
	@test -f $(FASHION_MNIST) || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist; }

lint: setup
	$(VENV)/bin/ruff check simclr_tf tests benchmarks tpu
	$(VENV)/bin/ruff format --check simclr_tf tests benchmarks tpu

clean:
	rm -rf $(VENV) runs
