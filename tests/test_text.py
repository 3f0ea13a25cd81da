"""Sentence splitting: every piece fits XTTS's per-language limit and no character of the text is lost."""

from __future__ import annotations

import pytest

import time

from offline_tts.text import SentenceSplitter, normalize, split_sentences

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
    # decimal numbers and abbreviations do not end a sentence
    assert any("como 3.5 o 1.000, y" in p for p in pieces)
    assert any("como el Sr. García o la Dra. López, no deben" in p for p in pieces)


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


def redos_text(numbers: int) -> str:
    """The text that made pysbd's numbered-reference regex backtrack for minutes (pySBD issue #79)."""
    return "..[" + " ".join(["111"] * numbers) + "]"


@pytest.mark.parametrize("numbers", [9, 12, 40, 1200])
def test_the_pysbd_redos_text_is_split_at_once(numbers: int) -> None:
    text = redos_text(numbers)
    started = time.thread_time()  # CPU time: what the splitter costs, however busy the machine is
    pieces = split_sentences(text, "es", 239)
    assert time.thread_time() - started < 0.5
    assert " ".join(pieces) == text if len(text) <= 239 else squash("".join(pieces)) == squash(text)


@pytest.mark.parametrize(("text", "language", "expected"), [
    ("Hola, Sr. Pérez. ¿Qué tal? Bien, p. ej. en casa.", "es", ["Hola, Sr. Pérez.", "¿Qué tal?", "Bien, p. ej. en casa."]),
    ("Dr. Smith came, e.g. at 5 p.m. on Jan. 3rd. He left.", "en", ["Dr. Smith came, e.g. at 5 p.m. on Jan. 3rd.", "He left."]),
    ("Vale 3.14 o 1.000.000 de euros. Visita www.example.com/a.b o escribe a ana.b@example.com. Gracias.", "es",
     ["Vale 3.14 o 1.000.000 de euros.", "Visita www.example.com/a.b o escribe a ana.b@example.com.", "Gracias."]),
    ("Espera... no sé. Bueno… Vale.", "es", ["Espera... no sé.", "Bueno…", "Vale."]),
    ('He said "Stop." Then he left (see below.) Fine!', "en", ['He said "Stop."', "Then he left (see below.)", "Fine!"]),
    ("«Hola.» ¡Adiós!", "es", ["«Hola.»", "¡Adiós!"]),
    ("Dne 5. května jsem přišel. Pak jsem odešel.", "cs", ["Dne 5. května jsem přišel.", "Pak jsem odešel."]),
    ("Am 3. Oktober war es kalt. Ja.", "de", ["Am 3. Oktober war es kalt.", "Ja."]),
    ("J. K. Rowling wrote it. No. I did not!", "en", ["J. K. Rowling wrote it.", "No.", "I did not!"]),
    ("这是第一句。这是第二句！", "zh-cn", ["这是第一句。", "这是第二句！"]),
    ("मेरे पास 5 सेब हैं। तुम्हारे पास?", "hi", ["मेरे पास 5 सेब हैं।", "तुम्हारे पास?"]),
])
def test_sentence_rules(text: str, language: str, expected: list[str]) -> None:
    assert split_sentences(text, language, 239) == expected


def test_lone_surrogates_are_dropped() -> None:
    """JSON can carry "\\ud800"; no encoder (UTF-8 logs, ffmpeg, the tokenizer) can take it."""
    assert normalize("hola \ud800 mundo\udfff") == "hola mundo"
    assert split_sentences("hola \ud800 mundo.", "es", 239) == ["hola mundo."]


@pytest.mark.parametrize("text", [SPANISH * 3, RUN_ON + " " + ENGLISH, WORDS + ". " + GIANT_WORD, redos_text(30)])
@pytest.mark.parametrize("step", [1, 3, 17])
def test_text_fed_in_parts_gives_the_same_pieces(text: str, step: int) -> None:
    """For text that arrives piece by piece (a WebSocket): same pieces, and they come out before the end."""
    splitter = SentenceSplitter("es", 60)
    pieces: list[str] = []
    for i in range(0, len(text), step):
        pieces += splitter.feed(text[i : i + step])
    before_flush = len(pieces)
    pieces += splitter.flush()
    assert pieces == split_sentences(text, "es", 60)
    assert before_flush >= len(pieces) - 2, "a finished piece is returned by feed, not held until the end"


def test_a_clause_is_spoken_early_when_no_sentence_end_comes() -> None:
    """Text in pieces (the WebSocket/Wyoming sessions): past `clause_chars`, a piece ends at its next clause
    break instead of waiting for the sentence end; without the setting it waits."""
    text = "Bueno, entonces lo que vamos a hacer mañana por la tarde, si te parece bien, es ir"
    waiting = SentenceSplitter("es", 250)
    assert waiting.feed(text) == []
    assert len(text) - 2 <= waiting.pending_chars <= len(text)  # spaces between clauses are not kept
    early = SentenceSplitter("es", 250, clause_chars=15)
    assert early.feed(text) == ["Bueno, entonces lo que vamos a hacer mañana por la tarde,", "si te parece bien,"]
    assert early.pending_chars == len("es ir")
    assert early.flush() == ["es ir"]
    assert early.pending_chars == 0


@pytest.mark.parametrize("step", [1, 3, 7])
def test_clause_breaks_do_not_depend_on_how_the_text_was_cut(step: int) -> None:
    text = "Uno, dos, tres, cuatro, cinco; seis: siete. Ocho, nueve, diez, once, doce, trece, catorce"
    whole = SentenceSplitter("es", 250, clause_chars=12)
    expected = whole.feed(text) + whole.flush()
    parts = SentenceSplitter("es", 250, clause_chars=12)
    got = [p for i in range(0, len(text), step) for p in parts.feed(text[i : i + step])] + parts.flush()
    assert got == expected
    assert got[0] == "Uno, dos, tres,"
