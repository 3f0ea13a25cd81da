# syntax=docker/dockerfile:1
# Offline TTS service (Coqui XTTS-v2) on an NVIDIA GPU, or on the CPU when none is visible.
#
#   docker build -t offline-tts .
#   docker run --gpus all -p 8000:8000 -e TTS_ACCEPT_LICENSE=true \
#     -v tts-model:/models -v tts-cache:/cache -v "$PWD/voices:/app/voices" offline-tts
#
# docker-compose.yml beside this file does the same with named volumes and a CPU variant.

# Base image: the PyPI torch 2.9.1 wheels in uv.lock bundle their own CUDA 12.8 user-space
# libraries (nvidia-*-cu12 packages: cuBLAS, cuDNN, ...), so the image needs neither the
# `-runtime` nor the `-cudnn` flavour (gigabytes of duplicate libraries). `-base` is enough: it
# carries the CUDA forward-compat package and NVIDIA_REQUIRE_CUDA=cuda>=12.8, so the NVIDIA
# container runtime refuses a too-old host driver with a clear message instead of torch failing
# later. Keep its CUDA version equal to nvidia-cuda-runtime-cu12 in uv.lock (a test checks this).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG UV_VERSION=0.13.9

FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

# ---------------------------------------------------------------------------------------------
# Build stage: Python + locked dependencies into /app/.venv. Same base as the runtime stage, so
# glibc and the absolute paths inside the venv are identical when it is copied over.
FROM ${CUDA_IMAGE} AS builder

COPY --from=uv /uv /usr/local/bin/uv

# Python 3.11 is a uv-managed, self-contained CPython build pinned by uv itself: no PPA or
# distro Python is needed (Ubuntu 24.04 ships 3.12), and the same interpreter is used on every
# build. It lives in /opt/python so the runtime stage can copy it to the same path.
# PYTHON_PREFERENCE=only-system uses the base image's own python3.11 instead, for a base that has
# one and a build that cannot download uv's Python (`make image-test`'s stand-in base does this).
ARG PYTHON_PREFERENCE=only-managed
ENV UV_PYTHON=3.11 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=${PYTHON_PREFERENCE} \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

WORKDIR /app

# Dependencies first, from the lock file only: this layer (torch & co., several GB) is rebuilt
# only when pyproject.toml or uv.lock change, not on every source edit. The BuildKit cache
# mount keeps downloaded wheels across builds without putting them in the image.
# `uv sync` downloads the interpreter (UV_PYTHON) on the first build; /opt/python is made in any
# case because the runtime stage copies it (empty when the system Python is used).
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    mkdir -p /opt/python && uv sync --frozen --no-dev --no-install-project

# ---------------------------------------------------------------------------------------------
# The project itself as a wheel, in a stage of its own: the venv above stays as it is, so the
# runtime stage's copy of it (several GB) is reused from the cache after a source edit, and only
# the small wheel is installed again. README.md is read by the build backend.
FROM builder AS project
COPY README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv build --wheel --out-dir /dist

# ---------------------------------------------------------------------------------------------
# Runtime stage: no uv, no source, no build tools.
FROM ${CUDA_IMAGE} AS runtime

LABEL org.opencontainers.image.title="offline-tts" \
      org.opencontainers.image.description="Offline text-to-speech HTTP service with zero-shot voice cloning (Coqui XTTS-v2)" \
      org.opencontainers.image.licenses="MPL-2.0"

# ffmpeg: the service decodes reference clips and encodes mp3/opus/... with it, and torchcodec
# loads its shared libraries (libavcodec & co.). Versions come from the Ubuntu release, which
# is pinned by the base image tag.
# ARG, not ENV: no debconf prompt (tzdata) can stall the build, and the setting does not leak
# into the container.
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates ffmpeg \
 && rm -rf /var/lib/apt/lists/*

# Non-root user. uid 1000 is the usual first user on a Linux host, so the bind-mounted ./voices
# folder stays writable for uploads (build with --build-arg APP_UID=$(id -u) otherwise). The
# Ubuntu 24.04 image already has a `ubuntu` user with that uid: it is removed first.
ARG APP_UID=1000
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid "${APP_UID}" app \
 && useradd --uid "${APP_UID}" --gid app --create-home --shell /usr/sbin/nologin app \
 && install -d -o app -g app /models /cache /app/voices

# Root-owned interpreter and venv: the service can read but not modify its own code.
COPY --from=builder /opt/python /opt/python
COPY --from=builder /app/.venv /app/.venv
# The project's wheel, with uv mounted for this step only (no uv in the image); no index: the
# dependencies are all in the venv already. The wheel is COPYed, not bind-mounted: buildah's layer
# cache does not see a changed bind-mounted file and would keep the old code (podman 4.3).
COPY --from=project /dist /tmp/dist
RUN --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    uv pip install --python /app/.venv/bin/python --no-deps --no-index --no-cache --compile-bytecode /tmp/dist/*.whl \
 && rm -rf /tmp/dist

# The TTS_* variables are Settings fields (src/offline_tts/config.py); a test checks that.
# /models and /cache are meant to be volumes (the model download and the latents survive
# restarts); Docker copies the `app` ownership above into a new named volume.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TTS_HOST=0.0.0.0 \
    TTS_PORT=8000 \
    TTS_MODEL_DIR=/models/xtts_v2 \
    TTS_CACHE_DIR=/cache \
    TTS_VOICES_DIR=/app/voices \
    TTS_DEVICE=auto

WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER ${APP_UID}:${APP_UID}
EXPOSE 8000

# Liveness through the service's own /health (which needs no API key). Python rather than curl,
# which the base image does not ship. The first start may download the model (~1.8 GB): hence the long
# start period, during which failures do not count.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('TTS_PORT', '8000') + '/health', timeout=8)"]

# Exec form: the server gets SIGTERM directly (docker stop) and shuts down gracefully.
CMD ["offline-tts", "serve"]
