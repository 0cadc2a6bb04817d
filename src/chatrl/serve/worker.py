"""The generation worker: one thread owns the model; requests reach it through a FIFO queue.

Torch modules are not safe to call from several threads at once (and two callers would fight for
the same 2 cores), so every forward pass happens on this thread. Up to `max_active` sequences are
decoded at the same time with continuous batching (`serve.batching`): one decode step is ONE forward
for all active sequences, new requests are prefilled and join between steps, finished ones leave, so
8 streams cost little more per step than 1. The rest wait in the queue. A cancelled job (client gone)
is dropped before the next step, which frees its rows for the next one in line. Models the batched path
cannot drive fall back to one forward per sequence per step (`batching.SerialRows`). The worker owns its
model: on CPU its linear weights are pre-packed for oneDNN in place (`batching.pack_linear_weights`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from chatrl.serve.batching import RowResult, make_rows
from chatrl.serve.generation import ChatModel, Decoding, SamplingSettings


@dataclass
class Event:
    """What the worker reports for one choice: a text delta, and at the end a finish reason or an error."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class QueueFull(Exception):
    """The waiting line is full; the caller should answer 503 and let the client retry."""


class Job:
    """One request: `n` choices of the same prompt; events go to `sink` (called on the worker thread)."""

    def __init__(self, prompt_ids: list[int], settings: SamplingSettings, sink: Callable[[Event], None], n: int = 1):
        self.prompt_ids = prompt_ids
        self.settings = settings
        self.sink = sink
        self.n = n
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the worker to drop this job (safe from any thread; takes effect before its next token)."""
        self.cancelled.set()


@dataclass
class _Slot:
    job: Job
    index: int  # which of the job's n choices
    decoding: Decoding


class GenerationWorker:
    """Owns `chat.model`; `submit()` from any thread, events come back through each job's sink."""

    def __init__(self, chat: ChatModel, max_active: int = 8, max_queue: int = 256):
        self.chat = chat
        self.max_active = max(1, max_active)
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._active: dict[Decoding, _Slot] = {}  # every sequence being decoded (Decoding hashes by identity)
        self._rows = make_rows(chat, self.max_active)  # the batch engine; only this worker's thread calls it
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="chatrl-generation", daemon=True)

    def start(self) -> GenerationWorker:
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current token, cancel everything, and end the thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, job: Job) -> Job:
        """Queue a job; raises `QueueFull` when `max_queue` jobs already wait."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            self._pending = collections.deque(j for j in self._pending if not j.cancelled.is_set())
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are already waiting")
            self._pending.append(job)
            self._cond.notify()
        return job

    @property
    def load(self) -> tuple[int, int]:
        """(sequences being decoded, jobs waiting)."""
        with self._cond:
            return len(self._active), len(self._pending)

    def _admit(self) -> None:
        """Move queued jobs into the active set while they fit (FIFO) and prefill them; sleep when there is
        nothing to do. The prefill runs outside the lock, so `submit` never waits for a forward."""
        started: list[tuple[Job, list[Decoding]]] = []
        with self._cond:
            while not self._stopping and not self._active and not self._pending:
                self._cond.wait()
            while self._pending and not self._stopping:
                job = self._pending[0]
                if job.cancelled.is_set():
                    self._pending.popleft()
                    continue
                if self._active and len(self._active) + job.n > self.max_active:
                    break  # wait for slots; a job larger than max_active runs alone
                self._pending.popleft()
                started.append((job, self._start(job)))
        for job, decodings in started:
            if job.cancelled.is_set():  # gone while the prompts before it were prefilled: skip its prefill
                for dec in decodings:
                    del self._active[dec]
                continue
            # one job at a time, reported at once: its first token does not wait for the other jobs' prefills
            self._report(self._rows.admit(decodings))

    def _start(self, job: Job) -> list[Decoding]:
        decodings = []
        for index in range(job.n):
            try:
                decoding = self.chat.start(job.prompt_ids, job.settings, seed_offset=index)
            except Exception as e:  # reported to the client, the worker lives on
                self._emit(job, Event(index=index, error=str(e)))
                continue
            self._active[decoding] = _Slot(job, index, decoding)
            decodings.append(decoding)
        return decodings

    def _run(self) -> None:
        while True:
            self._admit()
            if self._stopping:
                break
            self._drop_cancelled()
            self._report(self._rows.step())
        for slot in self._active.values():
            self._emit(slot.job, Event(index=slot.index, error="the server is shutting down"))
        self._active.clear()
        self._rows.clear()

    def _drop_cancelled(self) -> None:
        """Take the sequences of cancelled jobs out of the batch before the next step (frees their rows)."""
        gone = [dec for dec, slot in self._active.items() if slot.job.cancelled.is_set()]
        if gone:
            self._rows.drop(gone)
            for dec in gone:
                del self._active[dec]

    def _report(self, results: list[RowResult]) -> None:
        """Send each sequence's new text (and its end or error) to its job; forget the sequences that ended."""
        for r in results:
            slot = self._active.get(r.decoding)
            if slot is None:  # cancelled meanwhile
                continue
            dec = r.decoding
            if r.done:
                del self._active[dec]
            if r.error is not None:
                self._emit(slot.job, Event(index=slot.index, error=r.error))
            elif r.text or dec.finish_reason is not None:
                self._emit(slot.job, Event(index=slot.index, text=r.text, finish_reason=dec.finish_reason,
                                           prompt_tokens=dec.prompt_tokens, completion_tokens=dec.completion_tokens))

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiver is gone (closed loop): drop the job
            job.cancel()
