"""Sentence splitting: every piece fits XTTS's per-language limit and no character of the text is lost."""

from __future__ import annotations

import pytest

from offline_tts.text import normalize, split_sentences

LIMITS = {"es": 239, "en": 250}

SPANISH = (
    "El servicio convierte texto en voz sin conexión a internet. Usa un modelo de clonación de voz que "
    "aprende el timbre de una grabación corta, de entre cinco y quince segundos. ¿Funciona con textos largos? "
    "Sí: el texto se divide en frases y cada frase se genera por separado, de modo que la primera empieza a "
    "sonar mientras las demás todavía se están generando. ¡Es rápido! Los números, como 3.5 o 1.000, y las "
    "abreviaturas, como el Sr. García o la Dra. López, no deben cortar las frases por la mitad."
)
ENGLISH = (
    "The service turns text into speech offline. It clones a voice from a short clip, five to fifteen seconds "
    "long. Does it handle long text? Yes: the text is split into sentences, and the first one is spoken while "
    "the rest are still being generated. Mr. Smith paid $3.50 at 5 p.m. on Jan. 3rd, e.g. for coffee."
)
# One "sentence" far over the limit: it must be cut at clauses, then between words.
RUN_ON = ", ".join(f"esta es la cláusula número {i} de una frase interminable sin ningún punto" for i in range(12)) + "."
WORDS = " ".join(["palabra"] * 120)  # no punctuation at all
GIANT_WORD = "x" * 600  # e.g. a URL: cut into pieces, still nothing lost


def squash(text: str) -> str:
    return "".join(text.split())


@pytest.mark.parametrize("language", ["es", "en"])
@pytest.mark.parametrize("text", [SPANISH, ENGLISH, RUN_ON, WORDS, GIANT_WORD, SPANISH * 4, RUN_ON + " " + SPANISH])
def test_pieces_fit_the_limit_and_nothing_is_lost(text: str, language: str) -> None:
    limit = LIMITS[language]
    pieces = split_sentences(text, language, limit)
    assert pieces, "a non-empty text gives at least one piece"
    assert all(0 < len(p) <= limit for p in pieces), [len(p) for p in pieces if len(p) > limit]
    assert all(p == p.strip() for p in pieces)
    assert squash("".join(pieces)) == squash(normalize(text))
    # order is kept, and pieces joined with one space give back the normalized text (except inside a cut word)
    if text is not GIANT_WORD:
        assert " ".join(pieces) == normalize(text)


def test_long_text_is_split_at_sentence_ends() -> None:
    pieces = split_sentences(SPANISH, "es", LIMITS["es"])
    assert len(pieces) >= 4
    assert pieces[0] == "El servicio convierte texto en voz sin conexión a internet."
    assert "¿Funciona con textos largos?" in pieces
    assert "¡Es rápido!" in pieces
    # decimal numbers do not end a sentence (pysbd's Spanish rules do split "Sr. García": a short pause, no loss)
    assert any("como 3.5 o 1.000, y" in p for p in pieces)


def test_english_abbreviations_do_not_split() -> None:
    pieces = split_sentences(ENGLISH, "en", LIMITS["en"])
    assert pieces[-1] == "Mr. Smith paid $3.50 at 5 p.m. on Jan. 3rd, e.g. for coffee."


def test_a_run_on_sentence_is_cut_at_clauses() -> None:
    pieces = split_sentences(RUN_ON, "es", LIMITS["es"])
    assert len(pieces) > 1
    # every piece but the last ends at a clause break (a comma), never in the middle of a clause
    assert all(p.endswith(",") for p in pieces[:-1]), pieces
    assert pieces[-1].endswith(".")


def test_the_limit_is_a_parameter() -> None:
    pieces = split_sentences(WORDS, "es", 50)
    assert all(len(p) <= 50 for p in pieces)
    assert " ".join(pieces) == WORDS


def test_whitespace_is_normalized() -> None:
    assert split_sentences("  Hola\n\n mundo.\tAdiós.  ", "es", 239) == ["Hola mundo.", "Adiós."]


@pytest.mark.parametrize("text", ["", "   ", "\n\t \n"])
def test_empty_text_gives_no_pieces(text: str) -> None:
    assert split_sentences(text, "es", 239) == []


def test_unknown_language_falls_back_to_generic_rules() -> None:
    pieces = split_sentences("这是第一句。这是第二句。", "zh-cn", 82) + split_sentences("First. Second.", "xx", 100)
    assert squash("".join(pieces)) == squash("这是第一句。这是第二句。First. Second.")
