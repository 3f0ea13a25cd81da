"""What the benchmark's parts share: the model, the voice clips, texts of a known length, timing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from offline_tts.engine.model_files import missing_model_files

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MODEL_DIR = ROOT / ".cache" / "bench-models" / "full"
SHARED_VOICES = ROOT.parent / "shared" / "voices"

# One GPT audio token = 1024 samples at 22.05 kHz; random weights never emit STOP, so the number of
# tokens (hence the audio length) of every request is fixed by the per-sentence cap.
TOKENS_PER_SECOND = 22_050 / 1024
LANGUAGE = "es"

log = logging.getLogger("bench")


@dataclass(frozen=True)
class Voices:
    dir: Path
    speaker: str  # the voice used for synthesis (conditioned once, before any timing)
    mp3: str  # an MP3 clip conditioned for the first time by the voice-cache measurement
    source: str  # "shared" (real recordings) or "generated"


NO_STOP_MARKER = "BENCH_NO_STOP.json"


def ensure_model(path: Path = MODEL_DIR) -> Path:
    """The full-size random-weight checkpoint, built once (~20-60 s, 1.9 GB) and kept in .cache/."""
    if missing_model_files(path):
        log.info("Building the full-size random-weight model in %s (once)...", path)
        subprocess.run([str(BIN / "offline-tts"), "random-model", str(path), "--size", "full", "--force"], check=True)
    if not (path / NO_STOP_MARKER).is_file():
        if path.resolve() == MODEL_DIR.resolve():  # the benchmark's own copy; never change someone else's model
            disable_stop_token(path)
        else:
            log.warning("%s can emit STOP: greedy decoding may end some requests early (see disable_stop_token)", path)
    return path


def disable_stop_token(path: Path) -> None:
    """Make the random model unable to emit the audio STOP token, so every request generates exactly its
    capped number of tokens. Random weights rarely sample STOP, but greedy decoding (used here so that
    repeated runs give the same tokens) does hit it on some texts. Costs nothing per token: one bias."""
    import torch

    log.info("Disabling the STOP token of the benchmark model (once)...")
    stop = json.loads((path / "config.json").read_text())["model_args"]["gpt_stop_audio_token"]
    checkpoint = torch.load(path / "model.pth", map_location="cpu", weights_only=True)
    checkpoint["model"]["gpt.mel_head.bias"][stop] = -1e4
    tmp = path / "model.pth.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path / "model.pth")
    (path / NO_STOP_MARKER).write_text(json.dumps({"gpt.mel_head.bias": {str(stop): -1e4}}) + "\n")


def _generate_clip(path: Path, seconds: float, freq: int) -> None:
    src = (f"aevalsrc='0.3*sin(2*PI*{freq}*t+3*sin(2*PI*5*t))*(0.6+0.4*sin(2*PI*3*t))"
           f"+0.02*(random(0)-0.5)':s=44100:d={seconds}")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", src, "-ac", "2", str(path)], check=True)


def prepare_voices(workdir: Path) -> Voices:
    """Real clips from ../shared/voices when present (es_menorah.mp3: the MP3 case), else generated ones."""
    vdir = workdir / "voices"
    vdir.mkdir(parents=True, exist_ok=True)
    speaker, mp3 = SHARED_VOICES / "es_knight.flac", SHARED_VOICES / "es_menorah.mp3"
    if speaker.is_file() and mp3.is_file():
        shutil.copy(speaker, vdir / speaker.name)
        shutil.copy(mp3, vdir / mp3.name)
        return Voices(vdir, speaker.name, mp3.name, "shared")
    _generate_clip(vdir / "speaker.flac", 12, 180)
    _generate_clip(vdir / "voice_mp3.mp3", 12, 220)
    return Voices(vdir, "speaker.flac", "voice_mp3.mp3", "generated")


_WORDS = ("la voz clonada lee este texto de prueba en voz alta para medir cuanto tarda el servicio "
          "en dar el primer sonido y en terminar la frase entera sin cortes ni saltos").split()


def sentence(chars: int, seed: int = 0) -> str:
    """A Spanish sentence of exactly `chars` characters (ending with a period, no inner punctuation)."""
    words, i = [], seed
    while len(" ".join(words)) < chars:
        words.append(_WORDS[i % len(_WORDS)])
        i += 1
    body = " ".join(words)[: chars - 1].rstrip()
    body = body + "a" * (chars - 1 - len(body))
    return body[0].upper() + body[1:] + "."


def text_for_tokens(tokens: int, seed: int = 0) -> str:
    """A one-sentence text whose per-sentence token cap (see XttsEngine.token_cap) is exactly `tokens`.

    The server runs with TTS_MAX_AUDIO_TOKENS at the model's maximum; the cap then follows the text's
    length, so one server serves requests of several fixed lengths."""
    from offline_tts.engine.xtts import MIN_TOKENS, TOKENS_PER_CHAR

    if tokens <= MIN_TOKENS:
        return sentence(12, seed)
    chars = -(-tokens // TOKENS_PER_CHAR)  # ceil
    chars = int(chars)
    while int(chars * TOKENS_PER_CHAR) > tokens:
        chars -= 1
    if int(chars * TOKENS_PER_CHAR) != tokens:
        raise ValueError(f"no text length gives exactly {tokens} tokens; pick a multiple of {TOKENS_PER_CHAR:g}")
    return sentence(chars, seed)


def multi_sentence_text(sentences: int, tokens_each: int) -> str:
    return " ".join(text_for_tokens(tokens_each, seed=i) for i in range(sentences))


class Timer:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
