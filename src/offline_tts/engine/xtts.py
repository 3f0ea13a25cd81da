"""XTTS-v2 engine: loading, voice conditioning and sentence synthesis with coqui-tts.

One `XttsEngine` wraps one model replica. The service runs it through a scheduler (engine/scheduler.py)
that batches the sentences of concurrent requests with `gpt_prefix`, `token_cap` and `decoder`.
`stream`/`synthesize` are the one-sentence reference path (warm-up-free tests, benches): the XTTS model
keeps per-call state (`gpt_inference.cached_prefix_emb`), so they hold the replica's lock.

The engine's two halves are public on purpose: `latents` (the GPT, one latent per audio token) and `decoder`
(HiFi-GAN, split into grid + vocode). They are the seams that benchmarks and tests wrap to time or replay
each half (bench/engine_bench.py `instrumented`), instead of patching private methods.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidText
from ..language import primary
from ..text import split_sentences
from .base import Conditioning, StreamPlan
from .batching import sentence_prefix
from .model_files import REQUIRED_FILES
from .streaming import ChunkDecoder
from .xtts_numbers import ALL, LONG, UNSAYABLE, spell_numbers

log = logging.getLogger(__name__)

# Audio tokens allowed per character of text before a sentence is cut off as runaway ("babbling").
# Real speech needs ~1.5 tokens/char (21.5 tokens per second of audio); 3 leaves room for slow voices.
TOKENS_PER_CHAR = 3.0
MIN_TOKENS = 40


def pick_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TTS_DEVICE=cuda but no CUDA GPU is visible (check the NVIDIA driver / container toolkit)")
    return requested


def model_fingerprint(model_dir: Path) -> str:
    """Identify a checkpoint cheaply: config + vocab bytes, and the weights' size and first/last MiB."""
    h = hashlib.sha256()
    for name in ("config.json", "vocab.json"):
        h.update((model_dir / name).read_bytes())
    weights = model_dir / "model.pth"
    size = weights.stat().st_size
    h.update(str(size).encode())
    with weights.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


class SeededSampling:
    """The last logits processor of a seeded sentence: samples the next token with the sentence's own
    torch.Generator and leaves only that token possible.

    generate() samples with torch.multinomial from torch's global RNG, which every worker thread shares:
    concurrent sentences would draw from one stream, so a seed could not make output reproducible.
    transformers (5.x) runs custom processors *before* its sampling warpers, so generate() is called
    without sampling (do_sample=False: no warpers) and this applies the same temperature, top-k and
    top-p warpers, in transformers' order, before drawing. generate()'s own draw then has one choice.
    """

    def __init__(self, generator: torch.Generator, temperature: float, top_k: int, top_p: float):
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.generator = generator
        self.warpers = []
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for warp in self.warpers:
            scores = warp(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)


def _fold_weight_norm(module: torch.nn.Module) -> None:
    """Bake weight-norm parametrizations into plain weights: same output, no recomputation per call."""
    from torch.nn.utils import parametrize

    for m in module.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)


class XttsEngine:
    conditioning_sample_rate = 22_050
    batched = True  # the pool runs it on the batching Scheduler
    audio_tokens_per_second = 22_050 / 1024  # one GPT audio token: 1024 samples of the 22.05 kHz mel frames

    def __init__(
        self,
        model_dir: Path,
        device: str = "auto",
        *,
        max_audio_tokens: int | None = None,
        half: bool = True,
        cpu_int8: bool = False,
        temperature: float = 0.75,
        top_k: int = 50,
        top_p: float = 0.85,
        repetition_penalty: float = 10.0,
        greedy: bool = False,
        seed: int | None = None,
    ):
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
        if missing:
            raise FileNotFoundError(f"XTTS-v2 model files missing in {model_dir}: {', '.join(missing)}")
        self.device = pick_device(device)
        started = time.perf_counter()
        config = XttsConfig()
        config.load_json(str(model_dir / "config.json"))
        model = Xtts(config)
        model.load_checkpoint(config, checkpoint_dir=str(model_dir), use_deepspeed=False, eval=True)
        model.to(self.device)
        model.eval()
        _fold_weight_norm(model.hifigan_decoder.waveform_decoder)
        if cpu_int8 and self.device == "cpu":
            from .quantize import quantize_gpt_int8

            log.info("Quantized %d GPT layers to dynamic int8 (TTS_CPU_INT8)", quantize_gpt_int8(model))
        self.model = model
        self.config = config
        self.model_id = model_fingerprint(model_dir)
        self.sample_rate = int(config.model_args.output_sample_rate)
        self.languages = tuple(config.languages)
        self.model_max_tokens = int(model.gpt.max_gen_mel_tokens)
        self.max_audio_tokens = max_audio_tokens
        self.half = half and self.device == "cuda"
        # coqui's streaming generator always samples (multinomial): greedy decoding is top_k=1.
        self.sampling = dict(temperature=temperature, top_k=1 if greedy else top_k, top_p=top_p,
                             repetition_penalty=float(repetition_penalty), do_sample=True)
        self.seed = seed
        self._lock = threading.Lock()
        self._text_lock = threading.Lock()  # the tokenizer alone: text preparation must not wait for a generation
        self.load_seconds = time.perf_counter() - started
        if (model_dir / "RANDOM_WEIGHTS.json").exists():
            log.warning("%s holds RANDOM weights (offline-tts random-model): the audio is noise, for tests only", model_dir)
        log.info("XTTS-v2 loaded from %s on %s in %.1f s (model id %s)", model_dir, self.device, self.load_seconds, self.model_id)

    # -- text -------------------------------------------------------------------------------------
    def char_limit(self, language: str) -> int:
        return self.model.tokenizer.char_limits.get(primary(language), 250)

    def prepare_text(self, text: str, language: str) -> list[str]:
        """One sentence as the pieces this model will speak, each one its tokenizer accepts.

        Numbers are spelled out when the tokenizer's expansion cannot say them or says them in too many
        tokens (very long ones always: digit by digit); text that grew past the character limit is split
        again; pieces with nothing to say (punctuation, symbols) are dropped. Raises InvalidText when the
        text cannot be read or is still too long for the model."""
        lang = primary(language)
        everything = spell_numbers(text, lang, ALL)
        error: Exception | None = None
        for which in (LONG, UNSAYABLE, ALL):  # spelling out more and more numbers
            candidate = spell_numbers(text, lang, which)
            try:
                return self._spoken_pieces(candidate, language)
            except Exception as exc:  # num2words raises many kinds (NotImplementedError, OverflowError, ...)
                error = exc
            if candidate == everything:
                break  # nothing left to spell out
        if isinstance(error, InvalidText):
            raise error
        log.warning("Text the tokenizer cannot read (%s: %s): %.80r", type(error).__name__, error, text)
        raise InvalidText(f"The model's text processing cannot read this text ({type(error).__name__}).",
                          "Write numbers and symbols in words, or remove them.") from error

    def _spoken_pieces(self, text: str, language: str) -> list[str]:
        """`text` in pieces within the character limit, checked by the tokenizer; raises what it raises."""
        lang, limit = primary(language), self.char_limit(language)
        pieces = [text] if len(text) <= limit else split_sentences(text, language, limit)
        spoken = []
        for piece in pieces:
            with self._text_lock:
                said = self.model.tokenizer.preprocess_text(piece.lower(), lang)
            if not any(c.isalnum() for c in said):
                continue
            self.text_ids(piece, language)  # too many tokens for the model: InvalidText
            spoken.append(piece)
        return spoken

    def text_ids(self, text: str, language: str) -> list[int]:
        """The sentence's text tokens, or InvalidText when the model cannot take that many. The tokenizer
        has its own lock: text preparation in other threads must not wait for a generation."""
        with self._text_lock:
            ids = self.model.tokenizer.encode(text.strip().lower(), lang=primary(language))
        limit = self.model.args.gpt_max_text_tokens
        if len(ids) >= limit:
            raise InvalidText(f"A sentence is too long for the model ({len(ids)} text tokens, the limit is {limit - 1}).",
                              "Cut it into shorter sentences, or write long numbers in shorter groups.")
        return ids

    def token_cap(self, text: str) -> int:
        """Most audio tokens one sentence may generate: proportional to its length, never over the model's limit."""
        cap = min(self.model_max_tokens, max(MIN_TOKENS, int(len(text) * TOKENS_PER_CHAR)))
        if self.max_audio_tokens:
            cap = min(cap, self.max_audio_tokens)
        return cap

    # -- voices -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def compute_conditioning(self, clips: list[np.ndarray]) -> Conditioning:
        sr = self.conditioning_sample_rate
        cfg = self.config
        max_len = int(sr * cfg.max_ref_len)
        with self._lock:
            audios, embeddings = [], []
            for clip in clips:
                audio = torch.from_numpy(np.ascontiguousarray(clip[:max_len], dtype=np.float32))[None].to(self.device)
                if cfg.sound_norm_refs:
                    audio = audio / audio.abs().max() * 0.75
                embeddings.append(self.model.get_speaker_embedding(audio, sr))
                audios.append(audio)
            gpt_latent = self.model.get_gpt_cond_latents(
                torch.cat(audios, dim=-1), sr, length=cfg.gpt_cond_len, chunk_length=cfg.gpt_cond_chunk_len
            )
            speaker = torch.stack(embeddings).mean(dim=0)
        return Conditioning(self.model_id, {"gpt_cond_latent": gpt_latent.cpu(), "speaker_embedding": speaker.cpu()})

    def save_conditioning(self, conditioning: Conditioning, target: BinaryIO) -> None:
        torch.save({"model_id": conditioning.model_id, **conditioning.data}, target)

    def load_conditioning(self, path: Path) -> Conditioning:
        data = torch.load(path, map_location="cpu", weights_only=True)
        model_id = data.pop("model_id")
        if model_id != self.model_id or set(data) != {"gpt_cond_latent", "speaker_embedding"}:
            raise ValueError(f"{path.name}: conditioning of another model or incomplete")
        return Conditioning(model_id, data)

    # -- synthesis --------------------------------------------------------------------------------
    def gpt_prefix(self, text: str, language: str, conditioning: Conditioning) -> torch.Tensor:
        """One sentence's GPT prefix (conditioning + text embeddings) for the batched decoder
        (engine/batching.py; the scheduler admits it into a slot). Raises InvalidText for a sentence too long."""
        return sentence_prefix(self, text, language, conditioning)

    def latents(self, text: str, language: str, conditioning: Conditioning, cancel: threading.Event | None) -> Iterator[torch.Tensor]:
        """GPT audio latents of one sentence, one frame at a time (caller holds the lock)."""
        ids = self.text_ids(text, language)
        tokens = torch.IntTensor(ids).unsqueeze(0).to(self.device)
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.half else contextlib.nullcontext()
        with autocast:
            fake_inputs = self.model.gpt.compute_embeddings(conditioning.data["gpt_cond_latent"].to(self.device), tokens)
            generator = self.model.gpt.get_generator(
                fake_inputs=fake_inputs, num_beams=1, num_return_sequences=1, length_penalty=1.0,
                output_attentions=False, output_hidden_states=True, return_dict_in_generate=True,
                **self._sampling_arguments(),
            )
            cap = self.token_cap(text)
            try:
                for count, (_token, latent) in enumerate(generator, start=1):
                    yield latent.float()
                    if count >= cap:
                        log.debug("sentence cut at %d audio tokens (cap)", cap)
                        break
                    if cancel is not None and cancel.is_set():
                        break
            finally:
                generator.close()

    def _sampling_arguments(self) -> dict:
        """generate()'s sampling arguments for one sentence: with a seed, the sentence draws from a
        generator of its own, seeded afresh (reproducible whatever other workers do meanwhile)."""
        if self.seed is None:
            return self.sampling
        from transformers import LogitsProcessorList

        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        sampler = SeededSampling(generator, self.sampling["temperature"], self.sampling["top_k"], self.sampling["top_p"])
        return dict(repetition_penalty=self.sampling["repetition_penalty"], do_sample=False,
                    logits_processor=LogitsProcessorList([sampler]))

    def decoder(self, conditioning: Conditioning, speed: float):
        """Split XTTS's HiFi-GAN decoder in two: latents -> interpolated grid, and grid slice -> audio."""
        speaker = conditioning.data["speaker_embedding"].to(self.device)
        hifigan = self.model.hifigan_decoder
        length_scale = 1.0 / max(speed, 0.05)
        scales = [hifigan.ar_mel_length_compression / hifigan.output_hop_length]
        if hifigan.output_sample_rate != hifigan.input_sample_rate:
            scales.append(hifigan.output_sample_rate / hifigan.input_sample_rate)

        def to_grid(latents: torch.Tensor) -> torch.Tensor:  # [1, T, C] -> [1, C, N], as HifiDecoder.forward
            z = latents.transpose(1, 2)
            if length_scale != 1.0:
                z = F.interpolate(z, scale_factor=length_scale, mode="linear")
            for scale in scales:
                z = F.interpolate(z, scale_factor=scale, mode="linear")
            return z

        def vocode(grid: torch.Tensor) -> np.ndarray:
            # fp32 always: in `stream` this runs while `latents` (a suspended generator) still holds the
            # GPT's fp16 autocast region open on CUDA; batch decodes after it closed.
            with torch.autocast(grid.device.type, enabled=False):
                return hifigan.waveform_decoder(grid.float(), g=speaker).squeeze().float().cpu().numpy()

        columns_per_frame = length_scale
        for scale in scales:
            columns_per_frame *= scale
        return to_grid, vocode, columns_per_frame, hifigan.output_hop_length

    @torch.inference_mode()
    def stream(self, text: str, language: str, conditioning: Conditioning, *, speed: float = 1.0,
               plan: StreamPlan | None = None, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        plan = plan or StreamPlan()
        to_grid, vocode, columns_per_frame, hop = self.decoder(conditioning, speed)
        decoder = ChunkDecoder(to_grid, vocode, columns_per_frame, hop, context_frames=plan.context_tokens)
        with self._lock:
            boundaries = plan.boundaries()
            next_flush = next(boundaries)
            for latent in self.latents(text, language, conditioning, cancel):
                decoder.add(latent)
                if decoder.frames >= next_flush:
                    next_flush = next(boundaries)
                    chunk = decoder.flush()
                    if len(chunk):
                        yield chunk
            if cancel is not None and cancel.is_set():
                return
            chunk = decoder.flush(final=True)
            if len(chunk):
                yield chunk

    @torch.inference_mode()
    def synthesize(self, text: str, language: str, conditioning: Conditioning, *, speed: float = 1.0,
                   cancel: threading.Event | None = None) -> np.ndarray:
        to_grid, vocode, _, _ = self.decoder(conditioning, speed)
        with self._lock:
            latents = list(self.latents(text, language, conditioning, cancel))
            if not latents:
                return np.zeros(0, dtype=np.float32)
            return vocode(to_grid(torch.stack([latent.reshape(-1) for latent in latents])[None]))
