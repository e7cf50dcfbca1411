"""One pipeline behind a bounded FIFO queue, run by one worker thread.

A request becomes a `Job`: admitted in order of arrival (or refused when `max_queue` jobs already
wait), generated token by token from `Pipeline.stream`, and its events (text deltas, then the end or
an error) handed to the event loop that waits for them. Between tokens the worker checks the job's
cancel flag (a client that left, a request past its deadline): the stream is closed there, which
gives the pipeline back, and the next job starts. A job drops its image once the generation that
read it has ended, before its answer is handed back."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import TopsError
from .errors import ApiError, from_tops_error, internal
from .metrics import ServerMetrics

log = logging.getLogger("tops_edge.serve")

FINISH = {"eos": "stop", "length": "length", "stop": "stop"}


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    visual_tokens_before_pruning: int
    visual_tokens_after_pruning: int

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "visual_tokens_before_pruning": self.visual_tokens_before_pruning,
                "visual_tokens_after_pruning": self.visual_tokens_after_pruning}


@dataclass
class Done:
    text: str
    finish_reason: str
    usage: Usage


@dataclass
class Job:
    image: Any  # a PIL image; None once the generation that read it has ended
    prompt: str
    raw: bool
    options: dict  # Pipeline.stream's keyword arguments
    selector: tuple[str, dict] | None  # (method, params), parsed; None: the export's
    stops: list[str]
    stream: bool  # send text deltas as they come (else only the end)
    arrival: float  # on the engine's clock
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = field(default_factory=lambda: "chatcmpl-" + uuid.uuid4().hex[:24])
    seq: int = -1  # order of admission
    cancel_reason: str | None = None  # "client_disconnected", "timeout", "shutdown": the worker stops at the next token
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _on_cancel: Callable[[], None] | None = None  # the engine's: wakes Engine.wait_until

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, kind: str, value=None) -> None:
        """An event for the request's handler, from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is gone
            pass


def shutdown_error() -> ApiError:
    return ApiError(503, "the server is shutting down", type="server_error", code="shutdown")


def timeout_error(seconds: float) -> ApiError:
    return ApiError(504, f"the request took longer than this server's {seconds:g} s (tops-serve --request-timeout)",
                    type="timeout_error", code="timeout")


class Engine:
    """The queue and its worker. `submit` admits a job or raises a 429 ApiError; `history` records the
    last jobs' outcomes (id, seq, start order, outcome, tokens) for /health and tests."""

    def __init__(self, pipe, max_queue: int = 8, request_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic, history: int = 1000):
        self.pipe = pipe
        self.max_queue = max_queue
        self.request_timeout = request_timeout
        self.clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._admit = threading.Lock()
        self._seq = itertools.count()
        self._started = itertools.count()
        self._busy = False
        self._current: Job | None = None  # the running job (cancelled at shutdown)
        self._thread: threading.Thread | None = None
        self._service_s = 0.0  # a running mean of a job's generation time, for Retry-After
        self._changed = threading.Condition()
        self.history: deque = deque(maxlen=history)
        self.metrics = ServerMetrics(self._queue.qsize, max_queue, lambda: int(self._busy))
        selector = pipe.manifest["selector"]
        self._default = (pipe.selector_method, dict(pipe.selector_params), pipe.merge, selector["method"],
                         selector["merge"])

    # --- the event loop's side ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="tops-serve-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Refuse what waits (503), stop the running job at its next token, end the worker."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit("error", shutdown_error())
        current = self._current
        if current is not None:
            current.cancel("shutdown")
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def full(self) -> bool:
        return self._queue.full()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time the queue takes to move one place."""
        return max(1, min(60, math.ceil(self._service_s or 1.0)))

    def queue_full(self) -> ApiError:
        return ApiError(429, f"the server is busy: {self.max_queue} requests are already waiting (tops-serve "
                             f"--max-queue); retry in {self.retry_after()} s", type="rate_limit_error",
                        code="queue_full", headers={"Retry-After": str(self.retry_after())})

    def submit(self, job: Job) -> None:
        job._on_cancel = self._notify
        with self._admit:  # one admission at a time, so that seq is the queue's order
            job.seq = next(self._seq)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise self.queue_full() from None

    def deadline(self, arrival: float) -> float | None:
        return None if self.request_timeout is None else arrival + self.request_timeout

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Waits (up to `timeout` s) until predicate() holds; it is re-checked each time a job ends or
        is cancelled."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # --- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            record = {"id": job.id, "seq": job.seq, "start": next(self._started), "outcome": None, "tokens": 0}
            self._busy, self._current = True, job
            try:
                self._run(job, record)
            except BaseException as exc:  # noqa: BLE001  (the worker must outlive any one job)
                log.exception("tops-serve: job %s failed", job.id)
                record["outcome"] = "internal_error"
                job.emit("error", internal(exc))
            finally:
                job.image = None
                self._busy, self._current = False, None
                del job
                with self._changed:
                    self.history.append(record)
                    self._changed.notify_all()

    def _past_deadline(self, job: Job) -> bool:
        return job.deadline is not None and self.clock() > job.deadline

    def _run(self, job: Job, record: dict) -> None:
        m = self.metrics
        if not job.cancelled and self._past_deadline(job):
            job.cancel("timeout")
        if job.cancelled:
            record["outcome"] = job.cancel_reason
            self._emit_cancel(job)
            return
        started = self.clock()
        m.queue_wait.observe(started - job.arrival)
        try:
            self._switch(job.selector)
            stream = self.pipe.stream(job.image, job.prompt, raw_prompt=job.raw, **job.options)
            outcome, text = self._generate(job, stream, record)
        except TopsError as exc:
            error = from_tops_error(exc)
        except ApiError as exc:
            error = exc
        else:
            error = None
        finally:
            job.image = None
            self._restore(job.selector)
        if error is not None:
            record["outcome"] = error.code
            job.emit("error", error)
            return
        self._service_s = 0.8 * self._service_s + 0.2 * (self.clock() - started) if self._service_s else \
            self.clock() - started
        record["outcome"] = outcome
        if outcome not in ("ok", "stop"):
            self._emit_cancel(job)
            return
        r = stream.result
        usage = Usage(r.prompt_tokens, len(r.token_ids), r.num_visual_tokens, len(r.kept_indices))
        m.prompt_tokens.inc(usage.prompt_tokens)
        m.completion_tokens.inc(usage.completion_tokens)
        m.visual.inc(usage.visual_tokens_before_pruning, stage="before_pruning")
        m.visual.inc(usage.visual_tokens_after_pruning, stage="after_pruning")
        m.visual_kept.observe(usage.visual_tokens_after_pruning)
        if len(r.token_ids) > 1:
            m.decode.observe(r.timings_ms["decode_per_token"] / 1e3)
        job.emit("done", Done(text, "stop" if outcome == "stop" else FINISH[r.finish_reason], usage))

    def _emit_cancel(self, job: Job) -> None:
        """A cancelled job's answer: none for a client that left (nobody reads it)."""
        if job.cancel_reason == "timeout":
            job.emit("error", timeout_error(self.request_timeout))
        elif job.cancel_reason == "shutdown":
            job.emit("error", shutdown_error())

    def _generate(self, job: Job, stream, record: dict) -> tuple[str, str]:
        """Runs the stream to its end, a stop string, a cancel or the deadline; closes it either way
        (which gives the pipeline back). Returns (outcome, text): outcome "ok", "stop" (a stop
        string) or the cancel's reason ("client_disconnected", "timeout", "shutdown")."""
        text, sent, first = "", 0, True
        longest = max((len(s) for s in job.stops), default=0)
        outcome = "ok"
        try:
            for chunk in stream:
                if first:
                    self.metrics.ttft.observe(self.clock() - job.arrival)
                    first = False
                record["tokens"] += chunk.token_id is not None
                if job.cancelled:
                    outcome = job.cancel_reason
                    break
                if self._past_deadline(job):
                    job.cancel("timeout")
                    outcome = "timeout"
                    break
                text += chunk.text
                if longest:
                    hits = [i for i in (text.find(s, max(0, sent - longest)) for s in job.stops) if i >= 0]
                    if hits:
                        text = text[: min(hits)]
                        outcome = "stop"
                        break
                    ready = max(sent, len(text) - (longest - 1))  # a stop string may still be starting
                else:
                    ready = len(text)
                if job.stream and ready > sent:
                    job.emit("delta", text[sent:ready])
                    sent = ready
        finally:
            stream.close()
        if job.stream and outcome in ("ok", "stop") and len(text) > sent:
            job.emit("delta", text[sent:])
        return outcome, text

    def _switch(self, selector: tuple[str, dict] | None) -> None:
        """The request's selector (and its merge=...), for this job only (`_restore` undoes it)."""
        if selector is None:
            return
        from .. import selector as registry

        name, params = selector
        params = dict(params)
        _, _, _, exported, exported_merge = self._default
        self.pipe.merge = params.pop("merge", exported_merge if name == exported else registry.get(name).merge)
        self.pipe.use_selector(name, **params)

    def _restore(self, selector) -> None:
        if selector is None:
            return
        method, params, merge, _, _ = self._default
        self.pipe.merge = merge
        self.pipe.use_selector(method, **params)
