"""Fuzzing the sentence splitter: any text up to the text limit is split fast, whole and within the limits.

pysbd took minutes on 39 characters ("..[111 111 ... 111]", pySBD issue #79) and froze the server; these
texts are random and adversarial (digits, dots, brackets, quotes, abbreviations, Unicode, whitespace,
that very pattern), seeded so a failure reproduces.
"""

from __future__ import annotations

import random
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from offline_tts.text import SentenceSplitter, normalize, split_sentences

TEXT_LIMIT = 5000  # TTS_MAX_TEXT_CHARS's default
SLOW = 0.5  # CPU seconds (thread time, not wall time: a busy machine does not count): no text may take longer
TEXTS = 10_000
LANGUAGES = ["es", "en", "de", "cs", "fr", "zh-cn", "hi", "ja", "ar", "xx"]
LIMITS = [239, 250, 186, 82, 150, 71, 20, 1]

ATOMS = (list(".....!?…;:,()[]{}«»“”\"'¿¡。！？।-—  \n\t0123456789aAbBzZñéßçøłžşğıİяЖ你好दि")
         + ["111", " 111", "..[", "]", "[1]", "(2)", "Sr.", " Dr.", " p. ej.", " e.g.", " i.e. ", " U.S.A.", "...",
            " No. 5", "3.14", "1.000.000", "www.example.com", "ana@example.com", "http://a.b/c?d=e.f", "\ud800",
            "\U0001f600", "\u200b", " A. ", " 5. května", "x" * 300, " " * 20, ". ( ( ( ( ( ( ( ( ( ( ( (", "?!" * 30])


def squash(text: str) -> str:
    return "".join(text.split())


def adversarial_text(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # the pysbd pattern, with dozens of numbers and variations
        k = rng.randint(1, 80)
        number = rng.choice(["111", "1", "12345", "1.1", "a1"])
        return rng.choice(["..[", ".[", "...(", "[", ". ["]) + " ".join([number] * k) + rng.choice(["]", ")", "", "].", "] x"])
    length = min(TEXT_LIMIT, int(2 ** rng.uniform(0, 12.3)))  # 1 .. 5000 characters, mostly short
    if kind == 1:  # any characters at all
        return "".join(chr(rng.choice([rng.randrange(32, 0x250), rng.randrange(0x250, 0x10000)])) for _ in range(length))
    parts, size = [], 0
    while size < length:  # kind 2 and 3: atoms that sentence rules care about
        atom = rng.choice(ATOMS)
        parts.append(atom)
        size += len(atom)
    return "".join(parts)[:length]


def check(text: str, language: str, limit: int) -> list[str]:
    started = time.thread_time()
    pieces = split_sentences(text, language, limit)
    elapsed = time.thread_time() - started
    assert elapsed < SLOW, f"{elapsed:.2f} s to split {text[:200]!r}"
    assert all(0 < len(p) <= limit and p == p.strip() for p in pieces), (text[:200], pieces)
    assert squash("".join(pieces)) == squash(normalize(text)), f"text lost or changed: {text[:200]!r}"
    return pieces


def test_ten_thousand_random_and_adversarial_texts_split_fast_and_whole() -> None:
    rng = random.Random(20251202)
    started = time.thread_time()
    for i in range(TEXTS):
        text, language, limit = adversarial_text(rng), rng.choice(LANGUAGES), rng.choice(LIMITS)
        pieces = check(text, language, limit)
        if i % 20 == 0:  # the incremental splitter gives the same pieces, fed in random parts
            splitter, fed, at = SentenceSplitter(language, limit), [], 0
            while at < len(text):
                step = rng.choice([1, 2, 5, 40])
                fed += splitter.feed(text[at : at + step])
                at += step
            assert fed + splitter.flush() == pieces, text[:200]
    assert time.thread_time() - started < 60  # a few CPU seconds


def test_the_longest_adversarial_texts() -> None:
    """The worst shapes we know of, at the full text limit."""
    for text in ["..[" + " ".join(["111"] * 1249) + "]", "." * TEXT_LIMIT, "a. " * 1666, "A! " * 1666, ", " * 2500,
                 "1." * 2500, "Sr. " * 1250, ". " + "(" * 4998, "x" * TEXT_LIMIT, "[1] " * 1250, "?!" * 2500,
                 ("\ud800 " * 2500), "。" * TEXT_LIMIT, " e.g." * 1000]:
        for language in ("es", "en", "cs"):
            check(text[:TEXT_LIMIT], language, 239)


@settings(max_examples=300, deadline=None)
@given(text=st.lists(st.sampled_from(ATOMS) | st.characters(), max_size=80).map("".join),
       limit=st.sampled_from(LIMITS), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_property_pieces_are_whole_and_incremental_feeding_agrees(text: str, limit: int, cuts: list[int]) -> None:
    pieces = check(text, "es", limit)
    splitter, fed, at = SentenceSplitter("es", limit), [], 0
    for cut in sorted(set(cuts)) + [len(text)]:
        fed += splitter.feed(text[at:cut])
        at = max(at, cut)
    assert fed + splitter.flush() == pieces
