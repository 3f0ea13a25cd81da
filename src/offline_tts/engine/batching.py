"""Continuous batching for the XTTS GPT: many sentences, one forward pass per audio token.

`BatchedGpt` owns one loaded XTTS model's GPT and decodes up to `max_batch` sentences at once, each in
its own *slot*: its own voice conditioning, text, sampling settings, token cap and random generator.
A sentence joins (`admit`) while others are running and leaves the moment it ends, freeing its slot.

Why this works without padding or re-packing: the XTTS GPT is a GPT-2 whose position information comes
only from its input embeddings (`gpt.wpe` is a null embedding; coqui adds the mel position embedding to
each audio token itself). So each slot can sit at its own length: it writes its new key/value at its own
index of a static per-slot KV cache and attends over its own valid prefix through a mask.

The cache is one block, [layers, k/v, max_batch, heads, max_len, head_dim], allocated once per busy
period and freed when the replica goes idle (`trim`); on the CPU only the pages a step touches are mapped.
A decode step runs the rows 0..n-1 (n = the highest busy slot + 1; slots are handed out lowest first)
over the first L cache positions (the longest busy slot, rounded up to `length_bucket`), so its shapes
come from a small fixed set: on CUDA each (n, L) bucket can later be captured as a CUDA graph.

The GPT-2 blocks are run by hand over the HuggingFace modules (ln_1, c_attn, c_proj, ln_2, mlp, ln_f):
that gives full control of the cache writes and masks, and still works with the int8 GPT of
`quantize.py`, which swaps those modules. Outputs equal coqui's streaming generator (the path
`XttsEngine.latents` takes today): the same latents (the final-norm hidden state that HiFi-GAN
consumes) and, with the same seed, the same tokens.

Joining costs a prefill of the sentence's conditioning + text prefix (~100-450 tokens). It runs in
pieces (`prefill_some`), so a scheduler can interleave it with decode steps and keep the running
streams' step time bounded. The start-of-audio token is not part of the prefill: it is the slot's first
input of the batched step, which therefore produces every slot's every (token, latent), the first one
included.

No threads here. The intended owner is one scheduler thread per model replica: it admits queued
sentences into free slots (`sentence_prefix` + `admit`), prefills a bounded piece between two steps
(`prefill_some`), runs `step`, hands each latent to its request's `ChunkDecoder` (or a vocoder thread),
and `release`s the slots of cancelled requests. Nothing else may run this model's GPT meanwhile.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


STOP = "stop"  # the sequence produced the stop-audio token
CAP = "cap"  # the sequence reached its token cap


@dataclass(frozen=True)
class Sampling:
    """One sequence's sampling settings, applied as transformers' generate does for coqui today:
    repetition penalty, temperature, top-k, top-p, then a multinomial draw. Greedy decoding is top_k=1."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off

    @classmethod
    def of_engine(cls, engine) -> Sampling:
        """The settings an `XttsEngine` samples with (its `sampling` dict)."""
        s = engine.sampling
        return cls(float(s["temperature"]), int(s["top_k"]), float(s["top_p"]), float(s["repetition_penalty"]))

    def as_row(self, vocab: int) -> tuple[float, int, float, float]:
        """(temperature, top-k, top-p cut, penalty) as `warp_scores` takes them: every filter always runs,
        set so that an "off" one changes nothing."""
        top_k = min(self.top_k, vocab) if self.top_k > 0 else vocab
        top_p_cut = 1.0 - self.top_p if self.top_p < 1.0 else -1.0
        return self.temperature, top_k, top_p_cut, self.repetition_penalty


class Emitted(NamedTuple):
    """One audio token of one sequence, and the latent frame HiFi-GAN turns into its audio."""

    token: int
    latent: torch.Tensor  # [1, model_dim] float32, what `XttsEngine.latents` yields
    finished: str | None  # STOP, CAP or None; a finished sequence has already left its slot


class NoFreeSlot(RuntimeError):
    """All `max_batch` slots are busy: the caller queues the sentence until one is released."""


@dataclass
class _Slot:
    prefix: torch.Tensor | None  # [P, C] embeddings still to prefill; None once prefilled
    prefilled: int
    cap: int
    generator: torch.Generator | None
    generated: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefix is None


def default_max_len(gpt) -> int:
    """Longest sequence one slot can hold: conditioning + text prefix, start-of-audio token, audio tokens."""
    conditioning = gpt.conditioning_perceiver.latents.shape[0] if gpt.use_perceiver_resampler else gpt.max_prompt_tokens
    return conditioning + gpt.max_text_tokens + 1 + gpt.max_gen_mel_tokens


def sentence_prefix(engine, text: str, language: str, conditioning) -> torch.Tensor:
    """The GPT prefix of one sentence for `BatchedGpt.admit`: tokenized and checked by the engine."""
    ids = engine.text_ids(text, language)
    text_ids = torch.tensor(ids, dtype=torch.long, device=engine.device)[None]
    return prefix_embeddings(engine.model.gpt, conditioning.data["gpt_cond_latent"].to(engine.device), text_ids)


@torch.inference_mode()
def prefix_embeddings(gpt, cond_latent: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
    """What coqui's `GPT.compute_embeddings` builds (conditioning latents, then start/text/stop embeddings
    with their text positions), without storing it on the shared model. [1, P, C]."""
    text_ids = F.pad(text_ids, (0, 1), value=gpt.stop_text_token)
    text_ids = F.pad(text_ids, (1, 0), value=gpt.start_text_token)
    emb = gpt.text_embedding(text_ids) + gpt.text_pos_embedding(text_ids)
    return torch.cat([cond_latent, emb], dim=1)


class BatchedGpt:
    """The XTTS GPT of one model, decoding up to `max_batch` sequences together (not thread-safe:
    one scheduler thread owns it, and nothing else may run this model's GPT meanwhile)."""

    def __init__(self, model, max_batch: int, *, device: str | torch.device = "cpu", half: bool = False,
                 max_len: int | None = None, length_bucket: int = 64, cuda_graphs: bool = False):
        gpt = model.gpt
        self._gpt = gpt
        self._blocks = list(gpt.gpt.h)
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.max_len = max_len or default_max_len(gpt)
        self.max_tokens = int(gpt.max_gen_mel_tokens)
        self._bucket = length_bucket
        self._heads = gpt.heads
        self._head_dim = gpt.model_dim // gpt.heads
        self._start, self._stop = int(gpt.start_audio_token), int(gpt.stop_audio_token)
        self._vocab = gpt.mel_head.out_features
        # fp16 on CUDA as the engine runs today (autocast), fp32 elsewhere.
        # (no weight-cast cache under CUDA graphs: torch requires it off during capture)
        self._autocast = (torch.autocast("cuda", dtype=torch.float16, cache_enabled=not cuda_graphs)
                          if half and self.device.type == "cuda"
                          else None)
        self._cache_dtype = torch.float16 if self._autocast else torch.float32
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._zeroed = [0] * max_batch  # cache positions of each row made finite (see `_allocate`)
        self._allocate()
        # Per-slot decode state, on the device so the step reads it without host round trips.
        b = max_batch
        self._lengths = torch.zeros(b, dtype=torch.long, device=self.device)  # cache positions filled
        self._next_token = torch.full((b,), self._start, dtype=torch.long, device=self.device)
        self._audio_pos = torch.zeros(b, dtype=torch.long, device=self.device)  # mel position of next_token
        self._temperature = torch.ones(b, 1, device=self.device)
        self._top_k = torch.full((b,), self._vocab, dtype=torch.long, device=self.device)
        self._top_p_cut = torch.full((b, 1), -1.0, device=self.device)  # 1 - top_p; -1: off
        self._penalty = torch.ones(b, 1, device=self.device)
        self._seen = torch.zeros(b, self._vocab, dtype=torch.bool, device=self.device)  # tokens to penalize
        self._noise = torch.empty(b, self._vocab, device=self.device)  # exponential draws of the sampler
        self._positions = torch.arange(self.max_len, device=self.device)
        self._rows = torch.arange(b, device=self.device)
        self._slots: list[_Slot | None] = [None] * b
        # CUDA graphs of the decode step, one per (rows, span) bucket, captured on first use; their
        # intermediate tensors share one memory pool. Off the GPU the setting does nothing.
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._graph_pool = None

    def _allocate(self) -> None:
        """One block for the whole cache, [layers, k/v, max_batch, heads, max_len, head_dim], left
        uninitialised: the OS maps its pages only when first written, so memory follows the slots and
        lengths actually used (a full-size fp32 slot is ~255 MB: all of it for 8 slots doubled the
        server's RSS). Positions a step reads before any sequence wrote them are zeroed first
        (`_readable`): garbage could hold NaN, and a masked NaN still poisons the attention."""
        if self._keys:
            return
        cache = torch.empty((len(self._blocks), 2, self.max_batch, self._heads, self.max_len, self._head_dim),
                            dtype=self._cache_dtype, device=self.device)
        self._keys = [layer[0] for layer in cache]
        self._values = [layer[1] for layer in cache]
        self._zeroed = [0] * self.max_batch
        if self.device.type != "cpu":  # device memory is not mapped lazily: zero it all at once
            cache.zero_()
            self._zeroed = [self.max_len] * self.max_batch

    def trim(self) -> bool:
        """Free the KV cache while no slot is busy (the scheduler calls this when idle); the next `admit`
        allocates it again. Returns whether it was freed."""
        if self.device.type != "cpu" or any(s is not None for s in self._slots) or not self._keys:
            return False  # on a GPU the cache stays: CUDA graphs hold its addresses
        self._keys, self._values = [], []
        return True

    def _readable(self, n: int, span: int) -> None:
        """Make positions [0, span) of rows 0..n-1 finite before a step attends over them (what a row's
        sequence has written so far is kept: a joining one may be mid-prefill)."""
        for row, state in enumerate(self._slots[:n]):
            if self._zeroed[row] < span:
                held = 0 if state is None else state.prefilled + state.generated
                if max(held, self._zeroed[row]) < span:
                    for cache in (*self._keys, *self._values):
                        cache[row, :, max(held, self._zeroed[row]):span].zero_()
                self._zeroed[row] = span

    @classmethod
    def for_engine(cls, engine, max_batch: int, **kwargs) -> BatchedGpt:
        """Over an `XttsEngine`'s model, on its device and precision."""
        return cls(engine.model, max_batch, device=engine.device, half=engine.half, **kwargs)

    # -- slots ------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self._slots.count(None)

    @property
    def decoding(self) -> list[int]:
        """Slots that take part in the next `step`."""
        return [i for i, s in enumerate(self._slots) if s is not None and s.decoding]

    @property
    def prefill_pending(self) -> int:
        """Prefix tokens still to prefill, all joining slots together."""
        return sum(len(s.prefix) - s.prefilled for s in self._slots if s is not None and not s.decoding)

    def admit(self, prefix: torch.Tensor, sampling: Sampling, cap: int,
              generator: torch.Generator | None = None) -> int:
        """Reserve a slot for a sequence with this prefix ([1, P, C], see `sentence_prefix`) and return it.

        At most `cap` tokens are generated (never more than the model's limit). `generator` (on the model's
        device) makes the sampling reproducible whatever else is in the batch; None uses torch's default
        generator, as the existing path does. The slot decodes once `prefill_some` has prefilled it.
        """
        if prefix.dim() != 3 or prefix.shape[0] != 1:
            raise ValueError(f"prefix must be [1, tokens, dim], got {tuple(prefix.shape)}")
        cap = max(1, min(int(cap), self.max_tokens))
        if prefix.shape[1] + cap > self.max_len:
            raise ValueError(f"prefix of {prefix.shape[1]} tokens + {cap} audio tokens exceed the slot length {self.max_len}")
        if None not in self._slots:
            raise NoFreeSlot(f"all {self.max_batch} slots are busy")
        self._allocate()
        slot = self._slots.index(None)
        self._slots[slot] = _Slot(prefix=prefix[0].to(self.device), prefilled=0, cap=cap, generator=generator)
        self._lengths[slot] = 0
        self._next_token[slot] = self._start
        self._audio_pos[slot] = 0
        (self._temperature[slot], self._top_k[slot], self._top_p_cut[slot],
         self._penalty[slot]) = sampling.as_row(self._vocab)
        # transformers penalizes the prompt ids too: coqui's placeholder ids (1) and the start-audio token.
        self._seen[slot] = False
        for token in (1, self._start):
            if token < self._vocab:
                self._seen[slot, token] = True
        return slot

    def release(self, slot: int) -> None:
        """Free a slot now (cancelled, or its consumer went away); its cache rows are simply reused."""
        self._slots[slot] = None
        self._lengths[slot] = 0

    # -- prefill ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_some(self, max_tokens: int) -> int:
        """Prefill up to `max_tokens` prefix tokens of joining slots (oldest slot first, as few pieces as
        possible); returns how many were prefilled (0: nothing pending). Slots fully prefilled decode from
        the next `step` on."""
        done = 0
        for slot, state in enumerate(self._slots):
            while state is not None and not state.decoding and done < max_tokens:
                start = state.prefilled
                end = min(len(state.prefix), start + max_tokens - done)
                with self._autocast or contextlib.nullcontext():
                    self._prefill_piece(slot, state.prefix[start:end], start)
                state.prefilled = end
                self._lengths[slot] = end
                done += end - start
                if end == len(state.prefix):
                    state.prefix = None
        return done

    def _prefill_piece(self, slot: int, x: torch.Tensor, start: int) -> None:
        """Run prefix positions [start, start + len(x)) of one slot, writing their keys/values."""
        end = start + len(x)
        x = x[None]  # [1, t, C]
        causal = self._positions[None, :end] <= self._positions[start:end, None]  # [t, end]
        last = len(self._blocks) - 1
        for i, block in enumerate(self._blocks):
            h = block.ln_1(x)
            q, k, v = self._split_heads(block.attn.c_attn(h))
            self._keys[i][slot, :, start:end] = k[0]
            self._values[i][slot, :, start:end] = v[0]
            if i == last:
                break  # the last block's output is not needed: only its keys/values are
            a = F.scaled_dot_product_attention(q, self._keys[i][slot:slot + 1, :, :end],
                                               self._values[i][slot:slot + 1, :, :end], attn_mask=causal)
            x = x + block.attn.c_proj(self._merge_heads(a))
            x = x + block.mlp(block.ln_2(x))

    # -- decode -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> dict[int, Emitted]:
        """One batched forward over all decoding slots: each gets its next token and latent.

        A slot that finishes (stop token or cap) is released before this returns."""
        rows = self.decoding
        if not rows:
            return {}
        n = rows[-1] + 1
        write_at = self._lengths[:n]
        longest = max(self._slots[row].prefilled + self._slots[row].generated for row in rows) + 1
        span = min(self.max_len, -(-longest // self._bucket) * self._bucket)
        self._readable(n, span)
        if self.cuda_graphs:
            latents, logits = self._graphed_forward(n, span)
        else:
            latents, logits = self._forward(n, write_at, span)
        active = torch.tensor(rows, device=self.device)
        tokens = self._sample(active, logits[active].float())
        self._lengths[active] += 1
        self._audio_pos[active] += 1
        self._next_token[active] = tokens
        self._seen[active, tokens] = True
        out = {}
        latents = latents.float()
        for row, token in zip(rows, tokens.tolist(), strict=True):
            state = self._slots[row]
            state.generated += 1
            finished = STOP if token == self._stop else CAP if state.generated >= state.cap else None
            out[row] = Emitted(token, latents[row:row + 1].clone(), finished)
            if finished:
                self.release(row)
        return out

    def _forward(self, n: int, write_at: torch.Tensor, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast or contextlib.nullcontext():
            latents = self._decode_forward(n, write_at, span)
            return latents, self._gpt.mel_head(latents)

    def _graphed_forward(self, n: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`_forward` replayed from a CUDA graph (UNTESTED on a GPU: none was available when it was written).

        Static shapes: rows are rounded up to a power of two and the span to a power of two times the
        length bucket, so a few dozen graphs cover every batch; the extra rows run on whatever their
        cache holds and are ignored, as free rows are. The graph reads the step's inputs from the slot
        state tensors (`_next_token`, `_audio_pos`, `_lengths`), which never move."""
        rows = min(self.max_batch, 1 << (n - 1).bit_length())
        buckets = -(-span // self._bucket)
        span = min(self.max_len, self._bucket << (buckets - 1).bit_length())
        key = (rows, span)
        if key not in self._graphs:
            # Warm-up on a side stream before capture, as torch requires; these runs write the same keys and
            # values the real step writes (same inputs), so they change nothing.
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(rows, self._lengths[:rows], span)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                out = self._forward(rows, self._lengths[:rows], span)
            self._graphs[key] = (graph, out)
        graph, (latents, logits) = self._graphs[key]
        graph.replay()
        return latents[:n], logits[:n]

    def _decode_forward(self, n: int, write_at: torch.Tensor, span: int) -> torch.Tensor:
        """Rows 0..n-1, one token each, over the first `span` cache positions; returns [n, C] latents.

        Rows that are not decoding (free, or mid-prefill) run too, on whatever they hold: they write at
        their own fill index (overwritten by their next prefill piece or join) and are ignored."""
        gpt = self._gpt
        x = gpt.mel_embedding(self._next_token[:n]) + gpt.mel_pos_embedding.emb(self._audio_pos[:n])
        x = x[:, None]  # [n, 1, C]
        mask = (self._positions[None, :span] <= write_at[:, None])[:, None, None]  # [n, 1, 1, span]
        rows = self._rows[:n]
        for i, block in enumerate(self._blocks):
            h = block.ln_1(x)
            q, k, v = self._split_heads(block.attn.c_attn(h))
            self._keys[i][rows, :, write_at] = k[:, :, 0].to(self._keys[i].dtype)
            self._values[i][rows, :, write_at] = v[:, :, 0].to(self._values[i].dtype)
            a = F.scaled_dot_product_attention(q, self._keys[i][:n, :, :span], self._values[i][:n, :, :span],
                                               attn_mask=mask)
            x = x + block.attn.c_proj(self._merge_heads(a))
            x = x + block.mlp(block.ln_2(x))
        # coqui's latent: its final norm over the GPT-2's ln_f output (the mel head reads the same).
        return gpt.final_norm(gpt.gpt.ln_f(x[:, 0]))

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = qkv.shape
        q, k, v = qkv.view(b, t, 3, self._heads, self._head_dim).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [b, heads, t, head_dim]

    @staticmethod
    def _merge_heads(a: torch.Tensor) -> torch.Tensor:
        b, h, t, d = a.shape
        return a.transpose(1, 2).reshape(b, t, h * d)

    def _sample(self, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = warp_scores(scores, self._seen[rows], self._penalty[rows], self._temperature[rows],
                             self._top_k[rows], self._top_p_cut[rows])
        generators = [self._slots[row].generator for row in rows.tolist()]
        return draw(scores.softmax(dim=-1), generators, self._noise[: len(generators)])


def warp_scores(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor, temperature: torch.Tensor,
                top_k: torch.Tensor, top_p_cut: torch.Tensor) -> torch.Tensor:
    """transformers' logits processors as generate() chains them for coqui (repetition penalty, temperature,
    top-k, top-p), with each row's own settings: scores [b, V]; `seen` [b, V] the ids to penalize;
    penalty, temperature, top_p_cut (1 - top_p, or -1 for off) [b, 1]; top_k [b] (V for off)."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    scores = torch.where(seen, penalized, scores)
    scores = scores / temperature
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(1, (top_k - 1)[:, None])
    scores = scores.masked_fill(scores < kth, float("-inf"))
    ascending, order = torch.sort(scores, dim=-1)
    drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= top_p_cut
    drop[:, -1] = False  # keep at least one token
    return scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def draw(probs: torch.Tensor, generators: list[torch.Generator | None], noise: torch.Tensor) -> torch.Tensor:
    """One token per row, each from its own generator: torch.multinomial's own algorithm for one sample
    (argmax of probs / Exp(1) noise), so a generator seeded as today's global one gives the same token."""
    for row, generator in enumerate(generators):
        noise[row].exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)
