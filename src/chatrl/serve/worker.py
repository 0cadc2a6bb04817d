"""The generation worker: one thread owns the model; requests reach it through a FIFO queue.

Torch modules are not safe to call from several threads at once (and two callers would fight for
the same 2 cores), so every forward pass happens on this thread. Up to `max_active` sequences are
decoded at the same time by interleaving their `step()`s token by token, so many streaming
clients all see tokens flowing; the rest wait in the queue. A cancelled job (client gone) is
dropped before its next step, which frees its slot for the next one in line.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from chatrl.serve.generation import ChatModel, Decoding, SamplingSettings

log = logging.getLogger(__name__)


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
        self._active: list[_Slot] = []
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
        """Move queued jobs into the active set while they fit (FIFO); sleep when there is nothing to do."""
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
                self._start(job)

    def _start(self, job: Job) -> None:
        for index in range(job.n):
            try:
                decoding = self.chat.start(job.prompt_ids, job.settings, seed_offset=index)
            except Exception as e:  # reported to the client, the worker lives on
                self._emit(job, Event(index=index, error=str(e)))
                continue
            self._active.append(_Slot(job, index, decoding))

    def _run(self) -> None:
        while True:
            self._admit()
            if self._stopping:
                break
            for slot in list(self._active):
                self._step(slot)
        for slot in self._active:
            self._emit(slot.job, Event(index=slot.index, error="the server is shutting down"))
        self._active.clear()

    def _step(self, slot: _Slot) -> None:
        """One token for one sequence; report it, and drop the slot when done, failed or cancelled."""
        job, dec, index = slot.job, slot.decoding, slot.index
        if job.cancelled.is_set():
            self._active.remove(slot)
            return
        try:
            text = dec.step()
        except Exception as e:  # one bad request must not kill the server
            log.exception("generation failed")
            self._active.remove(slot)
            self._emit(job, Event(index=index, error=f"generation failed: {e}"))
            return
        if dec.finish_reason is not None:
            self._active.remove(slot)
        if text or dec.finish_reason is not None:
            self._emit(job, Event(index=index, text=text, finish_reason=dec.finish_reason,
                                  prompt_tokens=dec.prompt_tokens, completion_tokens=dec.completion_tokens))

    def _emit(self, job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # the receiver is gone (closed loop): drop the job
            job.cancel()
