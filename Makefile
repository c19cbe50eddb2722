# The two commands of a fresh machine: `make test` and `make bench`. Each sets itself up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench lint clean install

$(STAMP): requirements.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	DIN_KERNELS_SKIP_CUDA_BUILD=$${DIN_KERNELS_SKIP_CUDA_BUILD:-1} $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

train: $(STAMP)
	$(PY) -m din_kernels train --model base --dataset synthetic --out runs/synthetic/base
	$(PY) -m din_kernels train --model din --dataset synthetic --out runs/synthetic/din
	$(PY) -m din_kernels compare runs/synthetic/base runs/synthetic/din

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(FULL),--full,)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff==0.17.6
	$(VENV)/bin/ruff check din_kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
