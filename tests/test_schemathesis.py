"""Property-based fuzzing of the whole OpenAPI schema against the running server: no 5xx, ever.

Schemathesis's CLI (`st run`) generates valid and invalid requests for every operation from
/openapi.json (examples, coverage, fuzzing and stateful phases), bounded in examples per operation.
Texts are capped and sentences are short (TTS_MAX_TEXT_CHARS, TTS_MAX_AUDIO_TOKENS) so that requests
reaching the model stay cheap.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import BIN, ServerProcess, make_clip

MAX_EXAMPLES = 100


@pytest.fixture(scope="module")
def fuzz_target(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz"), tiny_model_dir,
                        {"TTS_MAX_TEXT_CHARS": "200", "TTS_MAX_AUDIO_TOKENS": "4", "TTS_MAX_QUEUE": "32"})
    make_clip(srv.voices_dir / "my_voice_sample.mp3", seconds=6)  # the voice of the schema's examples
    make_clip(srv.voices_dir / "ana.wav", seconds=6, freq=220)
    srv.start()
    with srv.client() as client:  # a default voice, so generated bodies without one reach the model too
        assert client.post("/api/config", json={"voice_sample": "ana", "language": "es"}).status_code == 200
    yield srv
    srv.stop()


@pytest.mark.timeout(900)
def test_no_server_error_for_any_generated_request(fuzz_target, tmp_path):
    cmd = [str(BIN / "st"), "run", f"{fuzz_target.url}/openapi.json",
           "--checks", "not_a_server_error", "--max-examples", str(MAX_EXAMPLES), "--seed", "20251125",
           "--workers", "1", "--request-timeout", "120", "--no-color"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=840)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert re.search(r"\d+ generated, \d+ passed", output), output[-3000:]
    # The server's own account agrees: not one 5xx in its access log.
    statuses = re.findall(r" status=(\d{3}) ", fuzz_target.log())
    assert len(statuses) > 100
    assert not [s for s in statuses if s.startswith("5")], sorted(set(statuses))
    assert "Traceback" not in fuzz_target.log()
