"""Numbers that XTTS's tokenizer cannot expand, spelled out before it sees them.

coqui's tokenizer reads digits with num2words, which raises on ordinary text: a language it does not know
(Hindi), an ordinal it cannot say (Czech "5."), a number too large (Spanish >= 10**27, or 400 digits in a
row). Then the text is given to the tokenizer with such numbers already in words: as a number when
num2words can say it, else digit by digit, and dropped only in a language with no digit names at all.
"""

from __future__ import annotations

import re
from functools import lru_cache

from num2words import num2words

_DIGIT_RUN = re.compile(r"[0-9]+")
MAX_NUMBER_DIGITS = 18  # longer runs (ids, phone numbers, garbage) are read digit by digit
# Digit names for model languages num2words does not know (it has no Hindi; Chinese is coqui's own).
_DIGIT_NAMES = {
    "hi": ("शून्य", "एक", "दो", "तीन", "चार", "पाँच", "छह", "सात", "आठ", "नौ"),
    "zh": tuple("零一二三四五六七八九"),
}


@lru_cache(maxsize=32)
def digit_names(lang: str) -> tuple[str, ...] | None:
    """The words for 0-9 in `lang`, or None when we know none."""
    if lang in _DIGIT_NAMES:
        return _DIGIT_NAMES[lang]
    try:
        return tuple(num2words(d, lang=lang) for d in range(10))
    except Exception:  # num2words raises NotImplementedError (or worse) for a language it lacks
        return None


def as_number(digits: str, lang: str) -> str | None:
    """`digits` said as one number, or None when num2words cannot (or it is too long to be one)."""
    if len(digits) > MAX_NUMBER_DIGITS:
        return None
    try:
        return num2words(int(digits), lang=lang)
    except Exception:  # NotImplementedError, OverflowError, ...: whatever num2words raises means "cannot"
        return None


def digit_by_digit(digits: str, lang: str) -> str:
    names = digit_names(lang)
    return " ".join(names[int(d)] for d in digits) if names else ""


LONG, UNSAYABLE, ALL = "long", "unsayable", "all"  # which numbers `spell_numbers` spells


def spell_numbers(text: str, lang: str, which: str) -> str:
    """`text` with digit runs in words: those over MAX_NUMBER_DIGITS (LONG), also those num2words cannot say
    as a number (UNSAYABLE), or every one (ALL). The others are left to the tokenizer, which reads
    decimals, currency and ordinals better."""

    def replace(match: re.Match[str]) -> str:
        digits = match.group(0)
        if which == LONG and len(digits) <= MAX_NUMBER_DIGITS:
            return digits
        number = as_number(digits, lang)
        if number is not None and which != ALL:
            return digits
        words = number if number is not None else digit_by_digit(digits, lang)
        # keep words apart from letters glued to the number ("5th", "10x")
        before = " " if match.start() > 0 and text[match.start() - 1].isalnum() else ""
        after = " " if match.end() < len(text) and text[match.end()].isalnum() else ""
        return f"{before}{words}{after}" if words else ""

    return " ".join(_DIGIT_RUN.sub(replace, text).split())
