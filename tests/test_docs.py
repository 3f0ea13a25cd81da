"""The README's reference parts match the code: its settings table is exactly the `Settings` fields, each with
its real default; every route it names (in prose or in a curl example) is served by the app; every metric it
lists is on /metrics."""

from __future__ import annotations

import re
import shlex

import pytest
from pydantic_core import PydanticUndefined
from starlette.routing import Match

from helpers import ROOT, metrics
from offline_tts.app import create_app
from offline_tts.config import Settings
from test_readme import curl_commands

pytestmark = pytest.mark.unit

README = (ROOT / "README.md").read_text(encoding="utf-8")
# Defaults computed at startup or too long for the table: the README describes them in words instead.
DESCRIBED_DEFAULTS = {"torch_threads": "CPU cores - 1 (at least 1)", "model_url": "`pinned XTTS-v2 revision`"}


def settings_table() -> dict[str, str]:
    """{"TTS_X": default cell} of the README's configuration table, in order, each variable once."""
    rows = re.findall(r"^\| `(TTS_[A-Z0-9_]+)` \| (.*?) \| (.*?) \|$", README, re.M)
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), f"a setting is listed twice: {names}"
    assert all(what.strip() for _, _, what in rows), "a setting without a description"
    return {name: default for name, default, _ in rows}


def test_the_settings_table_is_exactly_the_settings_with_their_defaults():
    table = settings_table()
    fields = Settings.model_fields
    assert list(table) == [f"TTS_{name.upper()}" for name in fields], "the table differs from config.py's fields"
    for name, field in fields.items():
        documented = table[f"TTS_{name.upper()}"]
        if name in DESCRIBED_DEFAULTS:
            assert documented == DESCRIBED_DEFAULTS[name], (name, documented)
            continue
        default = field.default if field.default is not PydanticUndefined else field.default_factory()
        assert documented == f"`{default}`", f"TTS_{name.upper()}: README says {documented}, config.py {default!r}"


def routed(app, method: str, path: str) -> bool:
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


def documented_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the README names: "GET /ready" in prose, and each curl example."""
    routes = set(re.findall(r"\b(GET|POST|DELETE|HEAD|PUT|PATCH) (/[A-Za-z0-9_/{}.-]*)", README))
    for command in curl_commands(README):
        words = shlex.split(command.replace("\\\n", " "))
        url = next(w for w in words if w.startswith("http://localhost:8000"))
        path = url.removeprefix("http://localhost:8000").split("?")[0] or "/"
        if "-X" in words:
            method = words[words.index("-X") + 1]
        elif any(w in ("-F", "-d", "--data", "--data-binary", "--json") for w in words):
            method = "POST"
        else:
            method = "GET"
        routes.add((method, path))
    return routes


def test_every_documented_route_is_served(tmp_path):
    app = create_app(Settings(voices_dir=tmp_path / "v", cache_dir=tmp_path / "c", model_dir=tmp_path / "m"),
                     engine_factory=lambda: None)
    routes = documented_routes()
    assert len(routes) >= 12 and ("POST", "/api/tts/stream") in routes and ("DELETE", "/api/voices/ana") in routes
    assert not routed(app, "GET", "/not-a-route")  # the check itself can say no
    missing = sorted(r for r in routes if not routed(app, *r))
    assert not missing, f"the README names routes the app does not serve: {missing}"


def test_every_documented_metric_is_exported(fake_app):
    section = README[README.index("- `GET /metrics`"):README.index("- API key:")]
    documented = set(re.findall(r"`(tts_[a-z_]+)`", section))
    assert len(documented) >= 20
    client, _ = fake_app()
    assert client.post("/api/tts/batch", json={"text": "Hola.", "voice_sample": "ana"}).status_code == 200
    samples = {re.sub(r"\{.*", "", name) for name in metrics(client)}
    families = set(re.findall(r"^# TYPE (\S+)", client.get("/metrics").text, re.M))
    missing = sorted(documented - samples - families)
    assert not missing, f"the README lists metrics /metrics does not export: {missing}"


def test_quick_start_commands():
    assert re.search(r"^make run\b", README, re.M) and re.search(r"^make test\b", README, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\b", ci, re.M)
