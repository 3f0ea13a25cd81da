"""Text that arrives in pieces (a WebSocket, Wyoming's streaming events), spoken sentence by sentence.

A `SpeechSession` is opened by `TTSService.open_session` with a voice, a language and a speed, all checked
and the voice conditioned before it is handed out. Then its owner (one connection):
- `feed(text)` adds a piece of any size (a single token too); the incremental `SentenceSplitter` hands out a
  sentence as soon as its end is certain, and it is queued to be spoken;
- `flush()` speaks what is buffered now, even without a sentence end;
- `cancel()` stops at once (barge-in): the sentence being spoken stops within one chunk and leaves its slot,
  the queued sentences and the buffered text are dropped;
- `close()` is the end of input: the rest is spoken, then the events end.
`events()` yields, in order, `SentenceStarted`, the sentence's audio chunks (float32 numpy arrays at the
engine's rate), `SentenceDone` for each sentence, `Cancelled` after a cancel, `SentenceFailed` for a
sentence that could not be spoken (the session goes on with the next one).

Sentences of one session are generated one after another, each as soon as the one before is generated
(not played): the client's playback buffer covers the next one's start. The session holds a place in the
admission line while it has sentences to speak and gives it back when idle, so an open but silent
connection costs nothing; a full line refuses a sentence with `SentenceFailed(Busy)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from . import language as languages
from .engine.base import Conditioning
from .errors import TTSError
from .text import SentenceSplitter, normalize
from .voices import Voice

if TYPE_CHECKING:
    from .engine.base import SpeechEngine
    from .engine.pool import EnginePool, Place


class SessionService(Protocol):
    """What a session uses of the service (`TTSService`, which opens it): named here so that this module does
    not import the service back."""

    @property
    def engine(self) -> SpeechEngine: ...

    @property
    def languages(self) -> tuple[str, ...]: ...

    def require_pool(self) -> EnginePool: ...

    def speak_pieces(self, pieces: list[str], language: str, conditioning: Conditioning, speed: float,
                     cancel: threading.Event) -> AsyncIterator[np.ndarray]: ...


@dataclass(frozen=True)
class SentenceStarted:
    index: int  # 0, 1, ... in the order the sentences were completed
    text: str
    completed_at: float  # time.perf_counter() when its text was complete (for time-to-first-audio)


@dataclass(frozen=True)
class SentenceDone:
    index: int
    text: str
    audio_samples: int


@dataclass(frozen=True)
class SentenceFailed:
    index: int
    text: str
    error: TTSError


@dataclass(frozen=True)
class Cancelled:
    dropped_sentences: int  # queued sentences that were not spoken (the one cut short not counted)


SessionEvent = SentenceStarted | SentenceDone | SentenceFailed | Cancelled | np.ndarray


@dataclass
class _Sentence:
    index: int
    text: str
    completed_at: float = field(default_factory=time.perf_counter)


class SpeechSession:
    def __init__(self, service: SessionService, voice: Voice, conditioning: Conditioning, language: str,
                 detect: bool, speed: float, clause_chars: int = 0):
        self.service = service
        self.voice = voice
        self.conditioning = conditioning
        self.language = language  # detected from the first sentence when `detect`
        self._detect = detect
        self.speed = speed
        self._splitter = SentenceSplitter(language, service.engine.char_limit(language), clause_chars=clause_chars)
        self._queue: deque[_Sentence] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._cancels = 0  # cancel() calls not yet reported as a Cancelled event
        self._dropped = 0  # sentences they dropped from the queue
        self._speaking = threading.Event()  # the cancel flag of the sentence being generated
        self._next_index = 0
        self._place: Place | None = None
        self._in_sentence = False  # events() is working on a sentence (preparing or speaking it)
        self.characters = 0  # text received, for limits and logs
        self.sentences_spoken = 0
        self.audio_samples = 0

    # -- input (the connection's receiving side) --------------------------------------------------
    @property
    def buffered_chars(self) -> int:
        """Text received and not yet spoken: the splitter's buffer plus the queued sentences."""
        return self._splitter.pending_chars + sum(len(s.text) for s in self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued or being spoken (text still in the splitter waits for more: that is idle too)."""
        return not self._queue and not self._in_sentence

    def feed(self, text: str) -> None:
        if self._closed:
            raise RuntimeError("feed after close")
        self.characters += len(text)
        self._enqueue(self._splitter.feed(text))

    def flush(self) -> None:
        self._enqueue(self._splitter.flush())

    def close(self) -> None:
        """End of input: what is buffered is spoken, then `events()` ends."""
        if not self._closed:
            self.flush()
            self._closed = True
            self._wake.set()

    def cancel(self) -> None:
        """Stop speaking now; drop the queued sentences and the buffered text. The session stays open."""
        self._splitter.flush()
        self._dropped += len(self._queue)
        self._queue.clear()
        self._speaking.set()  # the scheduler frees the slot at its next step
        self._cancels += 1
        self._wake.set()

    def _enqueue(self, pieces: list[str]) -> None:
        for piece in pieces:
            if normalize(piece):
                self._queue.append(_Sentence(self._next_index, piece))
                self._next_index += 1
        if pieces:
            self._wake.set()

    # -- output (the connection's sending side) ---------------------------------------------------
    async def events(self) -> AsyncIterator[SessionEvent]:
        try:
            while True:
                if self._cancels:
                    self._cancels = 0
                    dropped, self._dropped = self._dropped, 0
                    yield Cancelled(dropped)
                    continue
                if not self._queue:
                    self._release_place()  # idle: an open, silent session holds nothing
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                sentence = self._queue.popleft()
                self._in_sentence = True
                try:
                    async for event in self._speak(sentence):
                        yield event
                finally:
                    self._in_sentence = False
        finally:
            self._speaking.set()
            self._release_place()

    async def _speak(self, sentence: _Sentence) -> AsyncIterator[SessionEvent]:
        service = self.service
        try:
            if self._place is None:
                self._place = service.require_pool().admit()
            if self._detect:  # the first sentence tells the language of the session
                self.language = await asyncio.to_thread(languages.detect, sentence.text, service.languages,
                                                        self.language)
                self._detect = False
            pieces = await asyncio.to_thread(service.engine.prepare_text, sentence.text, self.language)
        except TTSError as exc:
            yield SentenceFailed(sentence.index, sentence.text, exc)
            return
        self._speaking = cancel = threading.Event()
        if self._cancels:  # cancelled while the text was prepared
            return
        yield SentenceStarted(sentence.index, sentence.text, sentence.completed_at)
        samples = 0
        try:
            async for chunk in service.speak_pieces(pieces, self.language, self.conditioning, self.speed, cancel):
                if cancel.is_set():
                    return  # barge-in: nothing more of this sentence, not even a chunk already made
                samples += len(chunk)
                self.audio_samples += len(chunk)
                yield chunk
        except TTSError as exc:
            yield SentenceFailed(sentence.index, sentence.text, exc)
            return
        if not cancel.is_set():
            self.sentences_spoken += 1
            yield SentenceDone(sentence.index, sentence.text, samples)

    def _release_place(self) -> None:
        place, self._place = self._place, None
        if place is not None:
            place.release()

    async def aclose(self) -> None:
        """The connection is gone: stop generating and give everything back."""
        self._closed = True
        self._queue.clear()
        self._speaking.set()
        self._wake.set()
        with contextlib.suppress(Exception):
            self._release_place()
