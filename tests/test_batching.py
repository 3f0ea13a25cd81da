"""The batched GPT decoder (engine/batching.py) against the existing one-sentence path (`XttsEngine.latents`).

Every sequence in a batch (its own voice, text, language, length, join step and generator) must produce
the tokens and latents it produces when run alone today; leaving (cap, cancel) must not disturb the others.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from offline_tts.engine.batching import (
    CAP,
    STOP,
    BatchedGpt,
    Emitted,
    NoFreeSlot,
    Sampling,
    draw,
    sentence_prefix,
    warp_scores,
)
from offline_tts.engine.base import StreamPlan
from offline_tts.engine.streaming import ChunkDecoder
from offline_tts.engine.xtts import XttsEngine

TOLERANCE = 1e-4  # max abs latent difference (fp32)
MAX_TOKENS = 48  # the engine's token cap: keeps each reference run short
PREFILL_PIECE = 16  # prefix tokens prefilled between two decode steps: every join takes several pieces
SENTENCES = [  # text, language, voice
    ("Hola, esta es una frase de prueba.", "es", 0),
    ("Hello there.", "en", 1),
    ("Ceci est une phrase un peu plus longue que les autres, pour tester.", "fr", 2),
    ("Guten Tag, wie geht es?", "de", 3),
]
SAMPLED = dict(temperature=0.75, top_k=50, top_p=0.85, repetition_penalty=10.0, do_sample=True)  # engine defaults


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> XttsEngine:
    return XttsEngine(tiny_model_dir, "cpu", greedy=True, max_audio_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def voices(engine: XttsEngine):
    """Four different voice conditionings, from four different synthetic clips."""
    sr = engine.conditioning_sample_rate
    t = np.arange(sr * 2) / sr
    clips = [(0.3 * np.sin(2 * np.pi * f * t + 3 * np.sin(2 * np.pi * (4 + i) * t))).astype(np.float32)
             for i, f in enumerate((140, 180, 230, 290))]
    return [engine.compute_conditioning([clip]) for clip in clips]


@pytest.fixture(scope="module")
def references(engine, voices) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Each of SENTENCES run alone on today's path."""
    return [alone(engine, text, lang, voices[v]) for text, lang, v in SENTENCES]


@contextmanager
def recorded_tokens(engine: XttsEngine):
    """Tee the tokens of coqui's generator while `latents` consumes it (it only passes the latents on)."""
    tokens: list[int] = []
    gpt = engine.model.gpt
    original = gpt.get_generator

    def teeing(**kwargs):
        for token, latent in original(**kwargs):
            tokens.append(int(token))
            yield token, latent

    gpt.get_generator = teeing
    try:
        yield tokens
    finally:
        del gpt.get_generator  # back to the class's method


def alone(engine: XttsEngine, text: str, language: str, conditioning) -> tuple[list[int], list[torch.Tensor]]:
    """Tokens and latents of one sentence on today's path."""
    with recorded_tokens(engine) as tokens:
        latents = list(engine.latents(text, language, conditioning, None))
    assert len(tokens) == len(latents) > 0
    return tokens, latents


@dataclass
class Job:
    text: str
    language: str
    conditioning: object
    join_at: int = 0  # decode step at which the sequence is admitted
    cap: int | None = None  # None: the engine's cap for the text, as today
    cancel_after: int | None = None  # release the slot after this many tokens
    generator: torch.Generator | None = None
    sampling: Sampling | None = None
    slot: int | None = None
    out: list[Emitted] = field(default_factory=list)


def run(engine: XttsEngine, batched: BatchedGpt, jobs: list[Job]) -> None:
    """Drive the batch as a scheduler would: admissions at their step, prefill in pieces between steps."""
    waiting = sorted(jobs, key=lambda j: j.join_at)
    by_slot: dict[int, Job] = {}
    step = 0
    while waiting or by_slot:
        while waiting and waiting[0].join_at <= step:
            job = waiting.pop(0)
            cap = job.cap or engine.token_cap(job.text)
            prefix = sentence_prefix(engine, job.text, job.language, job.conditioning)
            job.slot = batched.admit(prefix, job.sampling or Sampling.of_engine(engine), cap, job.generator)
            by_slot[job.slot] = job
        assert batched.prefill_some(PREFILL_PIECE) <= PREFILL_PIECE
        for slot, emitted in batched.step().items():
            job = by_slot[slot]
            job.out.append(emitted)
            if emitted.finished:
                del by_slot[slot]
            elif len(job.out) == job.cancel_after:
                batched.release(slot)
                del by_slot[slot]
        step += 1
        assert step < 10 * MAX_TOKENS, "the batch never drained"


def assert_matches(job: Job, tokens: list[int], latents: list[torch.Tensor], count: int | None = None) -> None:
    """The job's output equals the first `count` tokens/latents of the sentence run alone (all by default)."""
    count = len(tokens) if count is None else count
    assert [e.token for e in job.out] == tokens[:count]
    assert len(job.out) == count
    worst = max(float((e.latent - ref).abs().max()) for e, ref in zip(job.out, latents, strict=False))
    assert worst < TOLERANCE, f"{job.text!r}: latents differ by {worst:.2e}"
    assert all(e.latent.shape == latents[0].shape and e.latent.dtype == torch.float32 for e in job.out)


def test_prefix_is_coquis(engine, voices):
    """The prefix equals what coqui's `compute_embeddings` stores for its generator."""
    text, language, voice = SENTENCES[0]
    prefix = sentence_prefix(engine, text, language, voices[voice])
    ids = engine.model.tokenizer.encode(text.lower(), lang=language)
    engine.model.gpt.compute_embeddings(voices[voice].data["gpt_cond_latent"], torch.IntTensor(ids)[None])
    assert torch.equal(prefix, engine.model.gpt.gpt_inference.cached_prefix_emb)


def test_greedy_batch_equals_each_sentence_alone(engine, voices, references):
    """4 voices, texts, languages and lengths, joining at different steps while others decode."""
    assert len({len(tokens) for tokens, _ in references}) > 1, "the sentences should differ in length"
    jobs = [Job(text, lang, voices[v], join_at=at) for (text, lang, v), at in zip(SENTENCES, (0, 3, 11, 20), strict=True)]
    batched = BatchedGpt.for_engine(engine, max_batch=4)
    cache = [k.data_ptr() for k in batched._keys]
    run(engine, batched, jobs)
    for job, (tokens, latents) in zip(jobs, references, strict=True):
        assert_matches(job, tokens, latents)
        assert job.out[-1].finished == CAP and all(e.finished is None for e in job.out[:-1])
    assert batched.free_slots == 4
    assert [k.data_ptr() for k in batched._keys] == cache, "the KV cache must be allocated once"


def test_unwritten_cache_is_never_read_and_an_idle_cache_is_freed(engine, voices, references):
    """The cache is left uninitialised (memory is mapped as it is used): fill it with NaN, as recycled
    memory may be, and the batch must still equal each sentence alone. Idle, `trim` frees it; the next
    join allocates it again; while a slot is busy it stays."""
    batched = BatchedGpt.for_engine(engine, max_batch=4)
    for cache in (*batched._keys, *batched._values):
        cache.fill_(float("nan"))
    jobs = [Job(text, lang, voices[v], join_at=at) for (text, lang, v), at in zip(SENTENCES[:3], (0, 5, 9), strict=True)]
    run(engine, batched, jobs)
    for job, (tokens, latents) in zip(jobs, references, strict=False):
        assert_matches(job, tokens, latents)
    assert batched.trim() and batched._keys == []
    text, lang, v = SENTENCES[3]
    again = Job(text, lang, voices[v])
    run(engine, batched, [again])
    assert_matches(again, *references[3])
    slot = batched.admit(sentence_prefix(engine, text, lang, voices[v]), Sampling(), 5)
    assert not batched.trim() and batched._keys, "a busy slot's cache was freed"
    batched.release(slot)


def test_capped_and_cancelled_sequences_leave_without_disturbing_others(engine, voices, references):
    """One sequence is capped early, one cancelled; their slots are reused by late joiners."""
    jobs = [
        Job(*SENTENCES[0][:2], voices[0], cap=7),
        Job(*SENTENCES[1][:2], voices[1], cancel_after=12),
        Job(*SENTENCES[2][:2], voices[2], join_at=2),
        Job(*SENTENCES[3][:2], voices[3], join_at=30),  # joins a slot freed by the capped or cancelled one
        Job(*SENTENCES[1][:2], voices[1], join_at=31),  # same sentence again, in a reused slot
    ]
    batched = BatchedGpt.for_engine(engine, max_batch=3)
    run(engine, batched, jobs)
    assert_matches(jobs[0], *references[0], count=7)
    assert jobs[0].out[-1].finished == CAP
    assert_matches(jobs[1], *references[1], count=12)
    assert jobs[1].out[-1].finished is None
    assert_matches(jobs[2], *references[2])
    assert_matches(jobs[3], *references[3])
    assert_matches(jobs[4], *references[1])
    assert {jobs[3].slot, jobs[4].slot} <= {jobs[0].slot, jobs[1].slot}, "freed slots should be reused"


@contextmanager
def biased(engine: XttsEngine, token: int, amount: float):
    """Raise one audio token's logit (the mel head's bias) for the duration."""
    bias = engine.model.gpt.mel_head.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[token] += amount
    try:
        yield
    finally:
        with torch.no_grad():
            bias.copy_(saved)


def test_stop_token_ends_the_sequence_like_today(engine, voices):
    """A sequence whose model says "stop" ends with that token, as coqui's generator does."""
    text, language, voice = SENTENCES[2]
    job = Job(text, language, voices[voice])
    with biased(engine, engine.model.gpt.stop_audio_token, 1e4):  # the random model never stops by itself
        tokens, latents = alone(engine, text, language, voices[voice])
        run(engine, BatchedGpt.for_engine(engine, max_batch=2), [job])
    assert tokens == [engine.model.gpt.stop_audio_token]
    assert_matches(job, tokens, latents)
    assert job.out[-1].finished == STOP


def test_prompt_ids_are_penalized_like_today(engine, voices):
    """transformers' repetition penalty also hits coqui's placeholder prompt ids (1 and start-audio): when
    token 1 is the model's favourite, today's path does not pick it, and neither does the batch."""
    text, language, voice = SENTENCES[1]
    probe = Job(text, language, voices[voice], cap=1)
    run(engine, BatchedGpt.for_engine(engine, max_batch=1), [probe])
    with torch.inference_mode():
        logits = engine.model.gpt.mel_head(probe.out[0].latent)[0]
    best_other = float(torch.cat([logits[:1], logits[2:]]).max())
    assert best_other > 0
    job = Job(text, language, voices[voice], cap=8)
    # Token 1 at twice the best other score: first unpenalized, last once divided by the penalty (10).
    with biased(engine, 1, 2 * best_other - float(logits[1])):
        tokens, latents = alone(engine, text, language, voices[voice])
        run(engine, BatchedGpt.for_engine(engine, max_batch=1), [job])
    assert tokens[0] != 1
    assert_matches(job, tokens, latents, count=8)


def test_seeded_sampling_is_reproducible_inside_a_batch(engine, voices, monkeypatch):
    """With its own generator, a sequence samples the same tokens as today's seeded path, whatever runs beside it."""
    text, language, voice = SENTENCES[0]
    monkeypatch.setattr(engine, "sampling", SAMPLED)
    monkeypatch.setattr(engine, "seed", 1234)
    tokens, latents = alone(engine, text, language, voices[voice])
    monkeypatch.setattr(engine, "seed", 99)
    other_tokens, _ = alone(engine, text, language, voices[voice])
    assert other_tokens != tokens, "another seed should sample other tokens (else this test proves nothing)"

    sampling = Sampling.of_engine(engine)
    jobs = [Job(SENTENCES[i][0], SENTENCES[i][1], voices[i], join_at=i * 2, sampling=sampling,
                generator=torch.Generator().manual_seed(i)) for i in (1, 2, 3)]
    seeded = Job(text, language, voices[voice], join_at=5, sampling=sampling, generator=torch.Generator().manual_seed(1234))
    run(engine, BatchedGpt.for_engine(engine, max_batch=4), [*jobs, seeded])
    assert_matches(seeded, tokens, latents)


def test_admission_limits(engine, voices):
    batched = BatchedGpt.for_engine(engine, max_batch=2)
    prefix = sentence_prefix(engine, "Hola.", "es", voices[0])
    slots = [batched.admit(prefix, Sampling(), 10) for _ in range(2)]
    assert slots == [0, 1] and batched.free_slots == 0
    with pytest.raises(NoFreeSlot):
        batched.admit(prefix, Sampling(), 10)
    batched.release(0)
    assert batched.admit(prefix, Sampling(), 10) == 0
    with pytest.raises(ValueError):
        BatchedGpt.for_engine(engine, max_batch=1, max_len=prefix.shape[1] + 5).admit(prefix, Sampling(), 10)
    assert batched.step() == {}, "nothing decodes before its prefill"
    assert batched.prefill_pending == 2 * prefix.shape[1]
    assert batched.prefill_some(prefix.shape[1] + 3) == prefix.shape[1] + 3
    assert batched.decoding == [0]


def test_sampler_equals_transformers_processors():
    """Per-row settings, penalties and generators give what transformers' processors + torch.multinomial give
    one sequence at a time (as coqui's generator samples today), prompt ids (1, start-audio) penalized too."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    vocab, start = 8194, 8192
    rows = [Sampling(0.75, 50, 0.85, 10.0), Sampling(top_k=1, repetition_penalty=10.0), Sampling(1.3, 0, 0.5, 2.0),
            Sampling(0.6, 200, 1.0, 1.0), Sampling(1.0, 0, 0.9, 5.0), Sampling(0.75, 50, 0.85, 10.0)]
    torch.manual_seed(0)
    scores = torch.randn(len(rows), vocab) * 3
    histories = [torch.randint(0, vocab, (i * 3,)).tolist() for i in range(len(rows))]
    favourites = [1, start, 1, start] + [h[0] for h in histories[-2:]]
    for row, token in enumerate(favourites):  # make a penalized id the top score: the penalty decides
        scores[row, token] = scores[row].max() + 0.5
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool)
    for row, history in enumerate(histories):
        seen[row, [1, start, *history]] = True
    temperature, top_k, top_p_cut, penalty = (torch.tensor(column) for column in zip(*(s.as_row(vocab) for s in rows), strict=True))
    warped = warp_scores(scores, seen, penalty[:, None], temperature[:, None], top_k, top_p_cut[:, None])
    tokens = draw(warped.softmax(-1), [torch.Generator().manual_seed(r) for r in range(len(rows))], torch.empty(len(rows), vocab))

    for row, (sampling, history) in enumerate(zip(rows, histories, strict=True)):
        processors = [RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty, prompt_ignore_length=torch.zeros(1, dtype=torch.long))]
        if sampling.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(sampling.temperature))
        if sampling.top_k:
            processors.append(TopKLogitsWarper(sampling.top_k))
        if sampling.top_p < 1.0:
            processors.append(TopPLogitsWarper(sampling.top_p))
        input_ids = torch.tensor([[1] * 5 + [start] + history])
        expected = scores[row:row + 1].clone()
        for processor in processors:
            expected = processor(input_ids, expected)
        assert torch.equal(torch.isinf(expected[0]), torch.isinf(warped[row])), f"row {row}: other tokens filtered"
        kept = ~torch.isinf(expected[0])
        torch.testing.assert_close(warped[row][kept], expected[0][kept])
        token = torch.multinomial(expected.softmax(-1), 1, generator=torch.Generator().manual_seed(row))
        assert int(tokens[row]) == int(token), f"row {row}"


def test_batched_latents_stream_the_same_audio(engine, voices):
    """Fed to the existing ChunkDecoder as `XttsEngine.stream` feeds it, a batched sequence's latents give
    today's streamed audio (SNR > 60 dB), at its own speed and chunk plan."""
    plan = StreamPlan(first_chunk_tokens=6, chunk_tokens=12, max_chunk_tokens=24)
    jobs = [Job(text, lang, voices[v], join_at=i * 4) for i, (text, lang, v) in enumerate(SENTENCES[:3])]
    run(engine, BatchedGpt.for_engine(engine, max_batch=3), jobs)
    for job, speed in zip(jobs, (1.0, 1.3, 0.85), strict=True):
        to_grid, vocode, columns_per_frame, hop = engine.decoder(job.conditioning, speed)
        decoder = ChunkDecoder(to_grid, vocode, columns_per_frame, hop, context_frames=plan.context_tokens)
        boundaries = plan.boundaries()
        next_flush, chunks = next(boundaries), []
        with torch.inference_mode():
            for emitted in job.out:
                decoder.add(emitted.latent)
                if decoder.frames >= next_flush:
                    next_flush = next(boundaries)
                    chunks.append(decoder.flush())
            chunks.append(decoder.flush(final=True))
        batched = np.concatenate(chunks)
        today = np.concatenate(list(engine.stream(job.text, job.language, job.conditioning, speed=speed, plan=plan)))
        assert len(batched) == len(today) and np.abs(today).max() > 1e-3
        noise = np.sum((today.astype(np.float64) - batched) ** 2)
        assert noise == 0 or 10 * np.log10(np.sum(today.astype(np.float64) ** 2) / noise) > 60


def scheduled(scheduler, jobs: list[tuple[str, str, object]], plan: StreamPlan | None) -> list[list]:
    """Submit sentences to a running Scheduler at once; each one's delivered items, in order, once all ended."""
    from offline_tts.engine.replica import DONE, SentenceJob

    items: list[list] = [[] for _ in jobs]
    ended = [threading.Event() for _ in jobs]

    def deliver_to(i):
        def deliver(item):
            items[i].append(item)
            if item is DONE or isinstance(item, BaseException):
                ended[i].set()
        return deliver

    for i, (text, language, conditioning) in enumerate(jobs):
        scheduler.submit(SentenceJob(text, language, conditioning, deliver_to(i), plan=plan))
    for event in ended:
        assert event.wait(120), "a sentence never ended"
    return items


@pytest.mark.parametrize("plan", [StreamPlan(first_chunk_tokens=4, chunk_tokens=8, max_chunk_tokens=16), None])
def test_vocoder_thread_gives_the_scheduler_s_own_audio(engine, voices, plan):
    """HiFi-GAN on its own thread: the same chunks, in the same order, as when it runs on the scheduler's thread."""
    from offline_tts.engine.replica import DONE
    from offline_tts.engine.scheduler import Scheduler

    jobs = [(text, lang, voices[v]) for text, lang, v in SENTENCES]
    results = {}
    for threaded in (False, True):
        scheduler = Scheduler(engine, 4, vocoder_thread=threaded)
        try:
            results[threaded] = scheduled(scheduler, jobs, plan)
        finally:
            scheduler.close()
        assert scheduler.vocoder_seconds > 0
    for inline, threaded in zip(results[False], results[True], strict=True):
        assert inline[-1] is DONE and threaded[-1] is DONE
        assert [len(c) for c in inline[:-1]] == [len(c) for c in threaded[:-1]]
        assert len(inline) > (3 if plan else 1)
        for a, b in zip(inline[:-1], threaded[:-1], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_vocoder_thread_failure_fails_that_sentence_only(engine, voices, monkeypatch):
    """An error while vocoding one sentence (on the vocoder thread) fails it alone: the others end normally,
    its slot is freed, and the scheduler serves the next sentences."""
    from offline_tts.engine import scheduler as scheduler_module
    from offline_tts.engine.replica import DONE

    original = scheduler_module._Sequence.vocode

    def vocode(self, latents, final):
        if self.job.text.startswith("Hello") and self.decoder.frames >= 8:
            raise RuntimeError("simulated vocoder failure")
        return original(self, latents, final)

    monkeypatch.setattr(scheduler_module._Sequence, "vocode", vocode)
    plan = StreamPlan(first_chunk_tokens=4, chunk_tokens=8, max_chunk_tokens=16)
    scheduler = scheduler_module.Scheduler(engine, 4, vocoder_thread=True)
    try:
        items = scheduled(scheduler, [(text, lang, voices[v]) for text, lang, v in SENTENCES], plan)
        failed = [i for i, got in enumerate(items) if isinstance(got[-1], BaseException)]
        assert failed == [1] and "simulated vocoder failure" in str(items[1][-1])
        assert all(got[-1] is DONE for i, got in enumerate(items) if i != 1)
        deadline = time.monotonic() + 10
        while scheduler.busy_slots and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.busy_slots == 0, "the failed sentence kept its slot"
        again = scheduled(scheduler, [SENTENCES[0][:2] + (voices[0],)], plan)
        assert again[0][-1] is DONE and len(again[0]) > 2
    finally:
        scheduler.close()


def test_joiners_wait_in_pieces_only_while_a_stream_is_playing(engine, voices, monkeypatch):
    """A sentence that joins while another stream has audio out is prefilled at most `prefill_tokens` per turn
    (that stream keeps getting steps); sentences that all start together are prefilled whole at once."""
    from offline_tts.engine.scheduler import Scheduler

    plan = StreamPlan(first_chunk_tokens=2, chunk_tokens=4, max_chunk_tokens=8)
    scheduler = Scheduler(engine, 4, prefill_tokens=8)  # HiFi-GAN inline: its callbacks run between steps
    budgets: list[tuple[int, bool]] = []
    original = scheduler.gpt.prefill_some

    def prefill_some(max_tokens):
        budgets.append((max_tokens, scheduler._playing()))
        return original(max_tokens)

    monkeypatch.setattr(scheduler.gpt, "prefill_some", prefill_some)
    try:
        together = [(text, lang, voices[v]) for text, lang, v in SENTENCES[:3]]
        scheduled(scheduler, together, plan)
        assert budgets and all(budget > 8 and not playing for budget, playing in budgets), budgets
        budgets.clear()
        # One stream plays; a second sentence joins the moment its first chunk is out (from its callback).
        from offline_tts.engine.replica import DONE, SentenceJob

        ended = [threading.Event(), threading.Event()]
        joined = threading.Event()
        late_items: list = []

        def late(item):
            late_items.append(item)
            if item is DONE or isinstance(item, BaseException):
                ended[1].set()

        def playing(item):
            if isinstance(item, np.ndarray) and not joined.is_set():
                joined.set()
                text, lang, v = SENTENCES[0]
                scheduler.submit(SentenceJob(text, lang, voices[v], late, plan=plan))
            elif item is DONE or isinstance(item, BaseException):
                ended[0].set()

        text, lang, v = SENTENCES[2]
        scheduler.submit(SentenceJob(text, lang, voices[v], playing, plan=plan))
        assert ended[0].wait(60) and ended[1].wait(60)
        assert late_items[-1] is DONE
        pieces = [budget for budget, playing in budgets if playing]
        assert len(pieces) >= 2 and set(pieces) == {8}, budgets  # the joiner's prefix took several turns
    finally:
        scheduler.close()
