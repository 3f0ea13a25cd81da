# One-command setup on a fresh Debian/Ubuntu machine: system packages, uv, the locked Python environment.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .cache/tools
UV := $(TOOLS)/bin/uv
VENV := .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export UV_PROJECT_ENVIRONMENT := $(VENV)

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --disable-pip-version-check uv==$(UV_VERSION)

system-deps:  ## ffmpeg (decoding clips; torchcodec loads its libraries)
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || { \
	  echo "Installing ffmpeg (apt-get)..."; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null; }

browser-deps:  ## Debian's Chromium for the browser tests (Playwright drives it; no browser download)
	@command -v chromium >/dev/null || { \
	  echo "Installing chromium (apt-get)..."; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }

test-deps:  ## capsh (libcap2-bin): the permission tests run the server as root without its DAC capabilities
	@command -v capsh >/dev/null || [ -x /usr/sbin/capsh ] || { \
	  echo "Installing libcap2-bin (apt-get)..."; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends libcap2-bin >/dev/null; }

setup: system-deps $(UV)  ## install everything needed to run the service
	$(UV) sync --frozen
	@mkdir -p voices

run: setup  ## set up, then start the service (settings: TTS_* variables or .env)
	$(VENV)/bin/offline-tts serve

TEST_WORKERS ?= auto
test: setup browser-deps test-deps  ## set up, then run the whole test suite (TEST_WORKERS parallel workers: one per core)
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: setup  ## benchmark on the full-size random-weight model (about 16 min; --quick: BENCH_ARGS=--quick)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

bench-ws: setup  ## WebSocket first audio vs /api/tts/stream TTFA, and cancel (full-size random model; WS_BENCH_ARGS)
	$(VENV)/bin/python -m bench.ws_bench $(WS_BENCH_ARGS)

load: setup  ## load test on the tiny model, loopback only, bounded in time
	$(VENV)/bin/python -m bench.load $(LOAD_ARGS)

cluster-deps:  ## HAProxy, the load balancer of `make cluster-test` (Debian package)
	@command -v haproxy >/dev/null || { \
	  echo "Installing haproxy (apt-get)..."; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends haproxy >/dev/null; }

cluster-test: setup cluster-deps  ## 3 replicas on one shared folder behind HAProxy: sharing, failover, rejoin (loopback, tiny model, at most 20 min)
	$(VENV)/bin/python deploy/cluster_test.py $(CLUSTER_ARGS)

random-model: setup  ## write a tiny random-weight checkpoint to models/random-tiny (for trying the service offline)
	$(VENV)/bin/offline-tts random-model models/random-tiny --size tiny

image-test: setup  ## build the Dockerfile and run the compose file's tts-cpu service with podman (slow: not in `make test`)
	bash scripts/image-test.sh

image-test-clean:  ## remove image-test's podman storage (stand-in base images, build cache) from .cache/image-test
	@if [ -d .cache/image-test/storage ]; then \
	  CONTAINERS_CONF=.cache/image-test/containers.conf CONTAINERS_STORAGE_CONF=.cache/image-test/storage.conf podman system reset -f >/dev/null 2>&1; \
	  rm -rf .cache/image-test; fi

.PHONY: help system-deps browser-deps test-deps setup run test bench bench-ws load cluster-deps cluster-test random-model image-test image-test-clean
