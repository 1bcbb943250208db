# Two commands matter: `make demo` (the main job on an embedded default) and `make test`.
# Everything they need is installed here: a project-local virtualenv with torch==2.11.0 from PyPI
# (libtorch for tch 0.24) and the Python reference stack used by the tests.

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)
CARGO ?= cargo
DEMO_OUT ?= out/demo

.PHONY: all venv build test test-rust check-ros demo bench-cpu clean

all: build

# Idempotent: reinstalls only when the pinned requirements change.
$(STAMP): scripts/requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
	touch $(STAMP)

venv: $(STAMP)

build: venv
	$(CARGO) build --bins

# Every test: unit + integration (Rust, some driving the Python reference stack) and the
# compile check of the ROS layer against r2r's doc-only bindings.
test: venv check-ros test-rust

test-rust: venv
	$(CARGO) test --no-fail-fast

check-ros: venv
	$(CARGO) check --features ros-doc-only --all-targets

demo: build
	$(CARGO) run --bin vla_finetune -- demo --out $(DEMO_OUT)

# Ours vs the Python stack (transformers + peft) on this machine's CPU at reduced 3B shapes, f32;
# tables and JSON under out/bench-cpu (docs/benchmarks.md). The GPU run: scripts/gpu_bench.sh.
bench-cpu: venv
	$(CARGO) build --bin vla_finetune
	OUT_DIR=out/bench-cpu VLA_BIN=target/debug/vla_finetune PYTHON=$(PY) scripts/gpu_bench.sh --device cpu --model reduced --precision f32

clean:
	$(CARGO) clean
	rm -rf $(VENV) out
