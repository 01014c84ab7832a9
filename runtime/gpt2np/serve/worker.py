"""The engine's thread: the one decode loop of `gpt2np.engine`, fed by HTTP handlers.

HTTP handlers run on the asyncio event loop; the engine runs on its own thread (NumPy releases
the GIL in BLAS, so the loop stays responsive while a step computes). Handlers hand sequences to
`submit`, which checks the capacity (running + waiting <= max_batch + max_queue) and wakes the
thread; the thread adds them to the engine between steps and, after every step, delivers each
request's events to its asyncio queue in one call. A handler cancels by `SequenceState.cancel()`: the
sequence leaves at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Callable

from ..engine import Engine
from ..sequence import Event, SequenceState
from .metrics import Metrics

log = logging.getLogger("gpt2np.serve")

GATHER_S = 0.003  # how long an idle engine waits for more scoring requests before its first step

Listener = Callable[[list[Event]], None]  # a request's events of one step, as the engine made them


class QueueFull(Exception):
    """More sequences than running slots and queue places together."""


class EngineWorker:
    def __init__(self, engine: Engine, max_queue: int, metrics: Metrics):
        self.engine, self.max_queue, self.metrics = engine, max_queue, metrics
        self.capacity = engine.max_batch + max_queue
        self._lock = threading.Condition()
        self._inbox: list[tuple[SequenceState, Listener]] = []
        self._listeners: dict[int, Listener] = {}  # id(sequence) -> its request's listener
        self._last_token_at: dict[int, float] = {}
        self.active = 0  # sequences submitted and not yet done
        self.running = 0  # sequences in the batch after the last step
        self._stop = False
        self._cancel_all = False
        self._cache_seen = (0, 0)  # the prefix cache's counts already in the metrics
        self._thread = threading.Thread(target=self._loop, name="gpt2np-engine", daemon=True)

    @property
    def waiting(self) -> int:
        return max(self.active - self.running, 0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=30)

    def submit(self, seqs: list[SequenceState], loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Hand over one request's sequences; their events arrive in `queue`, a list per step.
        Raises QueueFull if they do not fit: nothing is queued then."""
        def listener(events: list[Event]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, events)

        with self._lock:
            if self.active + len(seqs) > self.capacity:
                raise QueueFull()
            self.active += len(seqs)
            self._inbox += [(s, listener) for s in seqs]
            self._lock.notify()
        for s in seqs:
            self.metrics.prompt_tokens.inc(len(s.result.prompt_ids))

    @contextlib.contextmanager
    def reserve(self):
        """Hold one place of the capacity while work that is not a sequence runs (the playground's
        explain report), so that it waits in the same limits as any request. Raises QueueFull."""
        with self._lock:
            if self.active + 1 > self.capacity:
                raise QueueFull()
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def cancel_all(self) -> None:
        """Cancel every request (from any thread): the engine's thread does it before its next step."""
        with self._lock:
            for s, _ in self._inbox:
                s.cancel()
            self._cancel_all = True
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self.engine.idle:
                    while not self._inbox and not self._stop:
                        self._lock.wait()
                    # Requests sent together reach the engine a few ms apart (each is parsed in
                    # turn): gather them into one first step (the choices of one item then read
                    # their shared context in one pass). Only an idle engine waits, and only for
                    # prompts scored (lm-eval's loglikelihood requests, sent in bursts): a generating
                    # request's first token does not wait, and a prompt sharing its prefix that
                    # comes a moment later reads it from its pass (`PrefixCacheManager.reader`), not again.
                    gather = any(s.scoring for s, _ in self._inbox)
                    deadline = time.monotonic() + (GATHER_S if gather else 0)
                    while not self._stop and (left := deadline - time.monotonic()) > 0:
                        self._lock.wait(left)
                if self._stop:
                    return
                new, self._inbox = self._inbox, []
                cancel, self._cancel_all = self._cancel_all, False
            for seq, listener in new:
                self._listeners[id(seq)] = listener
                self.engine.submit(seq)
            if cancel:
                self.engine.cancel_all()
            try:
                events = self.engine.step()
            except Exception:  # noqa: BLE001 -- the engine must outlive any one request
                # Engine.step fails sequences, not itself; this is a bug. Fail everything it
                # holds, so that no request waits for an event that will not come.
                log.exception("engine step failed")
                events = self.engine.fail_all("internal error in the engine")
            self.running = self.engine.n_running
            self._count_cache()
            self._deliver(events)

    def _count_cache(self) -> None:
        cache = self.engine.prefix_cache
        if cache is not None:
            self.metrics.prefix_cache_queries.inc(cache.queries - self._cache_seen[0])
            self.metrics.prefix_cache_hits.inc(cache.hits - self._cache_seen[1])
            self._cache_seen = (cache.queries, cache.hits)
            self.metrics.prefix_cache_bytes.set(cache.bytes)

    def _deliver(self, events: list[Event]) -> None:
        now, by_listener, done = time.perf_counter(), {}, 0
        for event in events:
            seq, token = event.sequence, event.token
            key = id(seq)
            if token is not None:
                self.metrics.generation_tokens.inc()
                last = self._last_token_at.get(key)
                if last is None:
                    self.metrics.time_to_first_token.observe(now - seq.submitted_at)
                else:
                    self.metrics.time_per_output_token.observe(now - last)
                self._last_token_at[key] = now
            if event.reason is not None:  # its last event (a step may bring a sequence several)
                done += 1
                self._last_token_at.pop(key, None)
                self.metrics.finished.labels(seq.result.stop_reason).inc()
                if seq.guide is not None:
                    self.metrics.constraint_compile.observe(seq.guide.compile_s)
                    if seq.guide.masks:
                        self.metrics.constraint_mask.observe(seq.guide.mask_s / seq.guide.masks)
                    self.metrics.forced_tokens.inc(seq.result.forced)
                listener = self._listeners.pop(key, None)
            else:
                listener = self._listeners.get(key)
            if listener is not None:
                by_listener.setdefault(listener, []).append(event)
        if done:
            with self._lock:
                self.active -= done
        for listener, batch in by_listener.items():
            listener(batch)
