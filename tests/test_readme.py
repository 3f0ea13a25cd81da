"""Every curl example of the README works exactly as written (only the server URL is changed), in order,
against a server that has what the README assumes: voices/my_voice_sample.mp3."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import ROOT, ServerProcess, make_clip

README = ROOT / "README.md"
README_URL = "http://localhost:8000"


def curl_commands(markdown: str) -> list[str]:
    """The curl commands of the README's bash code blocks, each as written (backslash continuations kept)."""
    commands: list[str] = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)[^\n]*\n(.*?)^```", markdown, re.S | re.M):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            command = [line]
            while command[-1].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                command.append(lines[i])
            i += 1
            text = "\n".join(command).strip()
            if re.match(r"^(\$\s*)?curl\s", text):
                commands.append(re.sub(r"^\$\s*", "", text))
    return commands


def output_file(command: str) -> str | None:
    """The file a curl command writes with --output/-o, if any."""
    words = shlex.split(command.replace("\\\n", " "))
    for i, word in enumerate(words[:-1]):
        if word in ("--output", "-o"):
            return words[i + 1]
    return None


def uploaded_files(command: str) -> list[str]:
    """Local files a command sends (`-F files=@clip.wav`, `--data-binary @x`)."""
    return [m.split(";")[0] for m in re.findall(r"@([^\s'\"]+)", command) if not m.startswith("localhost")]


@pytest.fixture(scope="module")
def readme_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A private server holding exactly what the README assumes (the examples change its defaults)."""
    srv = ServerProcess(tmp_path_factory.mktemp("readme"), tiny_model_dir)
    make_clip(srv.voices_dir / "my_voice_sample.mp3", seconds=6)
    srv.start()
    yield srv
    srv.stop()


def test_readme_has_the_examples_the_issue_asks_for() -> None:
    commands = curl_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 5, commands
    joined = "\n".join(commands)
    for path in ("/api/config", "/api/tts/batch", "/api/tts/stream"):
        assert path in joined
    assert '"voice_sample": "my_voice_sample.mp3"' in joined
    assert all(README_URL in c for c in commands), [c for c in commands if README_URL not in c]


def check_audio(path: Path) -> str | None:
    """None when `path` is audio that ffmpeg decodes completely, else what is wrong with it."""
    data = path.read_bytes()
    if data[:1] in (b"{", b"["):
        return f"{path.name} holds JSON, not audio: {data[:500].decode(errors='replace')}"
    out = subprocess.run(["ffmpeg", "-v", "error", "-xerror", "-i", str(path), "-f", "s16le", "-ac", "1", "-"],
                         capture_output=True)
    if out.returncode != 0 or out.stderr.strip():
        return f"{path.name} does not decode: {out.stderr.decode(errors='replace')[:500]}"
    if len(out.stdout) < 2 * 4800:  # at least 0.2 s at 24 kHz
        return f"{path.name} holds almost no audio ({len(out.stdout)} bytes of PCM)"
    return None


def check_json(stdout: str) -> str | None:
    text = stdout.strip()
    if not text:
        return "empty answer"
    if text[0] not in "{[":
        return None  # plain text (e.g. metrics): nothing more to check
    try:
        body = json.loads(text)
    except ValueError as exc:
        return f"answer is not valid JSON ({exc}): {text[:300]}"
    if isinstance(body, dict) and ("error" in body or "detail" in body):
        return f"error answer: {text[:500]}"
    return None


def test_every_curl_example_works(readme_server: ServerProcess, tmp_path: Path) -> None:
    commands = curl_commands(README.read_text(encoding="utf-8"))
    assert commands
    workdir = tmp_path / "readme"
    # The reader's working copy: the README's voice clip, and any local file an example sends.
    make_clip(workdir / "voices" / "my_voice_sample.mp3", seconds=6)
    failures: list[str] = []
    for command in commands:
        for name in uploaded_files(command):
            if not (workdir / name).exists():
                make_clip(workdir / name, seconds=5)
        out_name = output_file(command)
        out_path = workdir / out_name if out_name else None
        if out_path is not None:
            out_path.unlink(missing_ok=True)
        run = subprocess.run(["bash", "-c", command.replace(README_URL, readme_server.url)], cwd=workdir,
                             capture_output=True, text=True, timeout=300)
        problem = None
        if run.returncode != 0:
            problem = f"exit {run.returncode}: {run.stderr.strip()[-500:]}"
        elif out_path is not None:
            problem = check_audio(out_path) if out_path.is_file() else f"{out_name} was not written"
        else:
            problem = check_json(run.stdout)
        if problem:
            failures.append(f"{command}\n  -> {problem}")
    assert not failures, "README examples that fail:\n" + "\n".join(failures) + "\n\nserver log:\n" + readme_server.log()[-3000:]
