"""The engine's text preparation in every model language: numbers that coqui's tokenizer (num2words) cannot
expand are spelled out, so every piece it returns is one the tokenizer reads and the model can take
(tiny random model, in-process: tokenizing only, no generation)."""

from __future__ import annotations

from pathlib import Path

import pytest

from offline_tts.engine.xtts import XttsEngine
from offline_tts.errors import InvalidText
from offline_tts.text import split_sentences

NUMBERS = {
    "a digit": "5 {word}",
    "an ordinal with a period": "Dne 5. {word}.",
    "10**27": "1" + "0" * 27 + " {word}",
    "a decimal of 10**29": "1" + "1" * 29 + ".5 {word}",
    "400 digits": "1" * 400,
    "dotted thousands to 10**30": "1" + ".000" * 10 + " {word}",
}
WORD = {"hi": "सेब", "zh-cn": "苹果", "ja": "りんご", "ko": "사과", "ar": "تفاحة", "ru": "яблок"}


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> XttsEngine:
    return XttsEngine(tiny_model_dir, "cpu")


@pytest.mark.parametrize("case", NUMBERS)
def test_numbers_are_made_speakable_in_every_language(engine: XttsEngine, case: str) -> None:
    for language in engine.languages:
        text = NUMBERS[case].format(word=WORD.get(language, "apples"))
        limit = engine.char_limit(language)
        pieces = [p for s in split_sentences(text, language, limit) for p in engine.prepare_text(s, language)]
        assert pieces, (language, text)
        for piece in pieces:
            assert len(piece) <= limit, (language, piece)
            tokens = engine.model.tokenizer.encode(piece.lower(), lang=language.split("-")[0])  # raises if unreadable
            assert 0 < len(tokens) < engine.model.args.gpt_max_text_tokens, (language, piece)


def test_what_can_be_said_is_kept_and_the_rest_spelled_out(engine: XttsEngine) -> None:
    assert engine.prepare_text("Tengo 12 años.", "es") == ["Tengo 12 años."]  # the tokenizer reads it well
    assert engine.prepare_text("मेरे पास 5 सेब हैं।", "hi") == ["मेरे पास पाँच सेब हैं।"]
    assert engine.prepare_text("Dne 5. května jsem přišel.", "cs") == ["Dne pět. května jsem přišel."]
    assert engine.prepare_text("1" + "0" * 27 + " euros", "es") == ["uno" + " cero" * 27 + " euros"]
    assert engine.prepare_text("4.5 y 1" + "0" * 27, "es") == ["4.5 y uno" + " cero" * 27]  # 4.5 left to the tokenizer


@pytest.mark.parametrize("text", ["...", "¡¿?! «»", "\U0001f600 \U0001f600"])
def test_a_piece_with_nothing_to_say_is_dropped(engine: XttsEngine, text: str) -> None:
    assert engine.prepare_text(text, "es") == []


def test_a_piece_with_too_many_tokens_is_refused(engine: XttsEngine) -> None:
    with pytest.raises(InvalidText, match="too long for the model"):
        engine.prepare_text("%" * 200, "es")  # within the 239 characters, but "por ciento" 200 times
