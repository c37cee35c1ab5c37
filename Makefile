# The two quickstart commands:  make demo  (set up, then prepare -> pretrain on Ray Train -> sample)
#                               make test  (set up, then the whole test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_ITERS ?= 300
export RAY_USAGE_STATS_ENABLED ?= 0
# the whole suite on two pytest-xdist workers, a module at a time each: its end-to-end tests spend much of their time
# waiting on Ray (the order: tests/conftest.py); TEST_WORKERS=0 runs it in this one process
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint bench clean

setup: $(VENV)/.installed

# torch is pinned in pyproject.toml: an unpinned torch would pull a multi-GB CUDA build on CPU-only machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev]'
	touch $@

demo: setup
	$(PY) pipelines/pretrain.py --config shakespeare_char_cpu --train.max_iters=$(DEMO_ITERS) \
		--train.eval_interval=100 --optim.lr_decay_iters=$(DEMO_ITERS) --run.name=demo-$$(date +%Y%m%d-%H%M%S) --sample

test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench_generate.py
	$(PY) bench/bench_prepare.py
	$(PY) bench/bench_train.py

clean:
	rm -rf $(VENV) out runs data mlflow.db mlruns .pytest_cache
