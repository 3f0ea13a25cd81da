"""The linear-cost streaming decoder: streamed audio equals the one-shot (batch) audio, seams included.

On greedy decoding the GPT emits the same latents for `stream` and `synthesize`, so any difference
between the two outputs comes from decoding in chunks. Measures: Pearson correlation and SNR
(reference energy / difference energy, in dB) over the whole sentence and in a window around every
seam between streamed chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from offline_tts.engine.base import StreamPlan
from offline_tts.engine.streaming import ChunkDecoder
from offline_tts.engine.xtts import XttsEngine

TOKENS = 64  # audio tokens per sentence (~3 s): 3 chunks with the default plan (8, then 24, then the rest)
SEAM_WINDOW = 1024  # samples each side of a seam (~43 ms at 24 kHz)
MIN_SNR_DB = 60.0
MIN_CORRELATION = 0.999
TEXT = "Hola, esta es una frase de prueba para comparar el audio por trozos con el audio entero."


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> XttsEngine:
    return XttsEngine(tiny_model_dir, "cpu", greedy=True, max_audio_tokens=TOKENS)


@pytest.fixture(scope="module")
def conditioning(engine: XttsEngine):
    t = np.arange(engine.conditioning_sample_rate * 4) / engine.conditioning_sample_rate
    clip = (0.3 * np.sin(2 * np.pi * 180 * t + 3 * np.sin(2 * np.pi * 5 * t))).astype(np.float32)
    return engine.compute_conditioning([clip])


def compare(engine: XttsEngine, conditioning, speed: float, plan: StreamPlan) -> tuple[np.ndarray, list[int]]:
    batch = engine.synthesize(TEXT, "es", conditioning, speed=speed)
    chunks = list(engine.stream(TEXT, "es", conditioning, speed=speed, plan=plan))
    streamed = np.concatenate(chunks)
    seams = list(np.cumsum([len(c) for c in chunks])[:-1])

    assert len(chunks) >= 3, "the sentence should stream in several chunks"
    assert len(streamed) == len(batch)
    assert np.abs(batch).max() > 1e-3, "the reference audio is silent: nothing to compare"
    assert correlation(batch, streamed) > MIN_CORRELATION
    assert snr_db(batch, streamed) > MIN_SNR_DB
    for seam in seams:
        lo, hi = max(0, seam - SEAM_WINDOW), min(len(batch), seam + SEAM_WINDOW)
        ref, got = batch[lo:hi], streamed[lo:hi]
        assert snr_db(ref, got) > MIN_SNR_DB, f"seam at sample {seam}: SNR {snr_db(ref, got):.1f} dB"
        assert correlation(ref, got) > MIN_CORRELATION, f"seam at sample {seam}"
    return streamed, seams


@pytest.mark.parametrize("speed", [1.0, 1.35, 0.8])
def test_streamed_audio_matches_batch_audio(engine, conditioning, speed):
    compare(engine, conditioning, speed, StreamPlan())  # the service's default plan


def test_small_chunks_still_match(engine, conditioning):
    plan = StreamPlan(first_chunk_tokens=4, chunk_tokens=7, max_chunk_tokens=7, context_tokens=4)
    _, seams = compare(engine, conditioning, 1.0, plan)
    assert len(seams) >= 8


def test_chunk_lengths_follow_the_plan(engine, conditioning):
    """A small first chunk (early first audio), then larger ones; nothing lost at the end."""
    plan = StreamPlan(first_chunk_tokens=8, chunk_tokens=24, max_chunk_tokens=96, context_tokens=4)
    chunks = list(engine.stream(TEXT, "es", conditioning, plan=plan))
    samples_per_token = engine.sample_rate * 1024 / 22_050  # one GPT audio token = 1024 samples at 22.05 kHz
    assert len(chunks[0]) < len(chunks[1])
    assert len(chunks[0]) <= plan.first_chunk_tokens * samples_per_token + 1
    assert abs(sum(map(len, chunks)) - TOKENS * samples_per_token) <= samples_per_token


def test_coqui_inference_stream_is_not_used(engine, conditioning, monkeypatch):
    """coqui's `Xtts.inference_stream` re-decodes everything per chunk (quadratic): the engine must not call it."""
    from TTS.tts.models.xtts import Xtts

    def forbidden(*args, **kwargs):
        raise AssertionError("Xtts.inference_stream was called")

    monkeypatch.setattr(Xtts, "inference_stream", forbidden)
    monkeypatch.setattr(type(engine.model.hifigan_decoder), "forward", forbidden)  # the full-decode entry point
    chunks = list(engine.stream("Hola.", "es", conditioning))
    assert sum(map(len, chunks)) > 0


# -- ChunkDecoder alone, with a fake model -----------------------------------------------------------

class FakeVocoder:
    """A local convolution over grid columns (receptive field +-2 columns), upsampled by `hop`; counts its work."""

    hop = 256  # as XTTS: the 256-sample cross-fade spans one grid column

    def __init__(self):
        self.columns = 0
        self.calls = 0
        self.kernel = torch.tensor([[[0.1, 0.2, 0.4, 0.2, 0.1]]])

    def to_grid(self, latents: torch.Tensor) -> torch.Tensor:  # [1, T, C] -> [1, C, ~4.35 T] as XTTS does
        z = F.interpolate(latents.transpose(1, 2), scale_factor=4.0, mode="linear")
        return F.interpolate(z, scale_factor=24_000 / 22_050, mode="linear")

    def vocode(self, grid: torch.Tensor) -> np.ndarray:
        self.calls += 1
        self.columns += grid.shape[-1]
        x = grid.mean(dim=1, keepdim=True)
        y = F.conv1d(F.pad(x, (2, 2), mode="replicate"), self.kernel)
        return y.repeat_interleave(self.hop, dim=-1).reshape(-1).numpy()


def run_decoder(frames: int, chunk: int, context: int = 4) -> tuple[FakeVocoder, np.ndarray, np.ndarray]:
    fake = FakeVocoder()
    latents = torch.randn(frames, 8, generator=torch.Generator().manual_seed(frames))
    cpf = 4.0 * 24_000 / 22_050
    decoder = ChunkDecoder(fake.to_grid, fake.vocode, cpf, fake.hop, context_frames=context)
    parts, next_flush = [], chunk
    for latent in latents:
        decoder.add(latent)
        if decoder.frames >= next_flush:
            next_flush += chunk
            parts.append(decoder.flush())
    parts.append(decoder.flush(final=True))
    one_shot = FakeVocoder().vocode(fake.to_grid(latents[None]))
    return fake, np.concatenate(parts), one_shot


def test_chunk_decoder_output_equals_one_shot_decode():
    _, streamed, one_shot = run_decoder(frames=200, chunk=10)
    assert len(streamed) == len(one_shot)
    np.testing.assert_allclose(streamed, one_shot, atol=1e-5)


@pytest.mark.parametrize("chunk", [4, 24])
def test_chunk_decoder_cost_is_linear(chunk):
    """Grid columns vocoded in total grow linearly with the sentence: at most (chunk + context) per chunk.

    coqui's inference_stream vocodes all columns so far at every chunk: ~n^2 / (2 chunk) columns.
    """
    totals = {}
    for frames in (100, 200, 400, 800):
        fake, _, one_shot = run_decoder(frames, chunk)
        grid_columns = len(one_shot) // fake.hop
        totals[frames] = fake.columns
        # Each call vocodes its new columns + 4 frames of left context + 2 frames of right margin.
        per_call_overhead = (4 + 2 + 1) * 4.0 * 24_000 / 22_050
        assert fake.columns <= grid_columns + fake.calls * per_call_overhead
    assert totals[800] / totals[400] < 2.2 and totals[400] / totals[100] < 4.4  # linear, not quadratic (4x / 16x)
    quadratic = sum(range(chunk, 800 + 1, chunk)) * 4.0 * 24_000 / 22_050
    assert totals[800] < quadratic / 4


def test_int8_gpt_mode_streams_like_batch(tiny_model_dir: Path, conditioning):
    """The optional CPU int8 GPT (engine/quantize.py) changes the latents a little, not the streaming."""
    from offline_tts.engine.quantize import is_quantized, quantize_gpt_int8

    engine = XttsEngine(tiny_model_dir, "cpu", greedy=True, max_audio_tokens=60)
    fp32 = engine.synthesize(TEXT, "es", conditioning)
    assert quantize_gpt_int8(engine.model) == 8  # 2 blocks x (qkv, attention out, MLP in, MLP out)
    assert is_quantized(engine.model) and quantize_gpt_int8(engine.model) == 0
    batch = engine.synthesize(TEXT, "es", conditioning)
    streamed = np.concatenate(list(engine.stream(TEXT, "es", conditioning)))
    assert len(batch) == len(streamed) == len(fp32)
    assert not np.array_equal(batch, fp32)  # the int8 GPT did run
    assert snr_db(batch, streamed) > MIN_SNR_DB
