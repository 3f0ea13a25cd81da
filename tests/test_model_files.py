"""The random-weight XTTS-v2 checkpoint: layout, determinism, and that coqui's own loader runs it."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from offline_tts.engine import random_model
from offline_tts.engine.model_files import REQUIRED_FILES, missing_model_files
from offline_tts.engine.random_model import LANGUAGES, write_random_checkpoint

# Random weights never emit STOP: every generation is capped so tests stay short.
MAX_NEW_TOKENS = 20


@pytest.fixture(scope="session")
def reference_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ref") / "ref6s.wav"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=220:duration=6",
         "-ar", "22050", "-ac", "1", str(path)],
        check=True,
    )  # fmt: skip
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    """Loaded exactly the way the real XTTS-v2 download is loaded."""
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    config = XttsConfig()
    config.load_json(str(tiny_checkpoint / "config.json"))
    model = Xtts(config)
    model.load_checkpoint(config, checkpoint_dir=str(tiny_checkpoint), use_deepspeed=False, eval=True)
    return model


@pytest.fixture(scope="session")
def latents(tiny_model, reference_wav: Path):
    return tiny_model.get_conditioning_latents(audio_path=[str(reference_wav)])


def _digests(directory: Path) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in REQUIRED_FILES}


def test_layout_and_config(tiny_checkpoint: Path) -> None:
    assert missing_model_files(tiny_checkpoint) == []
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    args = config["model_args"]
    assert config["model"] == "xtts"
    assert config["languages"] == list(LANGUAGES) and len(LANGUAGES) == 17
    assert (args["gpt_layers"], args["gpt_n_model_channels"], args["gpt_n_heads"]) == (2, 64, 4)
    assert args["decoder_input_dim"] == 64
    assert args["gpt_use_perceiver_resampler"] is True
    assert (args["gpt_num_audio_tokens"], args["gpt_start_audio_token"], args["gpt_stop_audio_token"]) == (
        1026,
        1024,
        1025,
    )
    assert config["audio"]["output_sample_rate"] == 24000

    vocab = json.loads((tiny_checkpoint / "vocab.json").read_text())
    tokens = {t["content"] for t in vocab["added_tokens"]}
    assert {"[START]", "[STOP]", "[SPACE]", "[UNK]"} <= tokens
    assert {f"[{lang}]" for lang in LANGUAGES} <= tokens
    assert args["gpt_number_text_tokens"] == max(vocab["model"]["vocab"].values()) + 1

    marker = json.loads((tiny_checkpoint / random_model.MARKER_FILE).read_text())
    assert marker["random_weights"] is True and marker["size"] == "tiny"


def test_speakers_file_has_coqui_format(tiny_checkpoint: Path) -> None:
    from TTS.tts.layers.xtts.xtts_manager import SpeakerManager

    manager = SpeakerManager(tiny_checkpoint / "speakers_xtts.pth")
    assert manager.num_speakers >= 1
    for name in manager.speaker_names:
        speaker = manager.speakers[name]
        assert speaker["gpt_cond_latent"].shape == (1, 32, 64)
        assert speaker["speaker_embedding"].shape == (1, 512, 1)


def test_missing_model_files(tmp_path: Path) -> None:
    assert missing_model_files(tmp_path / "nowhere") == list(REQUIRED_FILES)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.pth").mkdir()  # a directory is not a model file
    assert missing_model_files(tmp_path) == ["model.pth", "vocab.json", "speakers_xtts.pth"]


@pytest.mark.parametrize(
    ("language", "text"),
    [
        ("es", "¿Qué tal? ¡Muy bien! El 3 de mayo pagué 15,50 € por 2 kg de naranjas, señor Núñez."),
        ("es", "Camión, pingüino, añoranza: ÁÉÍÓÚÜÑ — «comillas» (y paréntesis) al 25 %."),
        ("en", "Hello! It's 3:45 p.m. and I owe you $12.50, that's 50% of £25."),
        ("en", 'Mr. Smith lives at 221B Baker St.; she said "hi" — naïve café résumé?'),
    ],
)
def test_tokenizer_encodes_spanish_and_english(tiny_model, language: str, text: str) -> None:
    ids = tiny_model.tokenizer.encode(text, language)
    unk = tiny_model.tokenizer.tokenizer.token_to_id("[UNK]")
    assert ids[0] == tiny_model.tokenizer.tokenizer.token_to_id(f"[{language}]")
    assert unk not in ids
    assert max(ids) < tiny_model.args.gpt_number_text_tokens


def test_conditioning_latents(latents) -> None:
    gpt_cond_latent, speaker_embedding = latents
    assert gpt_cond_latent.shape == (1, 32, 64)
    assert speaker_embedding.shape == (1, 512, 1)
    assert torch.isfinite(gpt_cond_latent).all() and torch.isfinite(speaker_embedding).all()


@pytest.mark.parametrize("language", ["es", "en"])
def test_inference(tiny_model, latents, language: str) -> None:
    gpt_cond_latent, speaker_embedding = latents
    out = tiny_model.inference(
        "Hola, esto es una prueba." if language == "es" else "Hello, this is a test.",
        language, gpt_cond_latent, speaker_embedding, max_new_tokens=MAX_NEW_TOKENS,
    )  # fmt: skip
    wav = out["wav"]
    assert wav.ndim == 1 and wav.size > 0
    assert np.isfinite(wav).all() and np.abs(wav).max() <= 1.0


def test_inference_stream_and_builtin_speaker(tiny_model) -> None:
    speaker = tiny_model.speaker_manager.speakers[tiny_model.speaker_manager.speaker_names[0]]
    chunks = list(
        tiny_model.inference_stream(
            "Buenos días a todos.", "es", speaker["gpt_cond_latent"], speaker["speaker_embedding"],
            stream_chunk_size=8, max_new_tokens=MAX_NEW_TOKENS,
        )
    )  # fmt: skip
    assert len(chunks) >= 2  # 20 tokens in chunks of 8
    assert all(torch.isfinite(c).all() for c in chunks)
    assert sum(c.shape[-1] for c in chunks) > 0


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path: Path, tiny_checkpoint: Path) -> None:
    again = write_random_checkpoint(tmp_path / "again", "tiny", seed=0)
    assert _digests(again) == _digests(tiny_checkpoint)
    other = _digests(write_random_checkpoint(tmp_path / "other", "tiny", seed=1))
    assert other["model.pth"] != _digests(tiny_checkpoint)["model.pth"]


def test_interrupted_build_leaves_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if interrupted after model.pth was written

    monkeypatch.setattr(random_model, "_speakers", fail)
    with pytest.raises(KeyboardInterrupt):
        write_random_checkpoint(tmp_path / "model", "tiny")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory


def test_existing_files_need_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "model.pth").write_bytes(b"precious real weights")
    (target / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_random_checkpoint(target, "tiny")
    assert (target / "model.pth").read_bytes() == b"precious real weights"

    write_random_checkpoint(target, "tiny", overwrite=True)
    assert missing_model_files(target) == []
    assert (target / "notes.txt").read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_full_vocab_has_the_real_number_of_text_tokens(tmp_path: Path, tiny_checkpoint: Path) -> None:
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer

    size = random_model._write_vocab(tmp_path / "vocab.json", pad_to=6681)
    full = VoiceBpeTokenizer(tmp_path / "vocab.json")
    tiny = VoiceBpeTokenizer(tiny_checkpoint / "vocab.json")
    assert size == full.get_number_tokens() == 6681
    text = "Hola, ¿cómo estás? Son las 10 y cuarto."
    assert full.encode(text, "es") == tiny.encode(text, "es")


@pytest.mark.skipif(
    not os.environ.get("OFFLINE_TTS_TEST_FULL"), reason="set OFFLINE_TTS_TEST_FULL=1 (1.9 GB, ~4.5 GB RAM)"
)
def test_full_checkpoint_loads(tmp_path: Path, reference_wav: Path) -> None:
    from TTS.tts.configs.xtts_config import XttsConfig
    from TTS.tts.models.xtts import Xtts

    path = write_random_checkpoint(tmp_path / "full", "full")
    config = XttsConfig()
    config.load_json(str(path / "config.json"))
    args = config.model_args
    assert (args.gpt_layers, args.gpt_n_model_channels, args.gpt_number_text_tokens) == (30, 1024, 6681)
    model = Xtts(config)
    model.load_checkpoint(config, checkpoint_dir=str(path), use_deepspeed=False, eval=True)
    gpt_cond_latent, speaker_embedding = model.get_conditioning_latents(audio_path=[str(reference_wav)])
    assert gpt_cond_latent.shape == (1, 32, 1024)
    out = model.inference("Hola.", "es", gpt_cond_latent, speaker_embedding, max_new_tokens=5)
    assert out["wav"].size > 0
