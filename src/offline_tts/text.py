"""Text handling: normalize text and split it into pieces that fit XTTS's per-language character limits.

XTTS degrades (and coqui warns about truncated audio) past ~250 characters per generation, so long
text is cut at sentence ends first, then at clause punctuation, then between words. Nothing is dropped.

The splitter is our own small rule-based scanner, not pysbd: pysbd's regexes backtrack catastrophically
(a 39-character text like "..[111 111 ... 111]" takes minutes, pySBD issue #79). Here no regex has nested
or overlapping quantifiers (each is a character class, repeated at most), each character is looked at a
bounded number of times, and so splitting is linear in the length of the text, whatever the text. The same `SentenceSplitter` works incrementally
(`feed` text as it arrives, `flush` at the end) and gives exactly the pieces of a one-shot split.
"""

from __future__ import annotations

import re

from .language import primary

_SPACE = re.compile(r"\s+")
_SURROGATE = re.compile("[\ud800-\udfff]")  # only lone ones survive JSON decoding; UTF-8 cannot encode them

# Sentence-ending marks, and the closing quotes/brackets that may follow them ("Stop." she said / (see below.)).
_TERMINATORS = ".!?…‼⁇⁈⁉。！？｡।॥؟"
_CJK_TERMINATORS = frozenset("。！？｡")  # these end a sentence with no space after them
_CLOSERS = "\"'”’»›)]}」』）"
_OPENERS = "\"'“‘„‚«‹([{¿¡「『（-–—"  # skipped when looking at the word after a sentence end
_MAX_OPENERS = 8  # bounds that lookahead
_CANDIDATE = re.compile(f"[{re.escape(_TERMINATORS)}]")
_MARKS_RUN = re.compile(f"[{re.escape(_TERMINATORS + _CLOSERS)}]{{0,16}}")  # bounded: rescanned while pending
_CLAUSE_BREAK = re.compile(r"(?<=[,;:—–)\]»”，、；：])\s")

# Abbreviations after which a period never ends a sentence (lowercase, without their final period). Single
# letters ("J. K. Rowling", "p. ej.") and a period before a number ("No. 5", "Jan. 3") are handled by rule.
_SHARED_ABBREVIATIONS = {"dr", "dra", "prof", "e.g", "i.e"}
_ABBREVIATIONS = {
    "en": {"mr", "mrs", "ms", "mt", "st", "jr", "sr", "vs", "approx", "dept", "gen", "col", "capt", "lt", "sgt",
           "rev", "hon", "gov", "sen", "rep", "pres", "fig", "vol", "jan", "feb", "mar", "apr", "jun", "jul", "aug",
           "sep", "sept", "oct", "nov", "dec"},
    "es": {"sr", "sra", "srta", "sres", "dña", "lic", "ing", "arq", "profa", "sto", "sta", "ud", "uds", "vd", "vds",
           "ej", "pág", "núm", "art", "cap", "av", "avda", "aprox", "ee.uu", "tel"},
    "fr": {"mm", "mme", "mmes", "mlle", "mlles", "pr", "st", "ste", "me", "mgr", "cf", "env", "av", "bd", "tél"},
    "de": {"hr", "hrn", "fr", "frl", "nr", "bzw", "ca", "vgl", "st", "z.b", "d.h", "u.a", "evtl", "ggf", "inkl", "str"},
    "it": {"sig", "sigg", "sig.ra", "sig.na", "dott", "dott.ssa", "avv", "ing", "arch", "geom", "rag", "sr", "pag"},
    "pt": {"sr", "sra", "srta", "profa", "eng", "av", "pág", "exmo", "exma", "sto", "sta"},
    "pl": {"mgr", "inż", "np", "ul", "al", "tzw", "ks", "płk", "gen", "św"},
    "cs": {"pí", "sl", "ing", "mgr", "např", "tzv", "ul", "č", "resp", "sv"},
    "ru": {"г", "гг", "ул", "д", "им", "проф", "т.е", "т.к", "см", "стр", "тыс", "млн", "млрд"},
    "nl": {"dhr", "mevr", "mw", "ir", "drs", "mr", "bijv", "nr", "blz", "o.a", "m.b.t", "st"},
    "tr": {"doç", "sn", "av", "yrd", "bkz", "vb", "vs"},
    "hu": {"özv", "id", "ifj", "kb", "stb", "pl", "ún"},
}
# Languages that write ordinals as "5." ("Dne 5. května", "am 3. Oktober"): a number's period is not an end.
_ORDINAL_DOT = {"de", "cs", "pl", "hu", "tr"}


def normalize(text: str) -> str:
    """Collapse whitespace (newlines included) and drop lone surrogates, which no encoder, log or model can take."""
    return _SPACE.sub(" ", _SURROGATE.sub("", text)).strip()


def split_sentences(text: str, language: str, max_chars: int) -> list[str]:
    """Split `text` into pieces of at most `max_chars` characters, preferring sentence boundaries."""
    splitter = SentenceSplitter(language, max_chars)
    return splitter.feed(text) + splitter.flush()


class SentenceSplitter:
    """Cut text into speakable pieces as it arrives: a piece is returned as soon as it cannot change any more.

    A sentence end is certain once the word after it is seen (its case, and whether the period belongs to an
    abbreviation, decide); a sentence longer than `max_chars` is cut at clause punctuation, then between
    words (then inside a giant word), packing greedily, and its first pieces come out before the sentence
    ends. With `clause_chars`, a piece at least that long is also returned at its clause break (",", ";",
    ...), so text that streams in without a sentence end starts to be spoken. `feed(a); feed(b); flush()`
    returns the same pieces as `feed(a + b); flush()`.

    Linear time: the buffer is scanned forward once; only a sentence end that waits for the next word is
    looked at again, and that lookahead is bounded (_MAX_OPENERS).
    """

    def __init__(self, language: str, max_chars: int, clause_chars: int = 0):
        if max_chars < 1:
            raise ValueError("max_chars must be at least 1")
        base = primary(language)
        self.max_chars = max_chars
        self.clause_chars = clause_chars  # > 0: a piece this long ends at its next clause break (text in pieces)
        self._abbreviations = _SHARED_ABBREVIATIONS | _ABBREVIATIONS.get(base, set())
        self._ordinal_dot = base in _ORDINAL_DOT
        self._reset()

    def _reset(self) -> None:
        self._buf = ""  # text fed and not yet returned (from `_start` on)
        self._start = 0  # the current sentence's text not yet packed begins here
        self._scan = 0  # sentence-end candidates before this index are known not to be ends
        self._overlong = False  # the current clause is longer than max_chars: its units are its words
        self._piece = ""  # the piece being packed (units joined by spaces)
        self._cut, self._cut_digits = "", True  # start of a giant word already sliced off (17 chars at most)
        self._after_space = True  # the last character fed was whitespace (drop more of it)

    # -- public -----------------------------------------------------------------------------------
    @property
    def pending_chars(self) -> int:
        """Characters fed and not returned yet (spaces between clauses not counted)."""
        return len(self._buf) - self._start + len(self._piece)

    def feed(self, text: str) -> list[str]:
        """Add text; return the pieces that are now final (maybe none)."""
        self._append(text)
        return self._advance(final=False)

    def flush(self) -> list[str]:
        """The text ended: return every remaining piece, and start over."""
        pieces = self._advance(final=True)
        self._reset()
        return pieces

    # -- input --------------------------------------------------------------------------------------
    def _append(self, text: str) -> None:
        text = _SPACE.sub(" ", _SURROGATE.sub("", text))
        if self._after_space:
            text = text.lstrip(" ")
        if text:
            # drop what was returned already (once per feed, so a long text is not copied per sentence)
            self._buf, self._scan = self._buf[self._start :] + text, self._scan - self._start
            self._start = 0
            self._after_space = text.endswith(" ")

    def _advance(self, final: bool) -> list[str]:
        pieces: list[str] = []
        while (end := self._next_sentence_end(final)) is not None:
            pieces += self._pack(self._take_units(end, closed=True))
            pieces += self._finish_piece()
            while self._start < len(self._buf) and self._buf[self._start] == " ":
                self._start += 1
            self._scan = max(self._scan, self._start)
        if final:  # the rest is the last sentence
            pieces += self._pack(self._take_units(len(self._buf.rstrip(" ")), closed=True))
            pieces += self._finish_piece()
        else:  # pack what is certain already, so a long sentence starts coming out before it ends
            pieces += self._pack(self._take_units(self._scan, closed=False))
        return pieces

    # -- sentence ends ------------------------------------------------------------------------------
    def _next_sentence_end(self, final: bool) -> int | None:
        """Index just past the next certain sentence end, or None; advances `_scan` past what is decided."""
        buf = self._buf
        while match := _CANDIDATE.search(buf, self._scan):
            start = match.start()
            end = _MARKS_RUN.match(buf, start).end()
            verdict = self._is_end(buf, start, end, final)
            if verdict is None:  # decided by text that has not come yet
                self._scan = start
                return None
            self._scan = end
            if verdict:
                return end
        self._scan = len(buf)
        return None

    def _is_end(self, buf: str, start: int, end: int, final: bool) -> bool | None:
        """Whether the marks at buf[start:end] end a sentence; None when the next text decides."""
        if end == len(buf):
            return True if final else None
        if buf[start] in _CJK_TERMINATORS:
            return True
        if buf[end] != " ":  # "3.14", "example.com", "?!x": inside a token
            return False
        after = end + 1
        while after < len(buf) and buf[after] in _OPENERS and after - end <= _MAX_OPENERS:
            after += 1
        if after == len(buf):
            return True if final else None
        following = buf[after]
        if following.islower():  # "etc. y", "5 p.m. on", "...pero": the sentence goes on
            return False
        if buf[start:end].rstrip(_CLOSERS) == ".":
            if following.isdigit():  # "No. 5", "Jan. 3", "p. 12"
                return False
            word_start = buf.rfind(" ", 0, start) + 1
            head, head_digits = ("", True) if word_start > self._start else (self._cut, self._cut_digits)
            word = (head + buf[max(word_start, self._start) : start]).lstrip(_OPENERS).lower()
            if word in self._abbreviations or (len(word) == 1 and word.isalpha()):  # "Sr. Pérez", "J. K."
                return False
            if self._ordinal_dot and word.isdigit() and head_digits:  # "Dne 5. Května", "am 3. Oktober"
                return False
        return True

    # -- cutting one sentence into pieces -----------------------------------------------------------
    def _take_units(self, end: int, closed: bool) -> list[str]:
        """Consume the units of buf[_start:end] that are certain (all of them when `closed`: the sentence ends
        at `end`). A unit is a clause, or a word of a clause over the limit, or a limit-sized slice of a
        word over the limit."""
        buf, limit = self._buf, self.max_chars
        units: list[str] = []
        pos = self._start
        while pos < end:
            brk = _CLAUSE_BREAK.search(buf, pos, end)
            clause_end = brk.start() if brk else end
            clause_closed = brk is not None or closed
            if not self._overlong:
                if clause_end - pos <= limit:
                    if not clause_closed:
                        break  # may grow yet
                    units.append(buf[pos:clause_end])
                    pos = brk.end() if brk else end
                    continue
                self._overlong = True  # certain: the clause is already this long
            pos = self._take_words(buf, pos, clause_end, clause_closed, units)
            if pos < clause_end or not clause_closed:
                break
            self._overlong = False
            pos = brk.end() if brk else end
        self._start = pos
        return units

    def _take_words(self, buf: str, pos: int, clause_end: int, closed: bool, units: list[str]) -> int:
        """Append the certain words of an overlong clause buf[pos:clause_end] to `units`; return where they end."""
        limit = self.max_chars
        while pos < clause_end:
            space = buf.find(" ", pos, clause_end)
            word_end = clause_end if space == -1 else space
            if space == -1 and not closed:  # the last word may still grow: only its full slices are certain
                full = max(0, (word_end - pos - 1) // limit * limit)
                if full:  # remembered: the sentence-end rules look at whole words
                    units.extend(buf[i : i + limit] for i in range(pos, pos + full, limit))
                    self._cut = (self._cut + buf[pos : pos + 17])[:17]
                    self._cut_digits = self._cut_digits and buf[pos : pos + full].isdigit()
                return pos + full
            units.extend(buf[i : min(i + limit, word_end)] for i in range(pos, word_end, limit))  # 1 unless giant
            self._cut, self._cut_digits = "", True
            pos = word_end + (space != -1)
        return pos

    def _pack(self, units: list[str]) -> list[str]:
        """Greedily join units into pieces within the limit; return the pieces that are full."""
        full = []
        for unit in units:
            if not self._piece:
                self._piece = unit
            elif len(self._piece) + 1 + len(unit) <= self.max_chars:
                self._piece += " " + unit
            else:
                full.append(self._piece)
                self._piece = unit
            if 0 < self.clause_chars <= len(self._piece):  # long enough to speak without waiting for the end
                full.append(self._piece)
                self._piece = ""
        return full

    def _finish_piece(self) -> list[str]:
        piece, self._piece = self._piece, ""
        return [piece] if piece else []
