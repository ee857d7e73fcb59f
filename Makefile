# make run  : bootstrap .venv, then start convserve on embedded defaults
# make test : bootstrap .venv, then run the test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test-deps image-envs run test test-fast lint lock bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: these builds lie on this machine's disk; other versions download GBs
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[training,service,dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/convserve up

# What the tests need beyond the venv: Debian's chromium for the browser tests, axe-core (from
# the npm registry, into .tools/) for their accessibility audit, Debian's nginx for the load
# balancer's test, docker-compose (1.29) to validate the compose files without an engine, and
# checkov.
AXE_VERSION := 4.14.1
# checkov (the manifests' and Dockerfiles' static analysis) in a venv of its own under .tools/:
# its pins clash with the test tools'
CHECKOV_VERSION := 3.3.30
# $(call debian,COMMAND,PACKAGE,WHAT FOR): install PACKAGE when COMMAND is missing (as root)
define debian
@{ command -v $(1) || test -x /usr/sbin/$(1); } >/dev/null || { \
  if [ "$$(id -u)" = 0 ]; then \
    echo "installing Debian's $(2) for $(3)"; \
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
  else \
    echo "Debian's $(2) is needed for $(3). Run: sudo apt-get install -y $(2)"; \
    exit 1; \
  fi; }
endef

test-deps:
	$(call debian,chromium,chromium,the browser tests)
	$(call debian,npm,npm,the accessibility audit)
	$(call debian,nginx,nginx,the load balancer test)
	$(call debian,docker-compose,docker-compose,checking the compose files)
	$(call debian,strace,strace,the test that no process sends onnxruntime's usage events)
	@command -v kustomize >/dev/null || kubectl kustomize --help >/dev/null 2>&1 || \
	  echo "the Kubernetes tests render deploy/k8s with kustomize or kubectl 1.21+; neither is here"
	@test -x .tools/checkov/bin/checkov || { echo "installing checkov $(CHECKOV_VERSION) into .tools/checkov"; \
	  $(PYTHON) -m venv .tools/checkov && .tools/checkov/bin/pip install -q checkov==$(CHECKOV_VERSION); }
	@test -f .tools/node_modules/axe-core/axe.min.js || \
	  npm install --silent --no-audit --no-fund --no-save --prefix .tools axe-core@$(AXE_VERSION)

# The images' environments, each a venv built from its lock as its Dockerfile installs it
# (tests/deploy/images.py), cached in ~/.cache/convserve/image-envs: the tests of the deployed
# processes run in them
image-envs: venv
	$(BIN)/python -m tests.deploy.images

test: venv test-deps image-envs
	$(BIN)/pytest -q -ra

test-fast: venv
	$(BIN)/pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# One hashed lock per image environment, resolved from pyproject.toml by uv for the images'
# Python (3.11, Linux x86_64): `make lock` after changing a dependency; the suite fails while
# a lock and pyproject.toml disagree. Each image installs only from its own lock.
LOCKS := deploy/locks
UV_COMPILE = $(BIN)/uv pip compile --quiet --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
lock: venv
	$(UV_COMPILE) pyproject.toml --extra service --group pyproject.toml:build -o $(LOCKS)/api.txt
	$(UV_COMPILE) pyproject.toml --extra service-gpu --group pyproject.toml:build \
	  -o $(LOCKS)/api-gpu.txt
	$(UV_COMPILE) pyproject.toml --extra training --group pyproject.toml:build \
	  -o $(LOCKS)/trainer.txt
	$(UV_COMPILE) --group pyproject.toml:mlflow-server -o $(LOCKS)/mlflow.txt

bench: venv
	@command -v wrk >/dev/null || apt-get install -y -qq wrk >/dev/null 2>&1 || \
	  echo "bench_serve.py needs wrk: sudo apt-get install -y wrk"
	$(BIN)/python benchmarks/bench_diagnostics.py
	$(BIN)/python benchmarks/bench_onnx.py
	$(BIN)/python benchmarks/bench_serve.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
