"""The native HTTP API, end to end against the real server: status, defaults, batch, stream, voice names
and clip formats. The contract shapes here are what existing users' scripts rely on."""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from helpers import WAV_HEADER as HEADER
from helpers import (ServerProcess, assert_error, cache_counts, ffmpeg_decode, ffmpeg_decode_file, make_clip,
                     pcm_seconds, wav_info)
from offline_tts.text import split_sentences

ONE_SENTENCE = "Hola mundo."
# 600+ characters: several sentences, one of them a run-on over the Spanish limit (239), so it must be cut.
LONG_TEXT = (
    "Esta es la primera frase de un texto largo que el servicio tiene que leer completo. "
    "La segunda frase explica que el texto se divide en frases antes de generar el audio. "
    "La tercera es una frase muy larga, con muchas cláusulas separadas por comas, que sigue y sigue, "
    "que habla del tiempo, del mar, de las montañas, de los ríos y de las ciudades, de la gente que "
    "camina por las calles y de los coches que pasan, sin un solo punto que la corte, hasta superar el "
    "límite de caracteres del modelo. "
    "La cuarta frase comprueba que nada se pierde por el camino, ni una sola palabra. "
    "Y la última frase cierra el texto."
)


def computed(srv: ServerProcess) -> float:
    """How many voice conditionings the server has computed since it started (tts_voice_cache_misses)."""
    return cache_counts(srv)["misses"]


@pytest.fixture
def add_voice(server: ServerProcess) -> Iterator[Callable[..., Path]]:
    """Put clips into the session server's voices/ for one test, and take them out afterwards."""
    added: list[Path] = []

    def add(filename: str, **clip_args) -> Path:
        path = make_clip(server.voices_dir / filename, **clip_args)
        added.append(path)
        return path

    yield add
    for path in added:
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def config_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A private server for the defaults (they are global state and must survive a restart)."""
    srv = ServerProcess(tmp_path_factory.mktemp("config"), tiny_model_dir)
    make_clip(srv.voices_dir / "my_voice_sample.mp3", seconds=6)
    make_clip(srv.voices_dir / "bob.wav", seconds=5, freq=140, rate=22050, channels=1)
    make_clip(srv.voices_dir / "carla.flac", seconds=5, freq=260, rate=48000, channels=2)
    srv.start()
    srv.first_root = httpx.get(srv.url + "/", timeout=10)  # before any test changes the defaults
    yield srv
    srv.stop()


# -- GET / --------------------------------------------------------------------------------------------
def test_root_contract_on_a_fresh_server(config_server: ServerProcess) -> None:
    r = config_server.first_root
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert (body["status"], body["message"]) == ("online", "TTS service is running")
    assert body["config"] == {"voice_sample": None, "language": "es"}


# -- POST /api/config ---------------------------------------------------------------------------------
def test_setting_a_voice_conditions_it_right_away(config_server: ServerProcess) -> None:
    with config_server.client() as c:
        before = computed(config_server)
        r = c.post("/api/config", json={"voice_sample": "bob.wav"})
        assert r.status_code == 200, r.text
        assert r.json()["config"]["voice_sample"] == "bob.wav"
        assert computed(config_server) == before + 1  # computed while answering /api/config
        assert c.get("/").json()["config"]["voice_sample"] == "bob.wav"
        r = c.post("/api/tts/batch", json={"text": ONE_SENTENCE})  # voice and language from the defaults
        assert r.status_code == 200, r.text
        assert wav_info(r.content)[:2] == (24_000, 1)
        assert computed(config_server) == before + 1, "the default voice was conditioned again"


def test_language_alone_keeps_the_voice(config_server: ServerProcess) -> None:
    with config_server.client() as c:
        assert c.post("/api/config", json={"voice_sample": "bob"}).status_code == 200
        r = c.post("/api/config", json={"language": "en"})
        assert r.status_code == 200, r.text
        assert r.json()["config"] == {"voice_sample": "bob", "language": "en"}
        r = c.post("/api/config", json={"language": "es"})
        assert r.json()["config"] == {"voice_sample": "bob", "language": "es"}


# (a refused default keeping the old one: test_refusals_unit.py)
def test_defaults_survive_a_restart(config_server: ServerProcess) -> None:
    before = computed(config_server)
    with config_server.client() as c:
        r = c.post("/api/config", json={"voice_sample": "carla.flac", "language": "en"})
        assert r.status_code == 200, r.text
    assert computed(config_server) == before + 1
    config_server.restart()
    with config_server.client() as c:
        assert c.get("/").json()["config"] == {"voice_sample": "carla.flac", "language": "en"}
        r = c.post("/api/tts/batch", json={"text": "Hello world."})
        assert r.status_code == 200, r.text
        # the default voice's conditioning came back from the disk cache, not recomputed (counters restart at 0)
        assert cache_counts(config_server)["misses"] == 0 and cache_counts(config_server)["disk_hits"] >= 1
        # clearing the voice is allowed too; then a request without a voice is refused clearly
        r = c.post("/api/config", json={"voice_sample": None, "language": "es"})
        assert r.status_code == 200, r.text
        assert r.json()["config"] == {"voice_sample": None, "language": "es"}
        assert_error(c.post("/api/tts/batch", json={"text": ONE_SENTENCE}), 400, "no_voice")


# -- batch --------------------------------------------------------------------------------------------
def test_batch_is_one_complete_wav(server: ServerProcess) -> None:
    r = httpx.post(server.url + "/api/tts/batch", timeout=120,
                   json={"text": ONE_SENTENCE, "voice_sample": "my_voice_sample.mp3", "language": "es"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    data = r.content
    assert int(r.headers["content-length"]) == len(data)
    # RIFF header with the real sizes: 24 kHz, mono, PCM16
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    assert struct.unpack("<HHIIHH", data[20:36]) == (1, 1, 24_000, 48_000, 2, 16)
    assert data[36:40] == b"data" and struct.unpack("<I", data[40:44])[0] == len(data) - HEADER
    rate, channels, frames = wav_info(data)
    assert (rate, channels, frames) == (24_000, 1, (len(data) - HEADER) // 2)
    assert ffmpeg_decode(data) == (24_000, pytest.approx(frames / 24_000, abs=1e-3))
    assert frames / 24_000 > 0.3


# -- stream -------------------------------------------------------------------------------------------
def test_stream_of_a_long_text(server: ServerProcess, tmp_path: Path) -> None:
    """Chunked WAV that decodes completely; first audio long before the end; a 600+ character text is
    split into sentences and spoken completely (never truncated)."""
    assert len(LONG_TEXT) > 600
    pieces = split_sentences(LONG_TEXT, "es", 239)
    assert len(pieces) >= 5 and max(map(len, pieces)) <= 239
    one = httpx.post(server.url + "/api/tts/batch", timeout=120,
                     json={"text": ONE_SENTENCE, "voice_sample": "my_voice_sample", "language": "es"})
    assert one.status_code == 200, one.text
    data, reads = bytearray(), 0
    first_audio = None
    with server.client() as c:
        started = time.perf_counter()
        with c.stream("POST", "/api/tts/stream", json={"text": LONG_TEXT, "voice_sample": "my_voice_sample"}) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"] == "audio/wav"
            assert r.headers.get("transfer-encoding") == "chunked"
            assert "content-length" not in r.headers
            for piece in r.iter_raw():
                data += piece
                reads += 1
                if first_audio is None and len(data) > HEADER:
                    first_audio = time.perf_counter() - started
        total = time.perf_counter() - started
    assert first_audio is not None and reads > 2
    # The first sentence streams while the others are generated: first audio comes well before the end.
    assert first_audio < total / 3, f"first audio after {first_audio:.2f} s, whole stream {total:.2f} s"
    # Saved as a file (curl --output), it decodes completely with ffmpeg.
    assert data[:4] == b"RIFF" and data[36:40] == b"data"
    path = tmp_path / "stream_output.wav"
    path.write_bytes(bytes(data))
    assert ffmpeg_decode_file(path) == (len(data) - HEADER) // 2
    assert (len(data) - HEADER) % 2 == 0
    # Every sentence was spoken: each is capped at the same number of audio tokens by the test server
    # (TTS_MAX_AUDIO_TOKENS), so the long text lasts about len(pieces) times a one-sentence text.
    assert pcm_seconds(bytes(data)) >= 0.9 * len(pieces) * pcm_seconds(one.content)


# -- voice names --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["my_voice_sample.mp3", "my_voice_sample", "ana.wav", "ana", " ana.wav "])
def test_voice_names_with_and_without_extension(server: ServerProcess, name: str) -> None:
    r = httpx.post(server.url + "/api/tts/batch", timeout=120, json={"text": ONE_SENTENCE, "voice_sample": name})
    assert r.status_code == 200, r.text
    assert wav_info(r.content)[:2] == (24_000, 1)


def test_ambiguous_stem(server: ServerProcess, add_voice: Callable[..., Path]) -> None:
    add_voice("dup.wav", seconds=4, freq=200, rate=22050, channels=1)
    add_voice("dup.ogg", seconds=4, freq=300, rate=48000, channels=2)
    with server.client() as c:
        error = assert_error(c.post("/api/tts/batch", json={"text": ONE_SENTENCE, "voice_sample": "dup"}), 404)
        assert "ambiguous" in error["message"] and "dup.wav" in error["message"] and "dup.ogg" in error["message"]
        assert "extension" in error["hint"]
        for name in ("dup.wav", "dup.ogg"):  # the full file name is never ambiguous
            r = c.post("/api/tts/batch", json={"text": ONE_SENTENCE, "voice_sample": name})
            assert r.status_code == 200, r.text


# -- clip formats -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("filename", "rate", "channels"), [
    ("fmt_wav.wav", 8_000, 1),
    ("fmt_mp3.mp3", 44_100, 2),
    ("fmt_ogg.ogg", 48_000, 2),
    ("fmt_flac.flac", 96_000, 1),
    ("fmt_m4a.m4a", 32_000, 2),
    ("fmt_mp4.mp4", 44_100, 1),  # a video file with an audio track
    ("fmt_wav16.wav", 16_000, 2),
])
def test_clip_formats(server: ServerProcess, add_voice: Callable[..., Path], filename: str, rate: int, channels: int) -> None:
    path = add_voice(filename, seconds=4, rate=rate, channels=channels)
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "stream=codec_type,sample_rate,channels",
                            "-of", "csv=p=0", str(path)], capture_output=True, text=True, check=True).stdout
    streams = probe.split()
    assert f"audio,{rate},{channels}" in streams, probe  # the test clip really is what it claims
    assert ("video" in streams) == filename.endswith(".mp4")
    before = computed(server)
    r = httpx.post(server.url + "/api/tts/batch", timeout=120, json={"text": ONE_SENTENCE, "voice_sample": filename})
    assert r.status_code == 200, r.text
    assert wav_info(r.content)[:2] == (24_000, 1)
    assert computed(server) == before + 1  # a new clip: conditioned once
