"""Request batching: one worker thread owns the model; it gathers the requests that arrive within a few
milliseconds (or that queued up while it was busy) and answers all those with the same generation settings
in ONE batched `model.chat` call. Streamed requests are decoded one at a time on the same worker.

Failures stay with their request: when a batched call fails, each of its requests is answered alone, so one
request whose input breaks preprocessing or generation fails by itself and the others get the answers they
would get alone. A job cancelled before the worker reaches it (its client went away) is never run."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger("lmm.serve")

_STOP = object()


@dataclass
class Job:
    """One request: a conversation (images already decoded) and its settings. The result (the answer text)
    or the error arrives on `future`; a streamed job also gets every text piece through `on_piece`."""

    conversation: list[dict]
    settings: object  # hashable; `.kwargs()` gives the generation keyword arguments, `.batchable` says if shareable
    on_piece: Callable[[str], None] | None = None
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Batcher:
    """`generate(conversations, settings) -> answers` and `stream(conversation, settings) -> pieces` run on
    the worker thread only, so the model is never used by two threads at once."""

    def __init__(
        self,
        generate: Callable[[list, object], list[str]],
        stream: Callable[[list, object], Iterator[str]],
        max_batch_size: int = 16,
        max_wait_ms: float = 10.0,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self._generate, self._stream = generate, stream
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stats = {
            "requests": 0,
            "forward_batches": 0,
            "batched_requests": 0,
            "largest_batch": 0,
            "streams": 0,
            "errors": 0,
            "cancelled": 0,
        }
        self._thread = threading.Thread(target=self._loop, name="lmm-batcher", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ client side

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._stats["requests"] += 1
        self._queue.put(job)
        return job

    def cancel(self, job: Job) -> bool:
        """Drop a job whose answer no one will read; True when it had not started (it never will)."""
        job.cancelled.set()
        dropped = job.future.cancel()
        if dropped:
            with self._lock:
                self._stats["cancelled"] += 1
        return dropped

    def stats(self) -> dict:
        """Counts so far: requests, forward_batches (batched generate calls + streams), largest_batch ..."""
        with self._lock:
            return dict(self._stats)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ worker side

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, stop = [first], False
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch_size:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                jobs.append(nxt)
            self._run(jobs)
            if stop:
                return

    def _run(self, jobs: list[Job]) -> None:
        live = []
        for j in jobs:
            if j.cancelled.is_set() and not j.future.cancelled():
                self.cancel(j)  # e.g. a stream whose client left before it started
            if j.future.set_running_or_notify_cancel():
                live.append(j)
        groups: dict[object, list[Job]] = {}
        for j in live:
            if j.on_piece is not None:
                self._run_stream(j)
            elif j.settings.batchable:
                groups.setdefault(j.settings, []).append(j)
            else:
                self._run_group([j])
        for group in groups.values():
            self._run_group(group)

    def _count(self, n: int) -> None:
        with self._lock:
            self._stats["forward_batches"] += 1
            self._stats["batched_requests"] += n
            self._stats["largest_batch"] = max(self._stats["largest_batch"], n)

    def _fail(self, job: Job, e: BaseException) -> None:
        with self._lock:
            self._stats["errors"] += 1
        job.future.set_exception(e)

    def _run_group(self, group: list[Job]) -> None:
        self._count(len(group))
        t = time.perf_counter()
        try:
            answers = self._generate([j.conversation for j in group], group[0].settings)
            if len(answers) != len(group):
                raise RuntimeError(f"{len(answers)} answers for {len(group)} requests")
        except Exception as e:  # MemoryError too: one request's huge input must not fail the others
            if len(group) > 1:
                log.info("batch of %d failed (%s); answering each request alone", len(group), type(e).__name__)
                for j in group:
                    self._run_group([j])
                return
            if not isinstance(e, ValueError):  # ValueError: the request's own fault, answered as a 400
                log.exception("generation failed")
            self._fail(group[0], e)
            return
        log.debug("batch of %d answered in %.3fs", len(group), time.perf_counter() - t)
        for j, a in zip(group, answers):
            j.future.set_result(a)

    def _run_stream(self, job: Job) -> None:
        self._count(1)
        with self._lock:
            self._stats["streams"] += 1
        text = []
        try:
            for piece in self._stream(job.conversation, job.settings):
                if job.cancelled.is_set():
                    break
                text.append(piece)
                job.on_piece(piece)
        except Exception as e:
            if not isinstance(e, ValueError):
                log.exception("streamed generation failed")
            self._fail(job, e)
            return
        job.future.set_result("".join(text))
