# `make train` and `make test` set everything up on a fresh machine: .venv is created when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MIN_VENV := .venv-min
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif
TRAIN_CONFIG ?= digits/resnet20_1w1a_reste
TRAIN_ARGS ?=
BENCH_ARGS ?=
# pytest-xdist workers for the suites (the tests run one torch thread each: one worker per core).
TEST_JOBS ?= 2
PYTEST = -m pytest -q -n $(TEST_JOBS) --dist worksteal
# The lower bounds of pyproject.toml's dependencies, as exact pins (the version-floor run installs them).
FLOORS = $(shell $(PYTHON) .ci/floors.py)

.PHONY: venv train test test-fast test-min lint bench wheel clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Trains the embedded default (ResNet-20 1W/1A, ReSTE, scikit-learn's digits), saves outputs/<config>/final,
# reloads it through timm's local-dir: and prints its accuracy. TRAIN_ARGS adds flags (e.g. --epochs 2).
train: venv
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no -m reste_timm train --config $(TRAIN_CONFIG) $(TRAIN_ARGS)

test: venv
	$(PY) $(PYTEST) tests

# The edit-test loop: everything but the tests marked slow (training processes, compiles).
test-fast: venv
	$(PY) $(PYTEST) -m "not slow" tests

lint: venv
	$(VENV)/bin/ruff check reste_timm scripts tests benchmarks

bench: venv
	$(PY) benchmarks/run.py $(BENCH_ARGS)

wheel:
	rm -rf dist
	$(PYTHON) -m pip wheel -q --no-deps -w dist .

# The pinned torch is the same build in both venvs: .ci/share_torch.py hard-links .venv's copy (5.4 GB of
# CUDA wheels on x86_64) instead of installing a second one, so pip only adds what the floors need.
$(MIN_VENV)/.installed: $(VENV)/.installed pyproject.toml .ci/floors.py .ci/share_torch.py
	test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(PY) .ci/share_torch.py $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q $(TORCH_PINS) $(FLOORS) pytest pytest-xdist onnx onnxscript onnxruntime matplotlib tensorboard
	touch $@

# The version floors: a second venv holding exactly the lower bounds pyproject.toml declares (and the pinned
# torch), the built wheel installed into it, a short training run from outside the checkout, then the
# suite without its slow tests, against the installed wheel (PYTHONSAFEPATH: the checkout is not on the path).
test-min: $(MIN_VENV)/.installed wheel
	$(MIN_VENV)/bin/pip install -q --no-deps --force-reinstall dist/reste_timm-*.whl
	$(MIN_VENV)/bin/pip check
	$(MIN_VENV)/bin/python .ci/floors.py --check
	.ci/wheel_check.sh $(MIN_VENV)
	PYTHONSAFEPATH=1 $(MIN_VENV)/bin/python $(PYTEST) -m "not slow" tests

clean:
	rm -rf $(VENV) $(MIN_VENV) dist outputs .pytest_cache
