"""Response encoders: every format decodes, streams before the source ends, and cleans up after itself;
the native endpoints' optional `format`."""

from __future__ import annotations

import asyncio
import os
import struct

import anyio
import numpy as np
import psutil
import pytest

from helpers import RATE, WAV_HEADER, decoded_seconds, ffmpeg_decode, wav_stream_info
from offline_tts import encoders
from offline_tts.errors import UnsupportedFormat

COMPRESSED = ("mp3", "opus", "aac", "flac")
DECODED_RATE = {"mp3": 24_000, "opus": 48_000, "aac": 24_000, "flac": 24_000}  # Opus always decodes at 48 kHz
MEDIA_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
               "wav": "audio/wav", "pcm": "audio/pcm"}


def tone(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


async def chunks_of(seconds: float, chunk_s: float = 0.25):
    for _ in range(round(seconds / chunk_s)):
        yield tone(chunk_s)
        await asyncio.sleep(0)


def ffmpeg_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.name() == "ffmpeg"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def collect(gen) -> bytes:
    return b"".join([part async for part in gen])


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_formats_decode_at_the_right_rate_and_length(name):
    data = asyncio.run(collect(encoders.encode(chunks_of(2.0), encoders.FORMATS[name], RATE)))
    rate, seconds = ffmpeg_decode(data)
    assert rate == DECODED_RATE[name]
    assert abs(seconds - 2.0) < 0.15, seconds  # codec priming/padding only


def test_wav_and_pcm_are_exact():
    wav = asyncio.run(collect(encoders.encode(chunks_of(1.5), encoders.FORMATS["wav"], RATE)))
    assert wav_stream_info(wav) == (RATE, 1, 1.5)
    pcm = asyncio.run(collect(encoders.encode(chunks_of(1.5), encoders.FORMATS["pcm"], RATE)))
    assert pcm == wav[WAV_HEADER:]
    assert len(pcm) == int(1.5 * RATE) * 2


@pytest.mark.parametrize("name", [*COMPRESSED, "wav", "pcm"])
def test_encode_all_makes_a_complete_file(name):
    fmt = encoders.FORMATS[name]
    data = asyncio.run(encoders.encode_all(tone(1.0), fmt, RATE))
    if name == "pcm":
        assert len(data) == RATE * 2
        return
    rate, seconds = ffmpeg_decode(data)
    assert rate == DECODED_RATE.get(name, RATE)
    assert abs(seconds - 1.0) < 0.15


def test_formats_and_media_types():
    assert {n: f.media_type for n, f in encoders.FORMATS.items()} == MEDIA_TYPES
    assert encoders.check_format(None, "mp3").name == "mp3"
    assert encoders.check_format(" FLAC ", "mp3").name == "flac"
    with pytest.raises(UnsupportedFormat) as err:
        encoders.check_format("ogg", "mp3", param="format")
    assert err.value.param == "format" and "mp3, opus, aac, flac, wav, pcm" in err.value.hint


# -- streaming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", COMPRESSED)
def test_audio_comes_out_before_the_source_ends(name):
    """The source holds back its last chunk until the consumer has decodable audio: an encoder that
    waited for the end would never get it (the source then fails and so does the test)."""

    async def main() -> None:
        has_audio = asyncio.Event()

        async def source():
            for _ in range(6):
                yield tone(0.25)
            await asyncio.wait_for(has_audio.wait(), timeout=60)
            yield tone(0.25)

        got, checked = bytearray(), 0
        async for part in encoders.encode(source(), encoders.FORMATS[name], RATE):
            got += part
            if not has_audio.is_set() and len(got) - checked >= 256:
                checked = len(got)
                if decoded_seconds(bytes(got)) >= 0.5:
                    has_audio.set()
        assert has_audio.is_set()
        assert ffmpeg_decode(bytes(got))[1] > 1.6

    asyncio.run(main())


# -- clean-up --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mp3", "opus"])
def test_closing_early_kills_ffmpeg_and_closes_the_source(name):
    async def main() -> None:
        source_closed = asyncio.Event()
        stopped = []

        async def source():
            try:
                while True:
                    yield tone(0.25)
                    await asyncio.sleep(0.01)
            finally:
                source_closed.set()

        fds = open_fds()
        gen = encoders.encode(source(), encoders.FORMATS[name], RATE, stop=lambda: stopped.append(True))
        async for _ in gen:
            assert len(ffmpeg_children()) == 1
            break
        await gen.aclose()
        assert stopped == [True]
        assert source_closed.is_set()
        assert ffmpeg_children() == []  # killed and reaped: no zombie
        assert open_fds() == fds  # no pipe left open

    asyncio.run(main())


def test_cancellation_like_a_client_disconnect_cleans_up():
    """Starlette cancels the response's task group when the client leaves (anyio: the cancellation is
    re-delivered at every await); the encoder must still kill and reap ffmpeg and close the source."""

    async def main() -> None:
        source_closed = asyncio.Event()
        reading = asyncio.Event()

        async def source():
            try:
                while True:
                    yield tone(0.25)
                    await asyncio.sleep(0.05)
            finally:
                source_closed.set()

        async def consume() -> None:
            async for _ in encoders.encode(source(), encoders.FORMATS["aac"], RATE):
                reading.set()

        fds = open_fds()
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await reading.wait()
            tg.cancel_scope.cancel()
        assert source_closed.is_set()
        assert ffmpeg_children() == []
        assert open_fds() == fds

    asyncio.run(main())


def test_a_failing_source_ends_the_container_cleanly_then_raises():
    async def main() -> None:
        async def source():
            for _ in range(4):
                yield tone(0.25)
            raise RuntimeError("model fault")

        got = bytearray()
        with pytest.raises(RuntimeError, match="model fault"):
            async for part in encoders.encode(source(), encoders.FORMATS["flac"], RATE):
                got += part
        rate, seconds = ffmpeg_decode(bytes(got))  # what was sent is a complete, decodable file
        assert rate == RATE and abs(seconds - 1.0) < 0.15
        assert ffmpeg_children() == []

    asyncio.run(main())


# -- native endpoints ------------------------------------------------------------------------------
def test_native_batch_default_stays_wav(server):
    with server.client() as client:
        r = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana"})
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.content[:4] == b"RIFF"
    assert struct.unpack("<I", r.content[40:44])[0] == len(r.content) - WAV_HEADER  # exact sizes in a batch file


@pytest.mark.parametrize("name", ["mp3", "flac", "pcm"])
def test_native_batch_with_format(server, name):
    with server.client() as client:
        wav = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana"}).content
        r = client.post("/api/tts/batch", json={"text": "Hola mundo.", "voice_sample": "ana", "format": name})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == MEDIA_TYPES[name]
    expected = (len(wav) - WAV_HEADER) / 2 / RATE
    if name == "pcm":
        assert r.content == wav[WAV_HEADER:]
        return
    rate, seconds = ffmpeg_decode(r.content)
    assert rate == RATE and abs(seconds - expected) < 0.15


@pytest.mark.parametrize("name", ["opus", "aac", "wav"])
def test_native_stream_with_format(server, name):
    with server.client() as client:
        with client.stream("POST", "/api/tts/stream",
                           json={"text": "Hola mundo. Otra frase.", "voice_sample": "ana", "format": name}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == MEDIA_TYPES[name]
            data = b"".join(r.iter_bytes())
    if name == "wav":
        rate, _, seconds = wav_stream_info(data)
    else:
        rate, seconds = ffmpeg_decode(data)
    assert rate == DECODED_RATE.get(name, RATE)
    assert 0.5 < seconds < 4.0  # two sentences, each capped by TTS_MAX_AUDIO_TOKENS=24 (about 1 s)


def test_native_unknown_format_is_refused(server):
    with server.client() as client:
        r = client.post("/api/tts/stream", json={"text": "Hola.", "voice_sample": "ana", "format": "ogg"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "unsupported_format" and err["param"] == "format" and "mp3" in err["hint"]
