#!/usr/bin/env bash
# `make image-test`: build the project's Dockerfile and run docker-compose.yml's `tts-cpu` service for
# real, with podman, then drive it through the seed's flow. Not part of `make test`: a cold build takes
# many minutes and ~17 GB of disk. Must pass before a change to the Dockerfile or the compose file lands.
#
# Made for a Debian machine without access to container registries (see issue 14): both base images
# are local stand-ins tagged with the names the Dockerfile uses:
#   - the CUDA base: a Debian rootfs from debootstrap (with its python3.11: the build gets
#     PYTHON_PREFERENCE=only-system, as uv's own Python builds cannot be downloaded here) that trusts
#     the CAs of this host's trust store (HTTPS may go through a proxy with its own CA);
#   - ghcr.io/astral-sh/uv: a scratch image holding the `uv` binary from uv's PyPI wheel.
# The real image still builds FROM the CUDA base for users; what that changes is in the README.
#
# podman runs with its own containers.conf/storage.conf under $STATE (runc, ulimits within this
# session's hard limits): the host's podman configuration is left alone. Base images and the build
# cache stay in $STATE between runs (a second run is warm); `make image-test-clean` removes them.
#
# Environment: IMAGE_TEST_STATE (default .cache/image-test), IMAGE_TEST_PORT (the compose file's 8000),
# DEBIAN_MIRROR (default http://deb.debian.org/debian), IMAGE_TEST_BUILD_TIMEOUT (s, default 3600).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${IMAGE_TEST_STATE:-$ROOT/.cache/image-test}
STATE=$(mkdir -p "$STATE" && cd "$STATE" && pwd)
PORT=8000  # docker-compose.yml publishes 8000:8000
BUILD_TIMEOUT=${IMAGE_TEST_BUILD_TIMEOUT:-3600}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DEBIAN_SUITE=bookworm  # its python3.11 satisfies requires-python (>=3.11,<3.13)
PODMAN_COMPOSE_VERSION=1.6.0
PROJECT=offline-tts  # the compose file's `name:`
SERVICE=tts-cpu
UV=$ROOT/.cache/tools/bin/uv
VENV_PY=$ROOT/.venv/bin/python
SUDO=$([ "$(id -u)" = 0 ] || echo sudo)

T0=$SECONDS
step() { printf '\n==> [%4ds] %s\n' $((SECONDS - T0)) "$*"; }
info() { printf '    %s\n' "$*"; }
fail() { printf '\nFAIL: %s\n' "$*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------
step "Tools: podman, buildah, runc, debootstrap (apt), podman-compose $PODMAN_COMPOSE_VERSION (PyPI)"
need=()
for tool in podman:podman buildah:buildah runc:runc debootstrap:debootstrap newuidmap:uidmap curl:curl ffmpeg:ffmpeg; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
[ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)  # compose's `init: true`
if ((${#need[@]})); then
  info "installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
[ -x "$UV" ] && [ -x "$VENV_PY" ] || fail "run 'make setup' first (uv and .venv are needed)"
COMPOSE=("$UV" tool run --quiet --from "podman-compose==$PODMAN_COMPOSE_VERSION" podman-compose)
info "$(podman --version), runc $(runc --version | awk 'NR==1{print $3}'), podman-compose $("${COMPOSE[@]}" --version 2>/dev/null | awk '/podman-compose/{print $NF}' | head -1)"

# podman configuration used only by this script.
mkdir -p "$STATE/storage" "$STATE/run" "$STATE/tmp"
# runc cannot raise a limit above the session's hard limit (no CAP_SYS_RESOURCE in this sandbox), and
# here nproc above 32768 is refused even below `ulimit -Hu`: take the lower of the two.
nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
[ "$nofile" = unlimited ] && nofile=1048576
[ "$nproc" = unlimited ] && nproc=1048576
((nofile > 1048576)) && nofile=1048576
((nproc > 32768)) && nproc=32768
cat >"$STATE/containers.conf" <<EOF
# Written by scripts/image-test.sh. crun fails on hybrid cgroups here ("not supported"): runc works.
# runc refuses default ulimits above the session's own hard limits.
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
image_parallel_copies = 2
EOF
cat >"$STATE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$STATE/storage"
runroot = "$STATE/run"
EOF
export CONTAINERS_CONF=$STATE/containers.conf CONTAINERS_STORAGE_CONF=$STATE/storage.conf TMPDIR=$STATE/tmp
export BUILDAH_FORMAT=docker  # the OCI format drops HEALTHCHECK
podman info --format '    storage {{.Store.GraphDriverName}} in {{.Store.GraphRoot}}, runtime {{.Host.OCIRuntime.Name}}' \
  || fail "podman does not work here"

free_gb=$(df -P -BG "$STATE" | awk 'NR==2{print int($4)}')
((free_gb >= 25)) || info "WARNING: ${free_gb} GB free in $STATE; a cold build needs about 25 GB (layers, the wheel cache, a commit's copy)"

# Stop what this run started, whatever happens; keep base images and the build cache ($STATE).
WORK=$(mktemp -d "$STATE/tmp/run.XXXXXX")
SRC=$WORK/src
cleanup() {
  local rc=$?
  set +e
  if [ -f "$SRC/docker-compose.yml" ]; then
    (cd "$SRC" && "${COMPOSE[@]}" --profile cpu down -v -t 5 >/dev/null 2>&1)
  fi
  podman rm -f -t 0 "${PROJECT}_${SERVICE}_1" >/dev/null 2>&1
  podman volume rm -f "${PROJECT}_tts-model" "${PROJECT}_tts-cache" >/dev/null 2>&1
  rm -rf "$WORK"
  if [ "$rc" = 0 ]; then printf '\nimage-test passed in %ds\n' $((SECONDS - T0)); else printf '\nimage-test FAILED (exit %d) after %ds\n' "$rc" $((SECONDS - T0)); fi
}
trap cleanup EXIT

# ------------------------------------------------------------------------------------------------
# The base image names come from the Dockerfile, so a version bump is followed here.
CUDA_IMAGE=$(sed -n 's/^ARG CUDA_IMAGE=//p' "$ROOT/Dockerfile")
UV_IMAGE_VERSION=$(sed -n 's/^ARG UV_VERSION=//p' "$ROOT/Dockerfile")
[ -n "$CUDA_IMAGE" ] && [ -n "$UV_IMAGE_VERSION" ] || fail "ARG CUDA_IMAGE / UV_VERSION not found in the Dockerfile"

step "Stand-in for $CUDA_IMAGE: Debian $DEBIAN_SUITE rootfs (debootstrap) + python3.11 + this host's CAs"
# HTTPS from inside the build may be intercepted by a proxy whose CA only the host trusts: take the
# host's CA bundle (and its locally added CAs, which apt's ca-certificates keeps in the runtime stage).
HOST_CA_BUNDLE=${SSL_CERT_FILE:-$(python3 -c 'import ssl; print(ssl.get_default_verify_paths().openssl_cafile)')}
[ -r "$HOST_CA_BUNDLE" ] || fail "no CA bundle found on this host (SSL_CERT_FILE)"
ca_sum=$(cat "$HOST_CA_BUNDLE" /usr/local/share/ca-certificates/*.crt 2>/dev/null | sha256sum | cut -c1-12)
if podman image exists "$CUDA_IMAGE" && [ "$(podman image inspect -f '{{index .Labels "image-test.ca"}}' "$CUDA_IMAGE" 2>/dev/null)" = "$ca_sum" ]; then
  info "present (built by an earlier run)"
else
  rootfs=$STATE/rootfs
  rm -rf "$rootfs"
  timeout 1800 debootstrap --variant=minbase --include=python3.11 "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" \
    >"$STATE/debootstrap.log" 2>&1 || { tail -20 "$STATE/debootstrap.log"; fail "debootstrap failed (log: $STATE/debootstrap.log)"; }
  mkdir -p "$rootfs/usr/local/share/ca-certificates" "$rootfs/etc/ssl/certs"
  cp "$HOST_CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change "LABEL image-test.ca=$ca_sum" \
    --change 'CMD ["/bin/bash"]' - "$CUDA_IMAGE" >/dev/null
  rm -rf "$rootfs"
  info "imported as $CUDA_IMAGE ($(podman image inspect -f '{{.Size}}' "$CUDA_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"
fi

UV_IMAGE=ghcr.io/astral-sh/uv:$UV_IMAGE_VERSION
step "Stand-in for $UV_IMAGE: scratch image with uv from its PyPI wheel"
if podman image exists "$UV_IMAGE"; then
  info "present"
else
  mkdir -p "$WORK/uv"
  PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$ROOT/.cache/tools/bin/pip" download -q --no-deps --only-binary=:all: --dest "$WORK/uv" "uv==$UV_IMAGE_VERSION"
  (cd "$WORK/uv" && "$VENV_PY" -m zipfile -e uv-*.whl wheel && install -m 0755 wheel/uv-*.data/scripts/uv uv \
     && install -m 0755 wheel/uv-*.data/scripts/uvx uvx)
  printf 'FROM scratch\nCOPY uv uvx /\n' >"$WORK/uv/Containerfile"
  podman build -q -t "$UV_IMAGE" "$WORK/uv" >/dev/null
  info "built"
fi

# ------------------------------------------------------------------------------------------------
step "Working copy of the project (tracked and new files; the user's ./voices is not touched)"
mkdir -p "$SRC"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
   | tar --null --files-from=- --ignore-failed-read -c 2>/dev/null) | tar -x -C "$SRC"
info "$(find "$SRC" -type f | wc -l) files in $SRC"

# Builds do not read default_ulimits from containers.conf: pass them.
BUILD_ARGS=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=$nproc:$nproc" --build-arg PYTHON_PREFERENCE=only-system --build-arg APP_UID=1000)
build() {  # the time of one build, in seconds, on stdout; its log in $1
  local log=$1 start=$SECONDS
  timeout "$BUILD_TIMEOUT" podman build --pull=never "${BUILD_ARGS[@]}" -t offline-tts:latest "$SRC" >"$log" 2>&1 \
    || { tail -40 "$log" >&2; fail "podman build failed (log: $log)"; }
  echo $((SECONDS - start))
}

step "Build the Dockerfile (the first run here is cold: torch & co. are downloaded; log: $STATE/build.log)"
cold_s=$(build "$STATE/build.log")
deps_cached=$(grep -c 'Using cache' "$STATE/build.log" || true)
info "build: ${cold_s} s ($deps_cached steps from the cache)"

step "Rebuild after a source-only change (must reuse the dependency layer: no download)"
marker="image-test $(date +%s%N)"
printf '\n# %s\n' "$marker" >>"$SRC/src/offline_tts/__init__.py"
warm_s=$(build "$STATE/rebuild.log")
podman run --rm --no-healthcheck --entrypoint sh offline-tts:latest -c \
  'cat "$(python -c "import offline_tts; print(offline_tts.__file__)")"' | grep -qF "$marker" \
  || fail "the rebuilt image does not hold the edited source (a stale build cache)"
dep_line=$(grep -n 'uv sync --frozen --no-dev --no-install-project' "$STATE/rebuild.log" | head -1 | cut -d: -f1)
sed -n "$((dep_line + 1))p" "$STATE/rebuild.log" | grep -q 'Using cache' \
  || { sed -n "$dep_line,$((dep_line + 5))p" "$STATE/rebuild.log"; fail "the dependency layer was rebuilt after a source-only change"; }
if grep -qiE 'Downloading|Downloaded' "$STATE/rebuild.log"; then fail "the rebuild downloaded something"; fi
info "rebuild: ${warm_s} s, dependency layer from the cache, nothing downloaded; the image holds the edit"

step "Image"
podman image inspect -f '{{json .Config.Healthcheck}}' offline-tts:latest | grep -q '/health' \
  || fail "the image has no HEALTHCHECK (BUILDAH_FORMAT=docker keeps it)"
podman image inspect -f '{{.Config.User}}' offline-tts:latest | grep -qx '1000:1000' || fail "the image does not run as 1000:1000"
size=$(podman image inspect -f '{{.Size}}' offline-tts:latest)
base=$(podman image inspect -f '{{.Size}}' "$CUDA_IMAGE")
breakdown=$(podman run --rm --no-healthcheck --entrypoint python offline-tts:latest -c '
import pathlib, site
sp = pathlib.Path(site.getsitepackages()[0])
def du(p): return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink()) if p.is_dir() else 0
venv, torch, nvidia, triton = (du(p) / 1e9 for p in (pathlib.Path("/app/.venv"), sp / "torch", sp / "nvidia", sp / "triton"))
print(f"venv {venv:.2f} GB: torch {torch:.2f} GB, nvidia-* CUDA libraries {nvidia:.2f} GB, triton {triton:.2f} GB")')
info "offline-tts:latest $(awk -v s="$size" 'BEGIN{printf "%.2f GB", s/1e9}') (stand-in base $(awk -v s="$base" 'BEGIN{printf "%.2f GB", s/1e9}')); $breakdown"
info "HEALTHCHECK present, USER 1000:1000"

# ------------------------------------------------------------------------------------------------
# The flow itself (clip, model volume, compose up, requests, restart, stop) is in image_flow.py.
step "Compose flow"
export IMAGE_TEST_SRC=$SRC IMAGE_TEST_PORT=$PORT IMAGE_TEST_PROJECT=$PROJECT IMAGE_TEST_SERVICE=$SERVICE
export IMAGE_TEST_BUILD_ARGS="${BUILD_ARGS[*]}" IMAGE_TEST_COMPOSE="${COMPOSE[*]}"
"$VENV_PY" "$ROOT/scripts/image_flow.py"

step "Summary"
info "build ${cold_s} s ($deps_cached steps from the cache: 0 on a first, cold run), rebuild after a source change ${warm_s} s"
info "image $(awk -v s="$size" 'BEGIN{printf "%.2f GB", s/1e9}'); $breakdown"
info "podman storage in $STATE: $(du -sh "$STATE/storage" 2>/dev/null | cut -f1) (kept for the next run; make image-test-clean)"
