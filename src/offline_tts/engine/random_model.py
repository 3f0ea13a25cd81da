"""XTTS-v2 checkpoints with random weights, for tests and benchmarks without the real model.

The files are laid out exactly like the official download (config.json, model.pth, vocab.json,
speakers_xtts.pth), built from coqui-tts's own `XttsConfig` / `Xtts`, so the normal loading code
(`Xtts.init_from_config(config)` + `model.load_checkpoint(config, checkpoint_dir=...)`) takes them
unchanged. `full` has the real architecture (same compute per token); `tiny` builds in seconds.
The audio is noise: random weights never emit the STOP token, so callers should cap generation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from .model_files import REQUIRED_FILES

logger = logging.getLogger("offline_tts.random_model")

# Written next to the required files so people (and the service) can tell this is not the real model.
MARKER_FILE = "RANDOM_WEIGHTS.json"

Size = Literal["tiny", "full"]

# The 17 languages of the published XTTS-v2 config.json, in its order.
LANGUAGES = (
    "en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi",
)  # fmt: skip

# The published XTTS-v2 model_args (HF coqui/XTTS-v2, config.json). Most equal coqui's defaults;
# they are all set explicitly so a change of defaults in coqui-tts cannot change the architecture.
_FULL_ARGS: dict[str, Any] = {
    "gpt_layers": 30,
    "gpt_n_model_channels": 1024,
    "gpt_n_heads": 16,
    "gpt_number_text_tokens": 6681,
    "gpt_num_audio_tokens": 1026,
    "gpt_start_audio_token": 1024,
    "gpt_stop_audio_token": 1025,
    "gpt_use_perceiver_resampler": True,
    "gpt_max_audio_tokens": 605,
    "gpt_max_text_tokens": 402,
    "gpt_max_prompt_tokens": 70,
    "gpt_code_stride_len": 1024,
    "input_sample_rate": 22050,
    "output_sample_rate": 24000,
    "output_hop_length": 256,
    "decoder_input_dim": 1024,
    "d_vector_dim": 512,
    "cond_d_vector_in_each_upsampling_layer": True,
}
_TINY_ARGS: dict[str, Any] = {
    **_FULL_ARGS,
    "gpt_layers": 2,
    "gpt_n_model_channels": 64,
    "gpt_n_heads": 4,
    "decoder_input_dim": 64,
    "gpt_number_text_tokens": None,  # the trained vocab's size
}
# Inference defaults of the published config.json (coqui's dataclass defaults differ).
_FULL_INFERENCE: dict[str, Any] = {
    "temperature": 0.75,
    "length_penalty": 1.0,
    "repetition_penalty": 5.0,
    "top_k": 50,
    "top_p": 0.85,
    "num_gpt_outputs": 1,
    "gpt_cond_len": 30,
    "gpt_cond_chunk_len": 4,
    "max_ref_len": 30,
    "sound_norm_refs": False,
}

_SPECIAL_TOKENS = ["[STOP]", "[UNK]", "[SPACE]", "[START]", *(f"[{lang}]" for lang in LANGUAGES)]
_TINY_VOCAB_TARGET = 1024

# Training text for the BPE vocab. VoiceBpeTokenizer lowercases and spells out numbers before
# encoding, and unknown characters fall back to [UNK], so any text encodes; this only makes the
# token counts per sentence realistic for Spanish and English.
_CORPUS = """
El veloz murciélago hindú comía feliz cardillo y kiwi. La cigüeña tocaba el saxofón detrás del palenque de paja.
¿Dónde está la estación de tren? ¡Qué día tan bonito hace hoy en Madrid, Sevilla y Bogotá!
Hola, ¿cómo estás? Me llamo Lucía y trabajo en una pequeña empresa de traducción en Valparaíso.
Mañana por la mañana iremos al mercado a comprar pan, queso, aceitunas y un poco de jamón.
El niño pidió un vaso de agua y la señora le trajo también una naranja y dos galletas.
Según el informe, la población creció un tres por ciento durante el último año.
La biblioteca pública abre de lunes a viernes, de nueve de la mañana a ocho de la tarde.
Por favor, lea atentamente las instrucciones antes de utilizar el aparato por primera vez.
Había una vez un pueblo junto al río donde los pescadores cantaban al amanecer.
La inteligencia artificial permite convertir texto en voz con una calidad sorprendente.
Ayer llovió muchísimo, pero hoy el cielo está despejado y corre una brisa agradable.
Los estudiantes aprobaron el examen de matemáticas después de semanas de esfuerzo.
Nuestro vuelo sale a las diez y cuarto; tenemos que estar en el aeropuerto dos horas antes.
The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly.
Hello, how are you today? I would like a cup of coffee with milk and no sugar, please.
The meeting has been moved to Thursday afternoon because the manager is traveling.
Please read the instructions carefully before using the device for the first time.
Once upon a time there was a little village near the river where fishermen sang at dawn.
Artificial intelligence can now turn written text into natural sounding speech.
It rained heavily yesterday, but today the sky is clear and there is a pleasant breeze.
The students passed their mathematics exam after weeks of hard work and practice.
Our flight leaves at a quarter past ten, so we have to be at the airport two hours early.
She sells seashells by the seashore, and the shells she sells are surely seashells.
Le cœur a ses raisons que la raison ne connaît point. Où est la gare, s'il vous plaît ?
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München und Köln.
Il gatto dorme sul divano mentre fuori piove. Perché non andiamo al cinema stasera?
O rato roeu a roupa do rei de Roma. Não há nada como um café quente pela manhã.
Pchnąć w tę łódź jeża lub ośm skrzyń fig. Zażółć gęślą jaźń.
Pijamalı hasta yağız şoföre çabucak güvendi. Günaydın, nasılsınız?
Съешь же ещё этих мягких французских булок, да выпей чаю.
De snelle bruine vos springt over de luie hond. Goedemorgen, hoe gaat het?
Příliš žluťoučký kůň úpěl ďábelské ódy. Dobrý den, jak se máte?
Árvíztűrő tükörfúrógép. Jó reggelt kívánok, hogy van?
مرحبا كيف حالك اليوم
नमस्ते आप कैसे हैं
ni3 hao3 shi4 jie4 zhong1 guo2 bei3 jing1 annyeonghaseyo gamsahamnida konnichiwa arigatou gozaimasu
"""


def write_random_checkpoint(out_dir: Path, size: Size = "tiny", seed: int = 0, *, overwrite: bool = False) -> Path:
    """Write a random-weight XTTS-v2 checkpoint into `out_dir` and return `out_dir`.

    Deterministic given `seed`. Everything is written into a temporary sibling directory first
    and moved in at the end, so an interrupted build never leaves a checkpoint that looks complete.
    Refuses (FileExistsError) to replace model files already in `out_dir` unless `overwrite`.
    """
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    out_dir = Path(out_dir).expanduser().absolute()
    present = [name for name in (*REQUIRED_FILES, MARKER_FILE) if (out_dir / name).exists()]
    if present and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds model files ({', '.join(present)}); pass overwrite=True to replace them"
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{os.getpid()}-", dir=out_dir.parent))
    started = time.monotonic()
    logger.info("Building a %s random XTTS-v2 checkpoint (seed %d) in %s", size, seed, out_dir)
    try:
        _build(tmp, size, seed)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    total = sum((out_dir / name).stat().st_size for name in REQUIRED_FILES)
    logger.info("Random checkpoint ready in %s: %.1f MB, %.1f s", out_dir, total / 1e6, time.monotonic() - started)
    return out_dir


def _build(tmp: Path, size: Size, seed: int) -> None:
    import torch  # heavy imports stay out of module import time
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    vocab_size = _FULL_ARGS["gpt_number_text_tokens"] if size == "full" else None
    vocab_path = tmp / "vocab.json"
    n_text_tokens = _write_vocab(vocab_path, pad_to=vocab_size)
    logger.info("vocab.json: %d text tokens", n_text_tokens)

    config = XttsConfig()
    for key, value in (_FULL_ARGS if size == "full" else _TINY_ARGS).items():
        setattr(config.model_args, key, value)
    for key, value in _FULL_INFERENCE.items():
        setattr(config, key, value)
    config.languages = list(LANGUAGES)
    config.audio.sample_rate = 22050
    config.audio.output_sample_rate = 24000
    # Built with the ids the tokenizer will give at load time, so load_checkpoint's rebuild matches.
    config.model_args.gpt_number_text_tokens = n_text_tokens
    config.model_args.tokenizer_file = ""

    start = time.monotonic()
    torch.manual_seed(seed)
    model = Xtts(config)
    model.mel_stats.copy_(_mel_stats(torch))
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Initialised %s model: %.1f M parameters in %.1f s", size, n_params / 1e6, time.monotonic() - start)

    # The published config.json leaves the text ids null: coqui reads them from vocab.json.
    config.model_args.gpt_start_text_token = None
    config.model_args.gpt_stop_text_token = None
    config.save_json(str(tmp / "config.json"))

    start = time.monotonic()
    # Like coqui's trainer checkpoints: {"config": dict, "model": state_dict}.
    torch.save({"config": config.to_dict(), "model": model.state_dict()}, tmp / "model.pth")
    logger.info(
        "model.pth written in %.1f s (%.1f MB)", time.monotonic() - start, (tmp / "model.pth").stat().st_size / 1e6
    )

    # nn.Module.train(False) rather than Xtts.eval(): the latter adds inference-only modules.
    model.train(False)
    torch.save(_speakers(model, torch), tmp / "speakers_xtts.pth")
    logger.info("speakers_xtts.pth written")
    marker = {
        "random_weights": True,
        "size": size,
        "seed": seed,
        "parameters": n_params,
        "note": "Random XTTS-v2 weights for tests and benchmarks: the audio is noise.",
    }
    (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _write_vocab(path: Path, pad_to: int | None) -> int:
    """Train a small BPE vocab like XTTS's and return its number of ids (max id + 1).

    `pad_to` appends unused entries so the text embedding has the real model's 6681 rows.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    alphabet = list(
        "abcdefghijklmnopqrstuvwxyz0123456789áéíóúüñàèìòùâêîôûäëïöçœßãõąćęłńśźżğışčďěňřšťůžőűý"
        ".,;:!?¡¿'\"-()[]{}«»“”‘’—–…/\\*+=<>%€$£¥@#&ºª°|~^_"
    )
    trainer = BpeTrainer(
        vocab_size=_TINY_VOCAB_TARGET,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)

    data = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    size = max(vocab.values()) + 1
    if pad_to is not None:
        if size > pad_to:
            raise RuntimeError(f"trained vocab has {size} ids, more than {pad_to}")
        # Never produced by BPE (no merge leads to them); they only make the embedding the real size.
        for index in range(size, pad_to):
            vocab[f"<unused_{index}>"] = index
        size = pad_to
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return size


def _corpus_lines() -> list[str]:
    """The corpus as VoiceBpeTokenizer will present text: lowercased, numbers spelled out."""
    from num2words import num2words

    lines = [line.strip().lower() for line in _CORPUS.splitlines() if line.strip()]
    # Numbers are expanded before encoding, so number words are common; teach them to the BPE.
    for lang in ("es", "en"):
        numbers = [*range(31), *range(40, 101, 10), 100, 200, 500, 1000, 2024, 1000000]
        lines.append(" ".join(num2words(n, lang=lang) for n in numbers))
        lines.append(" ".join(num2words(n, lang=lang, to="ordinal") for n in range(1, 13)))
    return lines


def _mel_stats(torch: Any) -> Any:
    """Plausible per-band mel norms (the real ones fall from ~5 to ~1 with frequency)."""
    return torch.linspace(5.0, 1.0, 80)


def _speakers(model: Any, torch: Any) -> dict[str, dict[str, Any]]:
    """Two built-in speakers computed by the model itself from synthetic voices (right shapes)."""
    speakers = {}
    sr = 22050
    t = torch.arange(sr * 3, dtype=torch.float32) / sr  # 3 s: enough for both encoders, and quick
    for name, f0 in (("Random Speaker A", 120.0), ("Random Speaker B", 210.0)):
        # A buzzy harmonic tone with a slow vibrato: enough spectrum for the encoders.
        phase = 2 * math.pi * f0 * t + 3.0 * torch.sin(2 * math.pi * 5.0 * t)
        wav = sum(torch.sin(k * phase) / k for k in range(1, 8)) * 0.2
        wav = wav.unsqueeze(0)
        gpt_cond_latent = model.get_gpt_cond_latents(wav, sr, length=3, chunk_length=3)
        speaker_embedding = model.get_speaker_embedding(wav, sr)
        speakers[name] = {
            "gpt_cond_latent": gpt_cond_latent.detach().cpu().clone(),
            "speaker_embedding": speaker_embedding.detach().cpu().clone(),
        }
    return speakers


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    # mkdtemp made it 0700: give it the usual mode (umask), so a container's user can read a
    # model folder built on the host by another user.
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if not out_dir.exists():
        os.replace(tmp, out_dir)  # one atomic rename
        return
    # out_dir exists (maybe with other content): drop old model files first so it looks incomplete
    # until the last new file lands; vocab/config/speakers go in before the big model.pth.
    for name in (*REQUIRED_FILES, MARKER_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for name in (MARKER_FILE, "config.json", "vocab.json", "speakers_xtts.pth", "model.pth"):
        os.replace(tmp / name, out_dir / name)
    tmp.rmdir()


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete temporary build dirs left by builds that were killed (their process is gone)."""
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        try:
            pid = int(partial.name.split(".partial-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            logger.info("Removing leftover partial build %s", partial)
            shutil.rmtree(partial, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
