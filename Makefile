# `make demo` and `make test` install into .venv on first use (or when
# pyproject.toml or the lock changes), then run. The exact versions tested
# are the lock of the venv's Python (3.11 or 3.12), used as pip constraints.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock-py$(shell $(PYTHON) -c 'import sys; print("%d%d" % sys.version_info[:2])').txt
STORE ?= data/store.zarr

.PHONY: install demo ensemble test gpu-check device-kit clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[s3,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) preprocess/build_zarr.py --out $(STORE)
	$(PY) trainers/train.py --member small_specialist --store $(STORE) --out runs/demo --overwrite \
	    --encoder-weights none --epochs 1 --max-steps 10 --img-size 256 --batch-size 4
	$(PY) benchmarks/loader_throughput.py --store $(STORE) --batches 20 --rounds 1 --train-steps 1

# all six members, briefly, on the demo store; rerunning resumes
ensemble: $(STAMP)
	test -d $(STORE) || $(PY) preprocess/build_zarr.py --out $(STORE)
	$(PY) trainers/run_ensemble.py --store $(STORE) --out runs/demo-ensemble \
	    --encoder-weights none --epochs 1 --max-steps 6 --img-size 128 --batch-size 4

test: $(STAMP)
	$(PY) -m pytest -q

# on a machine with a CUDA GPU: every stage the CPU tests cannot show
# (benchmarks/gpu_check.py); without one it says so and exits 0
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

# the GPU check's wheels and scripts for the offline lent GPU machine (README, "GPU check offline")
device-kit: $(STAMP)
	$(PY) benchmarks/device_kit.py --out .kit

clean:
	rm -rf data models logs runs .pytest_cache
