# `make train` and `make test` set everything up on a fresh machine: .venv is created when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif
TRAIN_CONFIG ?= configs/digits/resnet20_1w1a_reste.yaml

.PHONY: venv train test lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,plot]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no scripts/train.py --config $(TRAIN_CONFIG)

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check reste_timm scripts tests benchmarks

bench: venv
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
