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
	DIN_KERNELS_SKIP_EXTENSION=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

# the compiled extension, built in place (ninja: a rebuild compiles only what changed)
EXT_SRC := $(wildcard csrc/*.cpp csrc/cpu/*.cpp csrc/cpu/*.h csrc/common/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) \
	din_kernels/ops/schema.py setup.py
EXT := $(VENV)/.extension

$(EXT): $(STAMP) $(EXT_SRC)
	DIN_KERNELS_SKIP_CUDA_BUILD=$${DIN_KERNELS_SKIP_CUDA_BUILD:-1} $(PY) setup.py --quiet build_ext --inplace
	$(PY) -c "import din_kernels._extension as e; assert e.loaded(), e._error"
	touch $(EXT)

install: $(EXT)

test: $(EXT)
	$(PY) -m pytest tests $(PYTEST_ARGS)

train: $(EXT)
	$(PY) -m din_kernels train --model base --dataset synthetic --out runs/synthetic/base
	$(PY) -m din_kernels train --model din --dataset synthetic --out runs/synthetic/din
	$(PY) -m din_kernels compare runs/synthetic/base runs/synthetic/din

bench: $(EXT)
	$(PY) benchmarks/run.py $(if $(FULL),--full,)

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff==0.17.6
	$(VENV)/bin/ruff check din_kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info din_kernels/_C*.so csrc/generated
