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

setup: system-deps $(UV)  ## install everything needed to run the service
	$(UV) sync --frozen
	@mkdir -p voices

run: setup  ## set up, then start the service (settings: TTS_* variables or .env)
	$(VENV)/bin/offline-tts serve

test: setup browser-deps  ## set up, then run the whole test suite
	$(VENV)/bin/python -m pytest

bench: setup  ## benchmark on the full-size random-weight model (about 10 min; --quick: BENCH_ARGS=--quick)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

bench-ws: setup  ## WebSocket first audio vs /api/tts/stream TTFA, and cancel (full-size random model; WS_BENCH_ARGS)
	$(VENV)/bin/python -m bench.ws_bench $(WS_BENCH_ARGS)

load: setup  ## load test on the tiny model, loopback only, bounded in time
	$(VENV)/bin/python -m bench.load $(LOAD_ARGS)

random-model: setup  ## write a tiny random-weight checkpoint to models/random-tiny (for trying the service offline)
	$(VENV)/bin/offline-tts random-model models/random-tiny --size tiny

.PHONY: help system-deps browser-deps setup run test bench bench-ws load random-model
