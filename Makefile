# `make demo` and `make test` install into .venv on first use (or when
# pyproject.toml changes), then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STORE ?= data/store.zarr

.PHONY: install demo ensemble test gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
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

clean:
	rm -rf data models logs runs .pytest_cache
