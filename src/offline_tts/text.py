"""Text handling: split text into sentences that fit XTTS's per-language character limits.

XTTS degrades (and coqui warns about truncated audio) past ~250 characters per generation, so long
text is cut at sentence ends first, then at clause punctuation, then between words. Nothing is dropped.
"""

from __future__ import annotations

import re
from functools import lru_cache

import pysbd
from pysbd.languages import LANGUAGE_CODES

_CLAUSE_BREAK = re.compile(r"(?<=[,;:—–)\]»”])\s+")
_SPACE = re.compile(r"\s+")


@lru_cache(maxsize=32)
def _segmenter(language: str) -> pysbd.Segmenter:
    base = language.split("-")[0]
    return pysbd.Segmenter(language=base if base in LANGUAGE_CODES else "en", clean=False)


def normalize(text: str) -> str:
    """Collapse whitespace (newlines included) so sentence splitting and limits see real characters."""
    return _SPACE.sub(" ", text).strip()


def split_sentences(text: str, language: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters, preferring sentence boundaries."""
    text = normalize(text)
    if not text:
        return []
    pieces: list[str] = []
    for sentence in _segmenter(language).segment(text):
        sentence = sentence.strip()
        if sentence:
            pieces.extend(_fit(sentence, max_chars))
    return pieces


def _fit(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    # Too long: pack clauses, then words, greedily into chunks under the limit.
    parts = _CLAUSE_BREAK.split(sentence)
    if len(parts) == 1:
        parts = sentence.split(" ")
        if len(parts) == 1:  # one enormous "word": cut it (rare, e.g. a URL)
            return [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]
    out: list[str] = []
    current = ""
    for part in parts:
        for piece in _fit(part, max_chars) if len(part) > max_chars else [part]:
            candidate = f"{current} {piece}" if current else piece
            if len(candidate) <= max_chars:
                current = candidate
            else:
                out.append(current)
                current = piece
    if current:
        out.append(current)
    return out
