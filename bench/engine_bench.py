"""In-process measurements of the engine: conditioning, GPT and HiFi-GAN cost, streaming, coqui's own
streaming ("before"), stream-plan and CPU-mode variants.

The engine is built exactly as the service builds it (`offline_tts.app.xtts_factory`), with greedy
decoding so that every run of the same text yields the same tokens. Timings of the GPT and of HiFi-GAN
are taken by wrapping the engine's own two halves (`latents`, `decoder`), so the streaming code under
test is the service's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from offline_tts.config import Settings
from offline_tts.engine.base import Conditioning, StreamPlan

from .common import LANGUAGE, Timer, Voices, log, text_for_tokens

SEAM_WINDOW = 1024  # samples each side of a seam for the seam SNR


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    n = min(len(reference), len(test))
    ref, got = reference[:n].astype(np.float64), test[:n].astype(np.float64)
    noise = float(np.sum((ref - got) ** 2)) + float(np.sum(reference[n:] ** 2)) + float(np.sum(test[n:] ** 2))
    signal = float(np.sum(ref**2))
    return 999.0 if noise == 0 else round(10 * np.log10(signal / noise), 1)


def seam_snr_db(reference: np.ndarray, chunks: list[np.ndarray]) -> float | None:
    """Worst SNR of the streamed audio against the one-shot decode in a window around each seam."""
    streamed = np.concatenate(chunks)
    seams = np.cumsum([len(c) for c in chunks])[:-1]
    values = [snr_db(reference[max(0, s - SEAM_WINDOW): s + SEAM_WINDOW], streamed[max(0, s - SEAM_WINDOW): s + SEAM_WINDOW])
              for s in seams]
    return min(values) if values else None


def plan_from_settings(settings: Settings) -> StreamPlan:
    """The service's stream plan (Settings.stream_<field> for each StreamPlan field)."""
    return StreamPlan(**{f.name: getattr(settings, "stream_" + f.name) for f in dataclasses.fields(StreamPlan)
                         if hasattr(settings, "stream_" + f.name)})


@dataclass
class Trace:
    """What one generation cost: time per GPT step (the first includes the prompt), HiFi-GAN calls."""

    token_s: list[float] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    vocode_s: float = 0.0
    vocode_calls: int = 0
    vocode_columns: int = 0

    @property
    def gpt_s(self) -> float:
        return sum(self.token_s)

    @property
    def ms_per_token(self) -> float | None:  # steady state: without the first step (prompt processing)
        return 1000 * sum(self.token_s[1:]) / (len(self.token_s) - 1) if len(self.token_s) > 1 else None


@contextlib.contextmanager
def instrumented(engine, trace: Trace, replay: Trace | None = None) -> Iterator[Trace]:
    """Time the engine's GPT steps and HiFi-GAN calls; with `replay`, yield recorded latents instead of
    running the GPT (their recorded step times go to `trace.token_s`)."""
    real_latents, real_decoder = engine.latents, engine.decoder

    def latents(*args, **kwargs):
        if replay is not None:
            for latent, seconds in zip(replay.latents, replay.token_s, strict=True):
                trace.token_s.append(seconds)
                yield latent
            return
        gen = real_latents(*args, **kwargs)
        try:
            while True:
                started = time.perf_counter()
                try:
                    latent = next(gen)
                except StopIteration:
                    return
                trace.token_s.append(time.perf_counter() - started)
                trace.latents.append(latent.detach().clone())
                yield latent
        finally:
            gen.close()

    def decoder(*args, **kwargs):
        to_grid, vocode, *rest = real_decoder(*args, **kwargs)

        def timed_vocode(grid):
            started = time.perf_counter()
            out = vocode(grid)
            trace.vocode_s += time.perf_counter() - started
            trace.vocode_calls += 1
            trace.vocode_columns += int(grid.shape[-1])
            return out

        return (to_grid, timed_vocode, *rest)

    engine.latents, engine.decoder = latents, decoder
    try:
        yield trace
    finally:
        del engine.latents, engine.decoder  # back to the class's methods


class EngineBench:
    def __init__(self, settings: Settings):
        from offline_tts.app import xtts_factory

        if settings.torch_threads:  # as the service's lifespan does
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.plan = plan_from_settings(settings)
        timer = Timer()
        self.engine = xtts_factory(settings)()
        self.load_s = timer()
        self.threads = torch.get_num_threads()
        self.conditioning: Conditioning | None = None

    def close(self) -> None:
        del self.engine
        gc.collect()

    # -- voices -----------------------------------------------------------------------------------
    def measure_conditioning(self, voices: Voices, cache_dir: Path) -> dict:
        """Conditioning of the synthesis voice (raw engine call), then the voice cache on an MP3 clip:
        first use (decode + compute + store), repeat (memory), first use after a restart (disk)."""
        from offline_tts import audio
        from offline_tts.voice_cache import VoiceCache
        from offline_tts.voices import VoiceStore

        engine = self.engine
        clip = audio.decode(voices.dir / voices.speaker, engine.conditioning_sample_rate)
        timer = Timer()
        self.conditioning = engine.compute_conditioning([clip])
        raw_ms = 1000 * timer()

        store = VoiceStore(voices.dir)
        voice = store.resolve(voices.mp3)
        shutil.rmtree(cache_dir, ignore_errors=True)

        async def compute(fn):
            return await asyncio.to_thread(fn, engine)

        async def use(cache: VoiceCache) -> float:
            timer = Timer()
            await cache.get(voice, engine, compute)
            return 1000 * timer()

        async def measure() -> tuple[float, list[float], float, float]:
            cache = VoiceCache(cache_dir, 8, self.settings.min_clip_seconds, live_voices=lambda: ())
            first = await use(cache)
            repeats = [await use(cache) for _ in range(5)]
            restarted = VoiceCache(cache_dir, 8, self.settings.min_clip_seconds, live_voices=lambda: ())  # a new process: empty memory
            return first, repeats, await use(restarted), await use(restarted)

        first, repeats, after_restart, after_restart_repeat = asyncio.run(measure())
        return {
            "speaker_clip": voices.speaker, "speaker_clip_s": round(len(clip) / engine.conditioning_sample_rate, 1),
            "compute_conditioning_ms": round(raw_ms, 1),
            "mp3_clip": voices.mp3,
            "cache_first_use_ms": round(first, 1),
            "cache_repeat_ms": round(float(np.median(repeats)), 2),
            "cache_first_use_after_restart_ms": round(after_restart, 2),
            "cache_repeat_after_restart_ms": round(after_restart_repeat, 2),
        }

    # -- the service's streaming ------------------------------------------------------------------
    def stream(self, tokens: int, plan: StreamPlan | None = None, replay: Trace | None = None) -> tuple[dict, Trace, list]:
        """One sentence of `tokens` audio tokens through `engine.stream` (the service's code path)."""
        engine, plan = self.engine, plan or self.plan
        engine.max_audio_tokens = tokens
        text = text_for_tokens(tokens)
        trace = Trace()
        chunks, first = [], None
        with instrumented(engine, trace, replay):
            timer = Timer()
            for chunk in engine.stream(text, LANGUAGE, self.conditioning, plan=plan):
                if first is None:
                    first = timer()
                    if replay is not None:  # add the GPT time the replay skipped
                        first += trace.gpt_s
                chunks.append(chunk)
            total = timer() + (trace.gpt_s if replay is not None else 0.0)
        samples = sum(map(len, chunks))
        audio_s = samples / engine.sample_rate
        if len(trace.token_s) != tokens:
            log.warning("asked for %d tokens, got %d (the model emitted STOP?)", tokens, len(trace.token_s))
        return {
            "tokens": len(trace.token_s), "text_chars": len(text), "audio_s": round(audio_s, 2), "first_chunk_s": round(first, 3),
            "total_s": round(total, 2), "chunks": len(chunks),
            "first_chunk_audio_s": round(len(chunks[0]) / engine.sample_rate, 3),
            "gpt_s": round(trace.gpt_s, 2), "gpt_first_step_s": round(trace.token_s[0], 3),
            "ms_per_token": round(trace.ms_per_token, 1) if trace.ms_per_token else None,
            "hifigan_s": round(trace.vocode_s, 2), "hifigan_calls": trace.vocode_calls,
            "rtf": round(total / audio_s, 3),
        }, trace, chunks

    def first_chunk(self, tokens: int, repeats: int) -> dict:
        """The engine's own time to its first chunk (median of `repeats`; generation stops after it)."""
        engine = self.engine
        engine.max_audio_tokens = tokens
        times = []
        for _ in range(repeats):
            timer = Timer()
            for _chunk in engine.stream(text_for_tokens(tokens), LANGUAGE, self.conditioning, plan=self.plan):
                times.append(timer())
                break
        return {"first_chunk_s": round(float(np.median(times)), 3), "runs_s": [round(t, 3) for t in times]}

    def one_shot_decode(self, trace: Trace) -> tuple[float, np.ndarray]:
        """HiFi-GAN over all latents at once (what a batch request does): seconds, audio."""
        to_grid, vocode, *_ = self.engine.decoder(self.conditioning, 1.0)
        with torch.inference_mode():
            timer = Timer()
            audio = vocode(to_grid(torch.stack([latent.reshape(-1) for latent in trace.latents])[None]))
            return timer(), audio

    def engine_alone(self, tokens: int) -> tuple[dict, Trace, np.ndarray]:
        result, trace, chunks = self.stream(tokens)
        hifigan_s, reference = self.one_shot_decode(trace)
        audio_s = result["audio_s"]
        result.update({
            "hifigan_one_shot_s": round(hifigan_s, 2),
            "hifigan_rtf": round(hifigan_s / audio_s, 3),
            "gpt_rtf": round(trace.gpt_s / audio_s, 3),
            "batch_estimate_s": round(trace.gpt_s + hifigan_s, 2),
            "stream_vs_one_shot_snr_db": snr_db(reference, np.concatenate(chunks)),
            "worst_seam_snr_db": seam_snr_db(reference, chunks),
        })
        return result, trace, reference

    # -- coqui's own streaming (the "before") ----------------------------------------------------
    def coqui_stream(self, tokens: int, chunk_size: int = 20, first_only: bool = False) -> dict:
        """`Xtts.inference_stream` on the same model, text and greedy settings, cut at `tokens` tokens
        (with `first_only`, stopped at its first chunk)."""
        engine = self.engine
        model = engine.model
        real = model.gpt.get_generator
        model.gpt.get_generator = lambda *a, **k: itertools.islice(real(*a, **k), tokens)
        sampling = {k: v for k, v in engine.sampling.items() if k in ("temperature", "top_k", "top_p", "repetition_penalty", "do_sample")}
        text = text_for_tokens(tokens)
        try:
            cond = self.conditioning.data
            timer = Timer()
            first, samples, chunks = None, 0, 0
            for chunk in model.inference_stream(text, LANGUAGE, cond["gpt_cond_latent"], cond["speaker_embedding"],
                                                stream_chunk_size=chunk_size, **sampling):
                if first is None:
                    first = timer()
                samples += len(chunk)
                chunks += 1
                if first_only:
                    break
            total = timer()
        finally:
            del model.gpt.get_generator
        audio_s = samples / engine.sample_rate
        result = {"tokens": tokens, "text_chars": len(text), "first_chunk_s": round(first, 3), "stream_chunk_size": chunk_size}
        if not first_only:
            result.update({"audio_s": round(audio_s, 2), "total_s": round(total, 2), "chunks": chunks,
                           "rtf": round(total / audio_s, 3)})
        return result

    def hifigan_costs(self, trace: Trace, lengths: list[int]) -> dict[int, float]:
        """One-shot HiFi-GAN time for `lengths` tokens of latents (the recorded ones, tiled: cost does not
        depend on the values). The inputs of the estimate of coqui's streaming cost at long lengths."""
        recorded = torch.stack([latent.reshape(-1) for latent in trace.latents])
        to_grid, vocode, *_ = self.engine.decoder(self.conditioning, 1.0)
        costs = {}
        with torch.inference_mode():
            for n in lengths:
                latents = recorded.repeat(-(-n // len(recorded)), 1)[:n][None]
                timer = Timer()
                vocode(to_grid(latents))
                costs[n] = round(timer(), 3)
        return costs

    # -- stream plans (replayed latents) ----------------------------------------------------------
    def plan_sweep(self, trace: Trace, reference: np.ndarray, plans: dict[str, StreamPlan]) -> dict:
        """Each plan through the real `engine.stream` on the recorded latents: HiFi-GAN is run for real,
        the GPT's recorded step times are added, so plans compare on the same tokens and GPT cost."""
        out = {}
        for name, plan in plans.items():
            result, replayed, chunks = self.stream(len(trace.latents), plan=plan, replay=trace)
            out[name] = {
                "plan": dataclasses.asdict(plan),
                "first_chunk_s": result["first_chunk_s"], "total_s": result["total_s"], "chunks": result["chunks"],
                "hifigan_s": result["hifigan_s"], "hifigan_columns": replayed.vocode_columns,
                "worst_seam_snr_db": seam_snr_db(reference, chunks),
                "snr_db": snr_db(reference, np.concatenate(chunks)),
            }
            log.info("  plan %-22s first chunk %.3f s, total %.2f s, HiFi-GAN %.2f s, worst seam SNR %s dB",
                     name, result["first_chunk_s"], result["total_s"], result["hifigan_s"], out[name]["worst_seam_snr_db"])
        return out

    # -- CPU modes (goal 5) -----------------------------------------------------------------------
    def _gpt_and_vocoder(self, tokens: int, grad_mode) -> dict:
        engine = self.engine
        engine.max_audio_tokens = tokens
        trace = Trace()
        with grad_mode(), instrumented(engine, trace):
            for _ in engine.latents(text_for_tokens(tokens), LANGUAGE, self.conditioning, None):
                pass
            to_grid, vocode, *_ = engine.decoder(self.conditioning, 1.0)
            timer = Timer()
            audio = vocode(to_grid(torch.stack([latent.reshape(-1) for latent in trace.latents])[None]))
            hifigan_s = timer()
        audio_s = len(audio) / engine.sample_rate
        return {"ms_per_token": trace.ms_per_token, "first_step_s": trace.token_s[0], "hifigan_s": hifigan_s,
                "rtf": (trace.gpt_s + hifigan_s) / audio_s, "latent0": trace.latents[0].flatten()[:64].float()}

    def cpu_modes(self, tokens: int, rounds: int = 2, no_grad: bool = True) -> dict:
        """torch threads 1 vs 2, inference_mode vs no_grad, and dynamic int8 for the GPT (applied last:
        it changes the model in place). Variants alternate and the best run is kept, which damps the
        noise of a shared machine; a variant 3x slower than the best so far is not run again."""
        from offline_tts.engine.quantize import is_quantized, quantize_gpt_int8

        default_threads = torch.get_num_threads()
        thread_options = sorted({1, 2, default_threads})
        precision = "int8 GPT" if is_quantized(self.engine.model) else "fp32"
        variants = [(f"{precision}, {n} thread(s), inference_mode", n, torch.inference_mode) for n in thread_options]
        if no_grad:
            variants.append((f"{precision}, {default_threads} thread(s), no_grad", default_threads, torch.no_grad))
        results: dict[str, list[dict]] = {}

        def run_all(variants):
            for round_ in range(rounds):
                best = min((r["rtf"] for runs in results.values() for r in runs), default=None)
                for name, threads, grad_mode in variants:
                    runs = results.setdefault(name, [])
                    if round_ and best is not None and min(r["rtf"] for r in runs) > 3 * best:
                        continue
                    torch.set_num_threads(threads)
                    runs.append(self._gpt_and_vocoder(tokens, grad_mode))

        self._gpt_and_vocoder(8, torch.inference_mode)  # warm-up
        run_all(variants)
        reference = results[variants[0][0]][0]["latent0"]
        quantized_layers, quantize_s = 0, None
        if precision == "fp32":
            timer = Timer()
            quantized_layers = quantize_gpt_int8(self.engine.model)
            quantize_s = round(timer(), 1)
            run_all([(f"int8 GPT, {n} thread(s), inference_mode", n, torch.inference_mode) for n in thread_options])
        torch.set_num_threads(default_threads)

        out = {}
        for name, runs in results.items():
            best = min(runs, key=lambda r: r["rtf"])
            out[name] = {"ms_per_token": round(best["ms_per_token"], 1), "first_step_s": round(best["first_step_s"], 3),
                         "hifigan_s": round(best["hifigan_s"], 2), "rtf": round(best["rtf"], 3),
                         "rtf_runs": [round(r["rtf"], 3) for r in runs]}
            if name.startswith("int8") and precision == "fp32":  # drift from fp32 (quality cannot be judged on random weights)
                delta = (best["latent0"] - reference).norm() / reference.norm()
                out[name]["first_latent_rel_diff"] = round(float(delta), 4)
        return {"tokens": tokens, "default_threads": default_threads, "configured_precision": precision,
                "int8_layers": quantized_layers, "int8_quantize_s": quantize_s, "variants": out}


def coqui_decode_lengths(tokens: int, chunk_size: int = 20) -> list[int]:
    """Latent counts coqui's inference_stream decodes for one sentence: all so far at every chunk, and
    everything once more when the generator ends."""
    return list(range(chunk_size, tokens + 1, chunk_size)) + [tokens]


def estimate_coqui_total(tokens: int, gpt_s: float, hifigan_costs: dict[int, float], chunk_size: int = 20) -> float:
    """coqui's streaming total = its GPT time (the same generator as ours) + HiFi-GAN over all latents so far
    at each chunk; HiFi-GAN time interpolated between measured one-shot decodes (it grows faster than
    linearly on CPU, so a straight-line fit would not do)."""
    lengths, times = zip(*sorted(hifigan_costs.items()))
    return gpt_s + sum(float(np.interp(n, (0, *lengths), (0.0, *times))) for n in coqui_decode_lengths(tokens, chunk_size))


def sweep_plans(default: StreamPlan) -> dict[str, StreamPlan]:
    r = dataclasses.replace
    plans = {"default": default}
    for first in (4, 12):
        plans[f"first={first}"] = r(default, first_chunk_tokens=first)
    for context in (0, 8):
        plans[f"context={context}"] = r(default, context_tokens=context)
    if hasattr(default, "max_chunk_tokens"):
        plans["fixed 24 (no doubling)"] = r(default, chunk_tokens=24, max_chunk_tokens=24)
    return plans


__all__ = ["EngineBench", "Trace", "estimate_coqui_total", "plan_from_settings", "sweep_plans"]
