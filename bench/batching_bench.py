"""`python -m bench.batching_bench MODEL_DIR [--threads N] [--batches 1,2,4,8]`: cost of the batched GPT.

Measures, in one process on one model (greedy, CPU unless --device):
- today's per-token cost: the time between two latents of `XttsEngine.latents` (prefill excluded);
- `BatchedGpt.step()` time at each batch size (all slots decoding), and the aggregate tokens/s;
- the prefill cost of one join, whole and per piece (what a running stream stalls for when a sequence joins).
A dev tool, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from offline_tts.engine.batching import BatchedGpt, Sampling, sentence_prefix
from offline_tts.engine.xtts import XttsEngine

CUDA_GRAPHS = False  # --cuda-graphs
TEXT = "This is a sentence of ordinary length, used to measure the cost of one decoding step of the model."


def voice(engine: XttsEngine, freq: float):
    sr = engine.conditioning_sample_rate
    t = np.arange(sr * 4) / sr
    return engine.compute_conditioning([(0.3 * np.sin(2 * np.pi * freq * t + 3 * np.sin(10 * t))).astype(np.float32)])


def per_token_today(engine: XttsEngine, conditioning, tokens: int) -> float:
    """Median time between two latents of today's path, after one warm-up sentence."""
    gaps = []
    for run in range(2):
        stamps = []
        for _ in engine.latents(TEXT, "en", conditioning, None):
            stamps.append(time.perf_counter())
            if len(stamps) > tokens:
                break
        if run:
            gaps = np.diff(stamps)
    return float(np.median(gaps))


def step_cost(engine: XttsEngine, conditioning, batch: int, steps: int) -> tuple[float, float]:
    """(median step seconds, prefill seconds of one sequence) at this batch size."""
    batched = BatchedGpt.for_engine(engine, max_batch=batch, cuda_graphs=CUDA_GRAPHS)
    prefix = sentence_prefix(engine, TEXT, "en", conditioning)
    for _ in range(batch):
        batched.admit(prefix, Sampling(top_k=1), cap=steps + 5)
    started = time.perf_counter()
    batched.prefill_some(prefix.shape[1])
    prefill = time.perf_counter() - started
    batched.prefill_some(10**9)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        out = batched.step()
        times.append(time.perf_counter() - started)
        assert len(out) == batch
    return statistics.median(times[2:]), prefill


def prefill_pieces(engine: XttsEngine, conditioning, piece: int) -> list[float]:
    batched = BatchedGpt.for_engine(engine, max_batch=1)
    batched.admit(sentence_prefix(engine, TEXT, "en", conditioning), Sampling(top_k=1), cap=10)
    times = []
    while batched.prefill_pending:
        started = time.perf_counter()
        batched.prefill_some(piece)
        times.append(time.perf_counter() - started)
    return times


def check(engine: XttsEngine, tokens: int) -> float:
    """Max abs latent difference between two sentences (two voices) batched and each run alone today."""
    texts = [(TEXT, voice(engine, 180)), ("A second, shorter sentence in another voice.", voice(engine, 260))]
    batched = BatchedGpt.for_engine(engine, max_batch=2)
    slots = [batched.admit(sentence_prefix(engine, text, "en", c), Sampling.of_engine(engine), tokens) for text, c in texts]
    batched.prefill_some(10**9)
    got: dict[int, list[torch.Tensor]] = {slot: [] for slot in slots}
    while batched.decoding:
        for slot, emitted in batched.step().items():
            got[slot].append(emitted.latent)
    worst = 0.0
    for slot, (text, conditioning) in zip(slots, texts, strict=True):
        for mine, today in zip(got[slot], engine.latents(text, "en", conditioning, None), strict=False):
            worst = max(worst, float((mine - today).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--check", type=int, default=0, help="also compare N tokens of 2 batched sentences with today's path")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the decode step from CUDA graphs (CUDA only)")
    args = parser.parse_args()
    global CUDA_GRAPHS
    CUDA_GRAPHS = args.cuda_graphs
    torch.set_num_threads(args.threads)
    engine = XttsEngine(args.model_dir, args.device, greedy=True)
    conditioning = voice(engine, 180)
    prefix_len = sentence_prefix(engine, TEXT, "en", conditioning).shape[1]
    step_cost(engine, conditioning, 1, 4)  # warm-up
    today = per_token_today(engine, conditioning, args.steps)
    print(f"device {engine.device}, {torch.get_num_threads()} threads, prefix {prefix_len} tokens, "
          f"CUDA graphs {'on' if CUDA_GRAPHS and engine.device == 'cuda' else 'off'}")
    print(f"today (_latents): {today * 1000:.1f} ms per token")
    if args.check:
        print(f"batched vs alone, {args.check} tokens, 2 voices: max abs latent diff {check(engine, args.check):.2e}")
    print("batch  step ms  tokens/s  vs today  prefill of one join ms")
    for batch in map(int, args.batches.split(",")):
        step, prefill = step_cost(engine, conditioning, batch, args.steps)
        print(f"{batch:5d}  {step * 1000:7.1f}  {batch / step:8.1f}  {today * batch / step:7.2f}x  {prefill * 1000:8.1f}")
    for piece in (16, 32, 64, 128):
        times = prefill_pieces(engine, conditioning, piece)
        print(f"prefill in pieces of {piece}: {len(times)} pieces, longest {max(times) * 1000:.1f} ms, "
              f"total {sum(times) * 1000:.1f} ms")


if __name__ == "__main__":
    main()
