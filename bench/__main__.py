"""`python -m bench [--quick] [--out FILE]`: the service's benchmark on the full-size random-weight model.

Everything is measured in one run on this machine, so ratios compare like with like: the engine
alone (in-process), coqui-tts's own `Xtts.inference_stream` ("before"), then the real server through
HTTP. Prints one table and writes it, with every figure, as JSON. A dev tool: never run in CI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .common import (
    MODEL_DIR,
    ROOT,
    TOKENS_PER_SECOND,
    Timer,
    ensure_model,
    log,
    median,
    prepare_voices,
)
from .report import Row, fmt, render, verdict


@dataclass(frozen=True)
class Plan:
    """How much each part measures (full: ~16 min on 2 CPU cores; quick: ~5)."""

    short_tokens: int  # "about 10 s" of audio (one sentence)
    long_tokens: int | None  # "about 30 s" (one sentence: the model's 600-token maximum is 27.9 s)
    measure_before_long: bool  # run coqui's inference_stream at the long length (~4 min: quadratic) instead of estimating it
    ttfa_tokens: int  # the sentence used for time to first audio (130 characters)
    ttfa_repeats: int
    ttfa_sentences: int
    concurrency_clients: tuple[int, ...]
    concurrency_requests: int  # per client
    concurrency_tokens: int
    memory_requests: int
    cpu_tokens: int
    cpu_rounds: int
    cpu_no_grad: bool  # also time torch.no_grad against torch.inference_mode
    restart: bool  # restart the server for the voice cache's "first use after a restart"
    sweep: bool
    concurrency_before: bool  # also run the concurrency rows on a server with one slot (TTS_MAX_BATCH=1: no batching)
    concurrency_inline: bool  # also run them with HiFi-GAN on the replica's thread (TTS_VOCODER_THREAD=false)


FULL = Plan(short_tokens=216, long_tokens=600, measure_before_long=False, ttfa_tokens=390, ttfa_repeats=3,
            ttfa_sentences=10, concurrency_clients=(1, 2, 4, 8), concurrency_requests=1, concurrency_tokens=42,
            memory_requests=100, cpu_tokens=24, cpu_rounds=2, cpu_no_grad=True, restart=True, sweep=True,
            concurrency_before=True, concurrency_inline=True)
QUICK = Plan(short_tokens=108, long_tokens=None, measure_before_long=False, ttfa_tokens=390, ttfa_repeats=2,
             ttfa_sentences=10, concurrency_clients=(1, 4), concurrency_requests=1, concurrency_tokens=42,
             memory_requests=20, cpu_tokens=8, cpu_rounds=1, cpu_no_grad=False, restart=False, sweep=False,
             concurrency_before=False, concurrency_inline=True)
MAX_TOKENS = 600  # per sentence on the server: the text's length sets each request's token count below it


def secs(tokens: int | None) -> str:
    return "-" if tokens is None else f"{tokens / TOKENS_PER_SECOND:.1f} s"


# -- the two halves -------------------------------------------------------------------------------

def run_engine(settings, voices, workdir: Path, plan: Plan) -> dict:
    from .engine_bench import EngineBench, sweep_plans

    log.info("[engine] loading the model in-process...")
    bench = EngineBench(settings)
    out: dict = {"load_s": round(bench.load_s, 1), "device": bench.engine.device, "threads": bench.threads,
                 "plan": asdict(bench.plan)}
    log.info("[engine] loaded in %.1f s on %s, %d torch thread(s); conditioning...", bench.load_s, bench.engine.device, bench.threads)
    out["conditioning"] = bench.measure_conditioning(voices, workdir / "engine-cache")
    bench.stream(9)  # warm-up (lazy initialisation), as the service does at load
    log.info("[engine] stream of %d tokens (%s)...", plan.short_tokens, secs(plan.short_tokens))
    alone, trace, reference = bench.engine_alone(plan.short_tokens)
    out["alone"] = alone
    out["first_chunk"] = bench.first_chunk(plan.ttfa_tokens, plan.ttfa_repeats)
    if plan.sweep:
        log.info("[engine] stream plans on the recorded latents...")
        out["plans"] = bench.plan_sweep(trace, reference, sweep_plans(bench.plan))
    log.info("[engine] HiFi-GAN cost by length...")
    lengths = sorted({20, plan.short_tokens // 2} | ({(plan.short_tokens + plan.long_tokens) // 2, plan.long_tokens}
                                                        if plan.long_tokens else set()))
    out["hifigan_costs"] = {plan.short_tokens: alone["hifigan_one_shot_s"], **bench.hifigan_costs(trace, lengths)}
    out["gpt"] = {"first_step_s": trace.token_s[0], "ms_per_token": trace.ms_per_token, "short_gpt_s": trace.gpt_s}
    out["before"] = {}
    for tokens in [plan.short_tokens] + ([plan.long_tokens] if plan.measure_before_long and plan.long_tokens else []):
        log.info("[engine] before: coqui inference_stream, %d tokens (%s)...", tokens, secs(tokens))
        out["before"][str(tokens)] = bench.coqui_stream(tokens)
    runs = [bench.coqui_stream(plan.ttfa_tokens, first_only=True) for _ in range(plan.ttfa_repeats)]
    out["before_first_chunk"] = {"first_chunk_s": round(median([r["first_chunk_s"] for r in runs]), 3),
                                 "runs_s": [r["first_chunk_s"] for r in runs], "text_chars": runs[0]["text_chars"]}
    if bench.engine.device == "cpu":
        log.info("[engine] CPU modes (threads, inference_mode, int8)...")
        out["cpu_modes"] = bench.cpu_modes(plan.cpu_tokens, plan.cpu_rounds, plan.cpu_no_grad)
    bench.close()
    return out


def run_http(settings, voices, workdir: Path, plan: Plan) -> dict:
    from . import http_bench as h

    env = {"TTS_MODEL_DIR": str(settings.model_dir), "TTS_VOICES_DIR": str(voices.dir),
           "TTS_CACHE_DIR": str(workdir / "server-cache"), "TTS_MAX_AUDIO_TOKENS": str(MAX_TOKENS),
           "TTS_GREEDY": "true", "TTS_DEVICE": settings.device, "TTS_WORKERS": "1",
           "TTS_TORCH_THREADS": str(settings.torch_threads)}
    server = h.Server(workdir, env)
    out: dict = {}
    log.info("[http] starting the server...")
    try:
        out["load_s"] = round(server.start(), 1)
        out["rss_after_load_mb"] = server.rss_mb()
        rss_trace = [(0, out["rss_after_load_mb"])]  # (requests so far, RSS MB): growth that levels off is the allocator, not a leak
        with server.client() as client:  # the synthesis voice's first use (conditioning), not timed below
            first = h.stream(server, client, "Hola.", voices.speaker, first_audio_only=True)
        out["first_request_ttfa_s"] = round(first.ttfa_s, 3) if first.ok else None
        h.settle()
        log.info("[http] time to first audio, 1 vs %d sentences...", plan.ttfa_sentences)
        out["ttfa"] = h.ttfa(server, voices.speaker, plan.ttfa_tokens, plan.ttfa_sentences, plan.ttfa_repeats)
        out["stream_vs_batch"] = {}
        for tokens in filter(None, (plan.short_tokens, plan.long_tokens)):
            log.info("[http] stream vs batch, %d tokens (%s)...", tokens, secs(tokens))
            out["stream_vs_batch"][str(tokens)] = h.stream_vs_batch(server, voices.speaker, tokens)
            rss_trace.append((server.requests, server.rss_mb()))
        out["concurrency"] = []
        for clients in plan.concurrency_clients:
            log.info("[http] %d concurrent streaming client(s)...", clients)
            out["concurrency"].append(h.concurrency(server, voices.speaker, clients, plan.concurrency_requests,
                                                    plan.concurrency_tokens))
        rss_trace.append((server.requests, server.rss_mb()))
        log.info("[http] voice cache (%s)...", voices.mp3)
        cache = {"first_use_ms": h.set_default_voice(server, voices.mp3)}
        cache["repeat_ms"] = min(h.set_default_voice(server, voices.mp3) for _ in range(3))
        h.set_default_voice(server, voices.speaker)  # so the restart does not pre-load the MP3 voice
        out["voice_cache_http"] = cache
        log.info("[http] requests up to %d (memory)...", plan.memory_requests)
        h.top_up(server, voices.speaker, (server.requests + plan.memory_requests) // 2)
        rss_trace.append((server.requests, server.rss_mb()))
        h.top_up(server, voices.speaker, plan.memory_requests)
        rss_trace.append((server.requests, server.rss_mb()))
        out["memory"] = {"requests": server.requests, "rss_after_load_mb": out["rss_after_load_mb"],
                         "rss_after_requests_mb": rss_trace[-1][1], "rss_trace": rss_trace}
        out["metrics"] = h.metrics_snapshot(server)
        server.stop()
        if plan.restart:
            log.info("[http] restart: first use of %s after a restart...", voices.mp3)
            out["restart_load_s"] = round(server.start(), 1)
            cache["after_restart_ms"] = h.set_default_voice(server, voices.mp3)
            cache["repeat_after_restart_ms"] = h.set_default_voice(server, voices.mp3)
            out["memory"]["rss_after_restart_mb"] = server.rss_mb()
            server.stop()
        variants = {"concurrency_before": ("one slot (TTS_MAX_BATCH=1, no batching)",
                                           {"TTS_MAX_BATCH": "1", "TTS_MAX_QUEUE": "16"}, plan.concurrency_before),
                    "concurrency_inline": ("HiFi-GAN on the replica's thread (TTS_VOCODER_THREAD=false)",
                                           {"TTS_VOCODER_THREAD": "false"}, plan.concurrency_inline)}
        for key, (what, extra, wanted) in variants.items():
            if not wanted:
                continue
            log.info("[http] the same clients with %s...", what)
            server = h.Server(workdir, {**env, **extra})
            server.start()
            with server.client() as client:
                h.stream(server, client, "Hola.", voices.speaker, first_audio_only=True)
            out[key] = [h.concurrency(server, voices.speaker, clients, plan.concurrency_requests,
                                      plan.concurrency_tokens) for clients in plan.concurrency_clients]
            server.stop()
    finally:
        server.stop()
    return out


def before_estimates(results: dict, plan: Plan) -> dict:
    """coqui's streaming total where it was not run (and at the short length, to check the estimate
    against the measured figure): its GPT time + HiFi-GAN over all latents so far at every chunk."""
    from .engine_bench import estimate_coqui_total

    engine, http = results.get("engine", {}), results.get("http", {})
    if "hifigan_costs" not in engine:
        return {}
    costs = {int(k): v for k, v in engine["hifigan_costs"].items()}
    gpt = engine["gpt"]
    out = {str(plan.short_tokens): {"total_s": round(estimate_coqui_total(plan.short_tokens, gpt["short_gpt_s"], costs), 2),
                                    "gpt_s_from": "in-process GPT time of the same tokens"}}
    if plan.long_tokens:
        n = plan.long_tokens
        batch = http.get("stream_vs_batch", {}).get(str(n), {}).get("batch_total_s")
        if batch is not None and n in costs:  # a batch request = GPT + one HiFi-GAN pass over everything
            gpt_s, source = batch - costs[n], "HTTP batch total minus its one-shot HiFi-GAN"
        else:
            gpt_s, source = gpt["first_step_s"] + gpt["ms_per_token"] / 1000 * (n - 1), "GPT ms/token x tokens"
        out[str(n)] = {"total_s": round(estimate_coqui_total(n, gpt_s, costs), 2), "gpt_s_from": source}
    return out


# -- the table ------------------------------------------------------------------------------------

def ratio(a, b) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def build_table(results: dict, plan: Plan) -> str:
    engine, http = results.get("engine", {}), results.get("http", {})
    sections: list[tuple[str, list[Row]]] = []
    alone = engine.get("alone", {})
    before = engine.get("before", {})
    b_short = before.get(str(plan.short_tokens), {})
    if engine:
        cond = engine["conditioning"]
        sections.append((f"engine alone, in-process ({engine['device']}, {engine['threads']} thread(s), "
                         f"{alone.get('tokens')} tokens = {alone.get('audio_s')} s of audio)", [
            Row("model load", after=fmt(engine["load_s"], " s", 1)),
            Row(f"conditioning ({cond['speaker_clip_s']} s clip)", after=fmt(cond["compute_conditioning_ms"], " ms", 0)),
            Row("GPT, per audio token (steady state)", after=fmt(alone.get("ms_per_token"), " ms", 1)),
            Row("GPT, first step (prompt)", after=fmt(alone.get("gpt_first_step_s"), " s", 3)),
            Row("HiFi-GAN, one shot (real-time factor)", after=f"{fmt(alone.get('hifigan_one_shot_s'), ' s')} ({fmt(alone.get('hifigan_rtf'), '', 3)})"),
            Row("HiFi-GAN, streamed in chunks", before=fmt(None), after=fmt(alone.get("hifigan_s"), " s")),
            Row("stream real-time factor (total / audio)", before=fmt(b_short.get("rtf"), "", 3), after=fmt(alone.get("rtf"), "", 3)),
            Row(f"first chunk (engine, {alone.get('text_chars')}-char sentence)",
                before=f"{fmt(b_short.get('first_chunk_s'), ' s', 3)} (coqui, 20 tokens)",
                after=fmt(alone.get("first_chunk_s"), " s", 3)),
            Row("streamed vs one-shot audio: SNR / worst seam", after=f"{fmt(alone.get('stream_vs_one_shot_snr_db'), ' dB', 1)} / "
                f"{fmt(alone.get('worst_seam_snr_db'), ' dB', 1)}"),
        ]))

    svb = http.get("stream_vs_batch", {})
    estimates = results.get("before_estimate", {})
    rows = []
    for tokens in filter(None, (plan.short_tokens, plan.long_tokens)):
        s, b, est = svb.get(str(tokens), {}), before.get(str(tokens), {}), estimates.get(str(tokens), {})
        target = tokens == (plan.long_tokens or plan.short_tokens)
        after = s.get("stream_over_batch")
        before_total = b.get("total_s") or est.get("total_s")
        note = "" if b else " (est.)"
        rows.append(Row(f"stream total / batch total, {secs(tokens)}",
                        before=fmt(ratio(before_total, s.get("batch_total_s")), note, 2),
                        after=fmt(after, "", 3), goal="<= 1.10" if target else "",
                        verdict=verdict(after <= 1.10) if target and after is not None else ""))
        measured = f"{fmt(b.get('total_s'), ' s', 1)} (est. {fmt(est.get('total_s'), ' s', 1)})" if b else f"{fmt(est.get('total_s'), ' s', 1)} (est.)"
        rows.append(Row(f"  stream total (batch {fmt(s.get('batch_total_s'), ' s', 1)})", before=measured,
                        after=fmt(s.get("stream_total_s"), " s", 1)))
    sections.append(("goal 1: streaming cost linear in length (HTTP; before = coqui inference_stream in-process; "
                     "est. = its GPT time + measured HiFi-GAN cost of its re-decodes)", rows))

    ttfa = http.get("ttfa", {})
    t1 = ttfa.get("ttfa_s", {}).get("1")
    tn = ttfa.get("ttfa_s", {}).get(str(plan.ttfa_sentences))
    engine_first = engine.get("first_chunk", {}).get("first_chunk_s")
    r_engine, r_len = ratio(t1, engine_first), ratio(tn, t1)
    sections.append(("goal 2: first audio early (HTTP /api/tts/stream, first byte after the WAV header)", [
        Row(f"time to first audio, 1 sentence ({ttfa.get('text_chars', {}).get('1', '?')} chars)",
            before=f"{fmt(engine.get('before_first_chunk', {}).get('first_chunk_s'), ' s', 3)} (coqui first chunk)",
            after=fmt(t1, " s", 3)),
        Row("engine's own first chunk (in-process, median)", after=fmt(engine_first, " s", 3)),
        Row("HTTP TTFA / engine first chunk", after=fmt(r_engine, "", 3), goal="<= 1.10",
            verdict=verdict(r_engine <= 1.10) if r_engine else ""),
        Row(f"TTFA {plan.ttfa_sentences} sentences / 1 sentence", after=f"{fmt(r_len, '', 3)} ({fmt(tn, ' s', 3)})", goal="<= 1.10",
            verdict=verdict(r_len <= 1.10) if r_len else ""),
    ]))

    cond = engine.get("conditioning", {})
    cache_http = http.get("voice_cache_http", {})
    first = cond.get("cache_first_use_ms")
    repeat, restart = cond.get("cache_repeat_ms"), cond.get("cache_first_use_after_restart_ms")
    sections.append((f"goal 3: voice cache ({cond.get('mp3_clip', 'MP3 clip')}; before = no cache: every use pays the first-use cost)", [
        Row("conditioning, first use (decode + compute + store)", before=fmt(first, " ms", 0), after=fmt(first, " ms", 0)),
        Row("conditioning, repeat use", before=fmt(first, " ms", 0), after=fmt(repeat, " ms", 2), goal="< 5 ms",
            verdict=verdict(repeat < 5) if repeat is not None else ""),
        Row("conditioning, first use after a restart", before=fmt(first, " ms", 0), after=fmt(restart, " ms", 2), goal="< 5 ms",
            verdict=verdict(restart < 5) if restart is not None else ""),
        Row("HTTP POST /api/config round trip: first / repeat / after restart",
            after=" / ".join(fmt(cache_http.get(k), " ms", 1) for k in ("first_use_ms", "repeat_ms", "after_restart_ms"))),
    ]))

    conc = {c["clients"]: c for c in http.get("concurrency", [])}
    before_conc = {c["clients"]: c for c in http.get("concurrency_before", [])}
    inline_conc = {c["clients"]: c for c in http.get("concurrency_inline", [])}

    def summary(c: dict | None) -> str:
        if not c:
            return "-"
        return (f"{fmt(c['throughput_audio_s_per_s'], ' audio s/s', 3)}, TTFA {fmt(c['ttfa_p50_s'])} / "
                f"{fmt(c['ttfa_p95_s'], ' s')}, RTF {fmt(c.get('stream_rtf_p50'))}, {c['errors']} err")

    def split(c: dict) -> str:
        r = c.get("replica") or {}
        steps = r.get("steps") or 0
        return (f"{steps:.0f} steps x {fmt(r['rows'] / steps if steps else None, '', 1)} rows, GPT {fmt(r.get('gpt_step_s'), ' s', 1)}, "
                f"HiFi-GAN {fmt(r.get('vocoder_s'), ' s', 1)}, join stall {fmt(r.get('join_stall_s'), ' s', 2)} "
                f"(max {fmt(r.get('join_stall_max_s'), ' s', 3)})")

    rows = []
    for n, c in conc.items():
        rows.append(Row(f"{n} client(s): throughput, TTFA p50 / p95, stream RTF p50, errors",
                        before=summary(before_conc.get(n)), after=summary(c)))
        rows.append(Row("  replica threads (after)", after=split(c)))
        if n in inline_conc:
            rows.append(Row("  same, HiFi-GAN on the replica's thread (TTS_VOCODER_THREAD=false)",
                            after=summary(inline_conc[n])))
    if 1 in conc:
        one = conc[1]["throughput_audio_s_per_s"]
        for n, goal in ((4, 1.8), (8, 2.5)):
            if n in conc:
                r = ratio(conc[n]["throughput_audio_s_per_s"], one)
                b = ratio(before_conc.get(n, {}).get("throughput_audio_s_per_s"),
                          before_conc.get(1, {}).get("throughput_audio_s_per_s"))
                rows.append(Row(f"{n} clients: throughput / 1 client's", before=fmt(b, "", 2), after=fmt(r, "", 2),
                                goal=f">= {goal}, 0 errors",
                                verdict=verdict(r is not None and r >= goal and conc[n]["errors"] == 0)))
        if 4 in conc:
            r = ratio(conc[4]["ttfa_p95_s"], conc[1]["ttfa_p50_s"])
            b = ratio(before_conc.get(4, {}).get("ttfa_p95_s"), before_conc.get(1, {}).get("ttfa_p50_s"))
            rows.append(Row("4 clients: TTFA p95 / 1 client's TTFA", before=fmt(b, "", 2), after=fmt(r, "", 2),
                            goal="<= 2.5", verdict=verdict(r is not None and r <= 2.5)))
        if 1 in inline_conc:
            one = inline_conc[1]["throughput_audio_s_per_s"]
            ratios = [f"{n}: {fmt(ratio(c['throughput_audio_s_per_s'], one), '', 2)}" for n, c in inline_conc.items() if n > 1]
            rows.append(Row("  HiFi-GAN on the replica's thread: throughput / 1 client's", after=", ".join(ratios)))
    sections.append((f"goal 4: concurrency (1 worker, {plan.concurrency_tokens} tokens per request; "
                     "before = the same server with TTS_MAX_BATCH=1)", rows))

    cpu = engine.get("cpu_modes")
    if cpu:
        variants = cpu["variants"]
        default = variants[f"{cpu['configured_precision']}, {cpu['default_threads']} thread(s), inference_mode"]
        best = min(variants.items(), key=lambda kv: kv[1]["rtf"])
        rows = [Row(name, after=f"RTF {fmt(v['rtf'], '', 3)}, GPT {fmt(v['ms_per_token'], ' ms/token', 1)}, "
                                f"HiFi-GAN {fmt(v['hifigan_s'], ' s')}") for name, v in variants.items()]
        rows.append(Row("best real-time factor", before=f"{fmt(default['rtf'], '', 3)} (as configured)",
                        after=f"{fmt(best[1]['rtf'], '', 3)} ({best[0]})"))
        sections.append((f"goal 5: CPU modes ({cpu['tokens']} tokens, best of up to {plan.cpu_rounds} runs; "
                         "int8 quality not judged: random weights)", rows))

    device = engine.get("device") or http.get("device")
    sections.append(("goal 6: GPU", [Row("CUDA, fp16 GPT", after="not measured" if device != "cuda" else "see engine rows",
                                         goal="measured on a GPU", verdict="" if device == "cuda" else "open")]))

    mem = http.get("memory", {})
    growth = ratio(mem.get("rss_after_requests_mb"), mem.get("rss_after_load_mb"))
    sections.append(("memory (server RSS)", [
        Row("after load", after=fmt(mem.get("rss_after_load_mb"), " MB", 0)),
        Row(f"after {mem.get('requests', '?')} requests / after load (warm-up)",
            after=f"{fmt(mem.get('rss_after_requests_mb'), ' MB', 0)} ({fmt(growth, 'x', 2)})",
            goal="<= 1.15x" + ("" if mem.get("requests", 0) >= 100 else " (fewer than 100: --quick)"),
            verdict=verdict(growth <= 1.15) if growth else ""),
        Row("trace (requests: MB)", after=", ".join(f"{n}: {mb:.0f}" for n, mb in mem.get("rss_trace", []))),
        Row("after a restart", after=fmt(mem.get("rss_after_restart_mb"), " MB", 0)),
    ]))

    plans = engine.get("plans")
    if plans:
        sections.append(("stream plans (same tokens replayed; HiFi-GAN real, GPT time as recorded)", [
            Row(name, after=f"first {fmt(p['first_chunk_s'], ' s', 3)}, total {fmt(p['total_s'], ' s')}, "
                            f"HiFi-GAN {fmt(p['hifigan_s'], ' s')}, worst seam {fmt(p['worst_seam_snr_db'], ' dB', 1)}")
            for name, p in plans.items()]))
    return render(sections)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter audio and fewer requests (about 5 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench.json", help="JSON output file")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR, help="full-size random model (built here if missing)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: TTS_DEVICE or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: TTS_TORCH_THREADS)")
    parser.add_argument("--only", choices=["engine", "http"], help="run one half only")
    parser.add_argument("--measure-before-long", action="store_true",
                        help="run coqui's inference_stream at ~28 s of audio instead of estimating it (adds ~4 min)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs, caches)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    plan = QUICK if args.quick else FULL
    if args.measure_before_long:
        plan = replace(plan, measure_before_long=True)

    from offline_tts.config import Settings

    timer = Timer()
    model_dir = ensure_model(args.model_dir.resolve())
    workdir = Path(tempfile.mkdtemp(prefix="tts-bench-"))
    overrides = {"model_dir": model_dir, "greedy": True, "max_audio_tokens": MAX_TOKENS}
    if args.device:
        overrides["device"] = args.device
    if args.threads is not None:
        overrides["torch_threads"] = args.threads
    settings = Settings(**overrides)
    results: dict = {"meta": {"mode": "quick" if args.quick else "full", "plan": asdict(plan),
                              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                          "python": platform.python_version()},
                              "model_dir": str(model_dir), "torch_threads_setting": settings.torch_threads}}
    try:
        voices = prepare_voices(workdir)
        results["meta"]["voices"] = asdict(voices) | {"dir": str(voices.dir)}
        if args.only in (None, "engine"):
            results["engine"] = run_engine(settings, voices, workdir, plan)
        if args.only in (None, "http"):
            results["http"] = run_http(settings, voices, workdir, plan)
        results["before_estimate"] = before_estimates(results, plan)
    finally:
        results["meta"]["wall_s"] = round(timer(), 1)
        if args.keep:
            log.info("work directory kept: %s", workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    table = build_table(results, plan)
    results["table"] = table.splitlines()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(f"\n{results['meta']['mode']} run: {results['meta']['wall_s']:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
