"""The one thread that owns the model: admission, prefill, batched decode, stop and cancel.

Requests join the running batch at step boundaries (continuous batching): their prompts are
prefilled together, then they decode in the same forward pass as everyone else until they
finish, are cancelled or pass their deadline, and leave the batch that very step.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from qwen_grpc.engine.admission import FairQueue
from qwen_grpc.engine.errors import (
    CancelledError,
    DeadlineExceededError,
    EngineError,
    GenerationFailedError,
    InvalidRequestError,
    OverloadedError,
    UnavailableError,
)
from qwen_grpc.engine.estimate import FirstTokenEstimator, Work
from qwen_grpc.engine.kv_cache import BatchKVCache
from qwen_grpc.engine.memory import release_free_memory
from qwen_grpc.engine.model import LoadedModel
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.sampling import TokenSampler
from qwen_grpc.engine.text import IncrementalDetokenizer, StopSequenceMatcher
from qwen_grpc.engine.types import (
    Completed,
    Event,
    FinishReason,
    GenerationRequest,
    TextDelta,
    Usage,
)

_LOGGER = logging.getLogger(__name__)
_RETRY_AFTER_SECONDS = 1.0


class StepObserver(Protocol):
    """Told about every forward pass, e.g. to export batch size and step time as metrics."""

    def on_step(self, kind: str, batch_size: int, tokens: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class SchedulerLimits:
    """How much work the engine takes on at once."""

    max_batch_size: int = 8
    max_queue: int = 64
    max_queue_per_client: int = 48
    """Queued requests of one client (:attr:`GenerationRequest.client`), so that a heavy
    caller cannot fill the whole queue and refuse everybody else."""
    kv_cache_tokens: int = 16384
    """KV slots the batch may hold. The cache pads every row to the widest one, so a batch
    costs rows x the widest row's prompt + max_new_tokens, not the sum of its rows."""
    max_prefill_tokens: int = 4096
    """Rows times the longest prompt in one prefill pass. A prefill stalls every running
    stream, and one of 16k fp32 tokens outlasts the watchdog; a longer prompt runs alone."""


class RequestHandle:
    """The caller's side of one generation: an event stream and a way to stop it."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.queue_position: int | None = None
        """1-based place in serving order when the request had to queue; ``None`` when a
        batch slot was free for it."""
        self._events: queue.SimpleQueue[Event | EngineError] = queue.SimpleQueue()
        self.cancelled = False
        self._done = False

    def cancel(self) -> None:
        """Asks the engine to drop the sequence at its next step boundary."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        """An answer that ends the call (completion or error) has been put."""
        return self._done

    def put(self, item: Event | EngineError) -> None:
        if isinstance(item, Completed | EngineError):
            self._done = True
        self._events.put(item)

    def __iter__(self) -> Iterator[Event]:
        """Yields deltas then one :class:`Completed`; raises the engine's error instead."""
        while True:
            item = self._events.get()
            if isinstance(item, EngineError):
                raise item
            yield item
            if isinstance(item, Completed):
                return


@dataclass
class _Sequence:
    """Engine-thread state of one request."""

    request: GenerationRequest
    handle: RequestHandle
    sampler: TokenSampler
    detokenizer: IncrementalDetokenizer
    stops: StopSequenceMatcher
    max_new_tokens: int
    length_reason: FinishReason
    generated: int = 0
    last_token: int = 0
    finished: bool = field(default=False)

    @property
    def reserved_tokens(self) -> int:
        return len(self.request.prompt_ids) + self.max_new_tokens

    def dropped_reason(self, now: float) -> EngineError | None:
        if self.handle.cancelled:
            return CancelledError("the client cancelled the call")
        if self.request.deadline is not None and now >= self.request.deadline:
            return DeadlineExceededError("the deadline passed during generation")
        return None


class Engine:
    """Owns the model thread; every other thread talks to it through :meth:`submit`."""

    def __init__(
        self,
        model: LoadedModel,
        limits: SchedulerLimits,
        tokenizer: SharedTokenizer,
        observer: StepObserver | None = None,
    ) -> None:
        self.model = model
        self.observer = observer
        self.limits = limits
        self.tokenizer = tokenizer
        self._cond = threading.Condition()
        self._pending: FairQueue[_Sequence] = FairQueue(lambda seq: seq.request.client)
        self._estimator = FirstTokenEstimator()
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Sequence] = []
        self._joining: list[_Sequence] = []
        self._cache: BatchKVCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)
        self.last_progress = time.monotonic()
        # Every handle that may still need an answer, under a lock of its own that nobody
        # holds across work: the watchdog answers them when the engine thread is stuck, and
        # a stuck thread may be holding ``_cond``.
        self._handles_lock = threading.Lock()
        self._handles: weakref.WeakSet[RequestHandle] = weakref.WeakSet()

    # -- caller side -------------------------------------------------------------------------

    def start(self) -> None:
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="qwen-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_sequences(self) -> int:
        return len(self._rows)

    @property
    def queued_requests(self) -> int:
        return len(self._pending)

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queues a request; raises at once if the engine cannot take it.

        That includes a request whose deadline passes before its estimated first token
        (:class:`DeadlineExceededError`): waiting would only fail it later.
        """
        handle = RequestHandle(request.request_id)
        context_room = self.model.context_length - len(request.prompt_ids)
        max_new = min(request.params.max_new_tokens, context_room)
        sequence = _Sequence(
            request=request,
            handle=handle,
            sampler=TokenSampler(request.params, request.prompt_ids, self.model.vocab_size),
            detokenizer=IncrementalDetokenizer(self.tokenizer),
            stops=StopSequenceMatcher(request.params.stop),
            max_new_tokens=max_new,
            length_reason=(
                FinishReason.LENGTH
                if max_new == request.params.max_new_tokens
                else FinishReason.CONTEXT_LENGTH
            ),
        )
        if sequence.reserved_tokens > self.limits.kv_cache_tokens:
            raise InvalidRequestError(
                "options.max_new_tokens",
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_new_tokens "
                f"({max_new}) exceed the KV-cache budget of {self.limits.kv_cache_tokens} tokens",
            )
        with self._cond:
            if not self._accepting or not self.alive:
                raise UnavailableError("the engine is not accepting requests")
            if len(self._pending) >= self.limits.max_queue:
                raise OverloadedError(
                    f"the queue is full ({self.limits.max_queue} waiting)", _RETRY_AFTER_SECONDS
                )
            if self._pending.waiting(request.client) >= self.limits.max_queue_per_client:
                raise OverloadedError(
                    f"this client's queue is full ({self.limits.max_queue_per_client} waiting, "
                    "the most one client may queue)",
                    _RETRY_AFTER_SECONDS,
                )
            handle.queue_position = self._queue_position(sequence)
            if not self.has_work:
                self.last_progress = time.monotonic()
            self._pending.push(sequence)
            self._cond.notify()
        with self._handles_lock:
            self._handles.add(handle)
        return handle

    def _queue_position(self, sequence: _Sequence) -> int | None:
        """Where ``sequence`` waits in serving order, or ``None`` when a batch slot is free for
        it at the next step boundary (a burst of requests arrives before the engine thread has
        taken the first: they are not queued behind one another).

        Raises :class:`DeadlineExceededError` when its deadline falls before its estimated
        first token. A request that can start at once is always tried. Called under the lock.
        """
        request = sequence.request
        ahead = self._pending.ahead_of_new(request.client)
        # The engine thread changes these lists outside the lock: what is read here may be a
        # step old, and a joiner is in both while it merges, hence the dictionary.
        running = {id(seq): seq for seq in (*self._rows, *self._joining) if not seq.finished}
        if len(running) + len(ahead) < self.limits.max_batch_size:
            return None
        if request.deadline is not None:
            estimate = self._estimator.seconds_to_first_token(
                [_work(seq) for seq in running.values()],
                [_work(seq) for seq in ahead],
                len(request.prompt_ids),
                self.limits.max_batch_size,
            )
            left = request.deadline - time.monotonic()
            if estimate is not None and estimate > left:
                raise DeadlineExceededError(
                    f"the first token is estimated in {estimate:.1f} s ({len(running)} running, "
                    f"{len(ahead)} queued ahead), after the deadline in {left:.1f} s"
                )
        return len(ahead) + 1

    @property
    def has_work(self) -> bool:
        """Requests wait, decode, or are being prefilled (off the queue, not yet in the batch)."""
        return bool(self._pending or self._rows or self._joining)

    def abandon(self, error: EngineError) -> None:
        """Fails every queued and running request and refuses new ones.

        Called from the watchdog when the engine thread is stuck or dead: callers get an
        answer instead of hanging on a thread that will never serve them. It takes no lock the
        engine thread holds, so a thread stuck anywhere cannot make it hang too.
        """
        self._accepting = False
        with self._handles_lock:
            handles = list(self._handles)
        for handle in handles:
            if not handle.done:
                handle.cancel()
                handle.put(error)

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the thread; whatever is still queued or running fails as UNAVAILABLE."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- engine thread -----------------------------------------------------------------------

    def _mark_progress(self) -> None:
        """Called after every layer of a forward pass: a long prefill is slow, not stuck."""
        self.last_progress = time.monotonic()

    def _run(self) -> None:
        try:
            while True:
                joiners = self._wait_for_work()
                if joiners is None:
                    break
                self.last_progress = time.monotonic()
                if joiners:
                    self._joining = joiners
                    self._guarded(joiners, functools.partial(self._prefill, joiners), False)
                    self._joining = []
                if self._rows:
                    self._guarded(list(self._rows), self._decode_step, True)
        except BaseException:
            _LOGGER.exception("the engine thread died")
        finally:
            self.abandon(UnavailableError("the engine stopped"))
            with self._cond:
                self._pending.clear()
            self._reset_batch()

    def _wait_for_work(self) -> list[_Sequence] | None:
        """Blocks until there is something to do; ``None`` means stop.

        The lock guards the queue and flags only: rows leave the batch (a cache copy and a
        trim) outside it, so ``submit`` never waits on the model's memory.
        """
        with self._cond:
            while not self._stopping and not self._pending and not self._rows:
                self._cond.wait()
            if self._stopping:
                return None
        now = time.monotonic()
        self._drop_rows_that_left(now)
        with self._cond:
            self._drop_pending_that_left(now)
            return self._admit()

    def _drop_pending_that_left(self, now: float) -> None:
        """Frees queue places of requests cancelled or expired while they waited."""

        def answered(seq: _Sequence) -> bool:
            reason = seq.dropped_reason(now)
            if reason is not None:
                seq.handle.put(reason)
            return reason is not None

        self._pending.remove(answered)

    def _admit(self) -> list[_Sequence]:
        """Takes queued requests in turn (clients take turns, see :class:`FairQueue`) while
        batch slots, the KV budget and the prefill budget allow; the rest join at a later step
        boundary.

        The KV budget counts what the padded layout allocates: every row as wide as the widest
        row will grow (its prompt plus max_new_tokens). One long prompt among short streams
        therefore waits for room instead of widening every row to its length.
        """
        rows = len(self._rows)
        widest_row = max((seq.reserved_tokens for seq in self._rows), default=0)
        admitted: list[_Sequence] = []
        longest = 0
        while self._pending and rows + len(admitted) < self.limits.max_batch_size:
            candidate = self._pending.peek()
            widest = max(widest_row, candidate.reserved_tokens)
            if widest * (rows + len(admitted) + 1) > self.limits.kv_cache_tokens:
                break
            prompt_width = max(longest, len(candidate.request.prompt_ids))
            if admitted and prompt_width * (len(admitted) + 1) > self.limits.max_prefill_tokens:
                break
            self._pending.pop()
            widest_row, longest = widest, prompt_width
            admitted.append(candidate)
        return admitted

    def _guarded(
        self, affected: list[_Sequence], step: Callable[[], None], batch_at_risk: bool
    ) -> None:
        """Runs a step; a failure fails only the sequences in it.

        A failed decode step leaves the batch's cache half-written, so the batch goes with it
        (``batch_at_risk``); a failed prefill has touched only the joiners' own cache, and the
        running batch carries on.
        """
        try:
            step()
        except Exception:
            _LOGGER.exception(
                "generation failed for requests %s",
                ", ".join(seq.request.request_id for seq in affected),
            )
            for seq in affected:
                if not seq.finished:
                    seq.finished = True
                    seq.handle.put(_failure(seq))
            if batch_at_risk:
                self._reset_batch()

    def _observe(self, kind: str, batch_size: int, tokens: int, started: float) -> float:
        """Reports a step to the observer; returns its seconds."""
        seconds = time.perf_counter() - started
        if self.observer is not None:
            self.observer.on_step(kind, batch_size, tokens, seconds)
        return seconds

    def _prefill(self, joiners: list[_Sequence]) -> None:
        started = time.perf_counter()
        prompts = [list(seq.request.prompt_ids) for seq in joiners]
        logits, cache, mask = self.model.prefill(prompts, self._mark_progress)
        tokens = sum(len(p) for p in prompts)
        seconds = self._observe("prefill", len(joiners), tokens, started)
        self._estimator.on_prefill(tokens, seconds)
        for row, seq in enumerate(joiners):
            self._accept_token_isolated(seq, logits[row])
        survivors = [row for row, seq in enumerate(joiners) if not seq.finished]
        if not survivors:
            return
        kept = [joiners[row] for row in survivors]
        if len(survivors) < len(joiners):
            drop_left = _shared_left_padding(mask[survivors])
            cache.select_rows(survivors, drop_left)
            mask = mask[survivors, drop_left:]
        positions = torch.tensor([len(seq.request.prompt_ids) for seq in kept], dtype=torch.long)
        self._guarded(
            self._rows + kept, functools.partial(self._merge, kept, cache, mask, positions), True
        )

    def _merge(
        self,
        kept: list[_Sequence],
        cache: BatchKVCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Adds prefilled sequences to the running batch (both caches, masks and positions)."""
        if self._cache is None:
            self._cache, self._mask, self._positions = cache, mask, positions
        else:
            self._cache.append_rows(cache)
            width = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_left_pad_mask(self._mask, width), _left_pad_mask(mask, width)])
            self._positions = torch.cat([self._positions, positions])
        self._rows.extend(kept)

    def _decode_step(self) -> None:
        assert self._cache is not None
        started = time.perf_counter()
        tokens = torch.tensor([seq.last_token for seq in self._rows], dtype=torch.long)
        self._mask = torch.cat(
            [self._mask, torch.ones((len(self._rows), 1), dtype=torch.long)], dim=1
        )
        logits = self.model.decode(
            tokens, self._cache, self._mask, self._positions, self._mark_progress
        )
        seconds = self._observe("decode", len(self._rows), len(self._rows), started)
        self._estimator.on_decode_step(seconds)
        self._positions += 1
        for row, seq in enumerate(self._rows):
            self._accept_token_isolated(seq, logits[row])
        self.last_progress = time.monotonic()
        self._drop_rows_that_left(time.monotonic())

    def _accept_token_isolated(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """A failure in one sequence's sampling or text handling ends that sequence only."""
        try:
            self._accept_token(seq, logits)
        except Exception:
            _LOGGER.exception("generation failed for request %s", seq.request.request_id)
            seq.finished = True
            seq.handle.put(_failure(seq))

    def _accept_token(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Samples, emits text, and decides whether the sequence is done."""
        token = seq.sampler.sample(logits)
        seq.generated += 1
        seq.last_token = token
        if token in self.model.stop_token_ids:
            self._finish(seq, FinishReason.STOP)
            return
        text, stopped = seq.stops.feed(seq.detokenizer.push(token))
        if text:
            seq.handle.put(TextDelta(text))
        if stopped:
            self._finish(seq, FinishReason.STOP_SEQUENCE, flush=False)
        elif seq.generated >= seq.max_new_tokens:
            self._finish(seq, seq.length_reason)

    def _finish(self, seq: _Sequence, reason: FinishReason, flush: bool = True) -> None:
        if flush:
            text, _ = seq.stops.feed(seq.detokenizer.flush())
            text += seq.stops.flush()
            if text:
                seq.handle.put(TextDelta(text))
        seq.finished = True
        self._estimator.on_finished(seq.generated)
        usage = Usage(prompt_tokens=len(seq.request.prompt_ids), completion_tokens=seq.generated)
        seq.handle.put(Completed(reason, usage))

    def _drop_rows_that_left(self, now: float) -> None:
        """Removes finished, cancelled and expired rows from the batch and its cache."""
        keep: list[int] = []
        for row, seq in enumerate(self._rows):
            reason = None if seq.finished else seq.dropped_reason(now)
            if reason is not None:
                seq.handle.put(reason)
            elif not seq.finished:
                keep.append(row)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset_batch()
            return
        assert self._cache is not None
        drop_left = _shared_left_padding(self._mask[keep])
        self._cache.select_rows(keep, drop_left)
        self._mask = self._mask[keep, drop_left:]
        self._positions = self._positions[keep]
        self._rows = [self._rows[row] for row in keep]

    def _reset_batch(self) -> None:
        self._rows = []
        self._cache = None
        self._mask = torch.zeros((0, 0), dtype=torch.long)
        self._positions = torch.zeros(0, dtype=torch.long)
        release_free_memory()


def _work(seq: _Sequence) -> Work:
    return Work(len(seq.request.prompt_ids), seq.max_new_tokens, seq.generated)


def _failure(seq: _Sequence) -> GenerationFailedError:
    return GenerationFailedError(f"generation failed (request id {seq.request.request_id})")


def _shared_left_padding(mask: torch.Tensor) -> int:
    """Leading columns that are padding in every row (rows are right-aligned)."""
    return int(mask.shape[1] - mask.sum(dim=1).max())


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))
