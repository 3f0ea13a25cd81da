"""Every language the model lists really speaks: its text processing (numbers, scripts, romanization
for Japanese/Chinese/Korean) is installed and runs (tiny random model, in-process)."""

from pathlib import Path

import numpy as np
import pytest

from helpers import make_clip
from offline_tts import audio
from offline_tts.engine.xtts import XttsEngine

SAMPLES = {
    "en": "Hello world, 25 times.", "es": "Hola mundo, 25 veces.", "fr": "Bonjour le monde.", "de": "Hallo Welt.",
    "it": "Ciao mondo.", "pt": "Olá mundo.", "pl": "Witaj świecie.", "tr": "Merhaba dünya.", "ru": "Привет, мир.",
    "nl": "Hallo wereld.", "cs": "Ahoj světe.", "ar": "مرحبا بالعالم.", "zh-cn": "你好，世界。", "hu": "Helló világ.",
    "ko": "안녕하세요 세계.", "ja": "こんにちは世界。", "hi": "नमस्ते दुनिया।",
}


@pytest.fixture(scope="module")
def engine_and_voice(tiny_model_dir: Path, tmp_path_factory):
    engine = XttsEngine(tiny_model_dir, "cpu", max_audio_tokens=4, greedy=True)
    clip = make_clip(tmp_path_factory.mktemp("lang") / "v.wav", seconds=3)
    return engine, engine.compute_conditioning([audio.decode(clip, engine.conditioning_sample_rate)])


def test_every_model_language_has_a_sample(engine_and_voice):
    engine, _ = engine_and_voice
    assert set(engine.languages) == set(SAMPLES)


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_language_speaks(engine_and_voice, language):
    engine, voice = engine_and_voice
    assert language in engine.languages
    wav = engine.synthesize(SAMPLES[language], language, voice)
    assert wav.dtype == np.float32 and len(wav) > 0
