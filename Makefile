# scan_dist: `make demo` (Fashion-MNIST on CPU), `make test` (the whole suite), `make smoke`.
# Each target installs what it needs first: a .venv in the repo root and Debian's Fashion-MNIST package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: install data demo fashion_mnist smoke test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[test,dali]'
	touch $@

data: $(FMNIST)

$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: install data
	$(PY) -m scan_dist.launch --local --run-dir runs/demo demo

fashion_mnist: install data
	$(PY) -m scan_dist.launch --local --run-dir runs/fashion_mnist fashion_mnist

smoke: install data
	$(PY) -m scan_dist.launch --local --run-dir runs/smoke smoke

test: install data
	$(PY) -m pytest -q tests

clean:
	rm -rf runs .pytest_cache
