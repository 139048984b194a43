"""Continuous batching: many requests share one model, each in its own KV slot.

One thread (the scheduler's) owns the SlotEngine. Each turn of its loop it
  1. drops requests whose client went away (their slots are free at once),
  2. moves waiting requests into free slots (preferring the idle slot that already holds
     the longest prefix of the prompt, else the least recently used one),
  3. prefills up to one chunk of prompt tokens (the oldest new prompts first, in one forward),
     so that a long prompt delays the streams of others by one chunk per step, not by its
     whole length,
  4. runs one decode step over the next token of every decoding request together, and
     samples each with its own parameters (temperature, top-k, top-p, seed, stop strings,
     max tokens).
Requests join and leave between steps. Events go to each request's `emit` callback from the
scheduler thread: ("text", piece) and finally ("done", RequestStats) or ("error", message).
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from hybrid.runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)

__all__ = ["QueueFull", "Request", "RequestStats", "Scheduler", "TextStream", "name_os_thread"]

# time-to-first-token histogram buckets (seconds), Prometheus style (upper bounds)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` where the OS shows it (Linux: top -H, /proc/*/task/*/comm;
    15 characters at most), so that a thread's CPU time can be told apart; best effort."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)    # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class QueueFull(Exception):
    """More requests wait than the queue takes."""


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0         # prompt tokens found in the slot (not prefilled again)
    completion_tokens: int = 0
    finish_reason: str = ""        # stop | length | cancelled
    queued_s: float = 0.0          # submit -> a slot
    ttft_s: float = 0.0            # submit -> first token sampled
    prefill_s: float = 0.0
    decode_s: float = 0.0


class TextStream:
    """Token ids -> text pieces, ending at a stop string: the text before the first stop
    string is emitted, a tail that could still become one is held back until it cannot.
    The one stop-string logic of a reply (the scheduler's and Runtime.generate_tokens')."""

    def __init__(self, decoder, stops: Sequence[str]):
        self.dec, self.stops = decoder, [s for s in stops if s]
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.text, self.emitted = "", 0

    def push(self, token: int) -> tuple[str, bool]:
        """(text to emit, whether a stop string ended the reply)."""
        self.text += self.dec.push(token)
        # text before `emitted` was searched already, up to a tail shorter than any stop
        start = max(0, self.emitted - self.hold)
        hit = min((p for p in (self.text.find(s, start) for s in self.stops) if p >= 0), default=-1)
        if hit >= 0:
            piece = self.text[self.emitted:hit] if hit > self.emitted else ""
            self.emitted = max(self.emitted, hit)
            return piece, True
        safe = len(self.text) - self.hold
        if safe > self.emitted:
            piece, self.emitted = self.text[self.emitted:safe], safe
            return piece, False
        return "", False

    def flush(self) -> str:
        """The held-back tail at the end of a reply not ended by a stop string."""
        self.text += self.dec.flush()
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


@dataclass(eq=False)
class Request:
    ids: list[int]
    emit: Callable[..., None]
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_at_eos: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)
    # the scheduler's
    stats: RequestStats = field(default_factory=RequestStats)
    slot: object = None
    pos: int = 0                   # prompt tokens in the slot so far
    next_token: int | None = None  # sampled, to be fed at the next decode step
    submitted: float = 0.0
    started: float = 0.0
    first: float = 0.0


class Scheduler:
    """Runs requests on a SlotEngine (or anything with its slots / prefill_many / decode) in a
    thread of its own. tokenizer: stream_decoder() and is_eog(token)."""

    def __init__(self, engine, tokenizer, *, max_queue: int = 256, prefill_chunk: int = 256,
                 prefix_cache: bool = True):
        self.engine, self.tokenizer = engine, tokenizer
        self.max_queue = max_queue
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.active: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hybrid-scheduler", daemon=True)
        # counters (read by /metrics and /health; written by the scheduler thread)
        self.counts = collections.Counter()
        self.ttft_buckets = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.steps = 0
        self.max_batch = 0
        # seconds the scheduler thread spent per part of its work: prefill and decode
        # forwards, sampling, text (detokenize, stop strings, handing pieces to the clients)
        self.busy_s = dict.fromkeys(("prefill", "decode", "sample", "text"), 0.0)
        self._recent: collections.deque = collections.deque()   # (time, tokens) of recent steps

    @property
    def n_slots(self) -> int:
        return len(self.engine.slots)

    # -- the client side (any thread) ----------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull when max_queue wait already; RuntimeError when stopping."""
        ctx = self.engine.ctx
        if not req.ids:
            raise ValueError("the prompt is empty")
        if len(req.ids) >= ctx:
            raise ValueError(f"the prompt has {len(req.ids)} tokens; a slot holds {ctx}")
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting")
            req.submitted = time.perf_counter()
            req.stats.prompt_tokens = len(req.ids)
            self.waiting.append(req)
            self.counts["requests"] += 1
            self._cond.notify()

    def wake(self) -> None:
        """Look at the requests again (one was cancelled)."""
        with self._cond:
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every request and end the thread."""
        with self._cond:
            self._stopping = True
            for r in list(self.waiting) + list(self.active):
                r.cancel.set()
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def tokens_per_s(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds."""
        now = time.perf_counter()
        while True:
            try:
                recent = list(self._recent)     # the scheduler thread appends meanwhile
                break
            except RuntimeError:
                continue
        return sum(n for t, n in recent if t >= now - window) / window

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy_slots(self) -> int:
        return len(self.active)

    # -- the scheduler thread ----------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread("hybrid-engine")
        while True:
            with self._cond:
                self._drop_cancelled()
                if self._stopping and not self.active and not self.waiting:
                    return
                self._admit()
                if not self.active:
                    self._cond.wait(timeout=1.0)
                    continue
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed step must not stop the server
                log.exception("engine step failed")
                for r in list(self.active):
                    self._finish(r, error=f"generation failed: {e}")

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.waiting if r.cancel.is_set()]:
            self.waiting.remove(r)
            r.stats.finish_reason = "cancelled"
            self.counts["cancelled"] += 1
            r.emit("done", r.stats)
        for r in [r for r in self.active if r.cancel.is_set()]:
            self._finish(r, reason="cancelled")

    def _admit(self) -> None:
        free = [s for s in self.engine.slots if not any(r.slot is s for r in self.active)]
        while free and self.waiting:
            r = self.waiting.popleft()
            # the prompt's last token is always run: its logits give the first token
            if self.prefix_cache:
                slot = max(free, key=lambda s: (s.common_prefix(r.ids[:-1]), -s.last_used))
                common = slot.common_prefix(r.ids[:-1])
            else:
                slot = min(free, key=lambda s: s.last_used)
                common = 0
            free.remove(slot)
            slot.truncate(common)
            slot.last_used = time.perf_counter()
            r.slot, r.pos = slot, common
            r.stats.cached_tokens = common
            r.started = time.perf_counter()
            r.stats.queued_s = r.started - r.submitted
            r.sampler = Sampler(r.sampling)
            r.history = list(r.ids)
            r.text = TextStream(self.tokenizer.stream_decoder(), r.stop)
            self.counts["prompt_tokens"] += len(r.ids)
            self.counts["cached_tokens"] += common
            self.active.append(r)

    def _step(self) -> None:
        eng = self.engine
        # up to prefill_chunk prompt tokens a step, oldest request first: several short
        # prompts start together, a long one goes a chunk at a time between decode steps
        budget = self.prefill_chunk
        batch, chunks = [], []
        for r in [r for r in self.active if r.next_token is None]:
            if budget <= 0:
                break
            chunk = r.ids[r.pos:r.pos + budget]
            budget -= len(chunk)
            batch.append(r)
            chunks.append(chunk)
        if batch:
            # the chunks of every new prompt in one forward: the experts are read once for all
            t0 = time.perf_counter()
            logits = eng.prefill_many([r.slot for r in batch], chunks)
            dt = time.perf_counter() - t0
            self.busy_s["prefill"] += dt
            for i, (r, chunk) in enumerate(zip(batch, chunks)):
                r.stats.prefill_s += dt
                r.pos += len(chunk)
                self.counts["prefill_tokens"] += len(chunk)
                if r.pos == len(r.ids):
                    r.first = time.perf_counter()
                    self._observe_ttft(r.first - r.submitted)
                    self._take(r, logits[i])
        decoding = [r for r in self.active if r.next_token is not None]
        if decoding:
            t0 = time.perf_counter()
            logits = eng.decode([r.slot for r in decoding], [r.next_token for r in decoding])
            self.busy_s["decode"] += time.perf_counter() - t0
            self.steps += 1
            self.max_batch = max(self.max_batch, len(decoding))
            for i, r in enumerate(decoding):
                self._take(r, logits[i])

    def _take(self, r: Request, logits: torch.Tensor) -> None:
        """Sample r's next token from its logits, emit its text, finish it or queue the token."""
        t0 = time.perf_counter()
        tok = r.sampler(logits, r.history)
        now = time.perf_counter()
        self.busy_s["sample"] += now - t0
        r.history.append(tok)
        r.stats.completion_tokens += 1
        self.counts["generated_tokens"] += 1
        self._recent.append((now, 1))
        while self._recent and self._recent[0][0] < now - 60:
            self._recent.popleft()
        try:
            self._text(r, tok)
        finally:
            self.busy_s["text"] += time.perf_counter() - now

    def _text(self, r: Request, tok: int) -> None:
        """Emit tok's text; finish r (end of text, stop string, max tokens) or queue tok."""
        if r.stop_at_eos and self.tokenizer.is_eog(tok):
            return self._finish(r, reason="stop")
        piece, stopped = r.text.push(tok)
        if piece:
            r.emit("text", piece)
        if stopped:
            return self._finish(r, reason="stop")
        if r.stats.completion_tokens >= r.max_tokens or r.slot.cache.length >= self.engine.ctx:
            tail = r.text.flush()
            if tail:
                r.emit("text", tail)
            return self._finish(r, reason="length")
        r.next_token = tok

    def _finish(self, r: Request, reason: str = "", error: str | None = None) -> None:
        if r in self.active:
            self.active.remove(r)
        r.slot.last_used = time.perf_counter()
        if r.first:
            r.stats.decode_s = time.perf_counter() - r.first
            r.stats.ttft_s = r.first - r.submitted
        r.stats.finish_reason = reason or "error"
        self.counts[reason or "errors"] += 1
        if error is not None:
            r.emit("error", error)
        else:
            r.emit("done", r.stats)

    def _observe_ttft(self, s: float) -> None:
        i = next((k for k, b in enumerate(TTFT_BUCKETS) if s <= b), len(TTFT_BUCKETS))
        self.ttft_buckets[i] += 1
        self.ttft_sum += s
