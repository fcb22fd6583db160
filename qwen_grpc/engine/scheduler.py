"""The one thread that owns the model: admission, prefill, batched decode, stop and cancel.

Requests join the running batch at step boundaries (continuous batching). Every step is one
forward pass over the running sequences' next tokens and, beside them, chunks of the prompts
being prefilled (chunked prefill), so a long prompt joining costs each running stream a slightly
longer step instead of a stall of its whole prefill. A sequence leaves the batch the step it
finishes, is cancelled or passes its deadline; the paged KV cache makes joins and leaves copy
nothing.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator
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
from qwen_grpc.engine.kv_cache import KVRow
from qwen_grpc.engine.model import LoadedModel
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.prompt_budget import PromptBudget
from qwen_grpc.engine.sampling import TokenSampler
from qwen_grpc.engine.step_plan import Segment, plan_step
from qwen_grpc.engine.text import IncrementalDetokenizer, StopSequenceMatcher
from qwen_grpc.engine.types import (
    Completed,
    Event,
    FinishReason,
    GenerationRequest,
    TextDelta,
    Timings,
    Usage,
)

_LOGGER = logging.getLogger(__name__)
_RETRY_AFTER_SECONDS = 1.0
SWITCH_INTERVAL_S = 0.0002
"""How long another Python thread may keep the GIL once the engine thread asks for it.

The engine thread gives the GIL up inside every torch operator (about a thousand a decode step)
and must win it back after each; with CPython's default of 5 ms, a gRPC handler or grpc's
polling thread that took it meanwhile kept the engine waiting. Measured through the real server
on an AMD EPYC (Zen 3, 2 cores), q8: a single stream's decode step went from 36.3 to 29.9 ms
(26.3 to 33.1 tok/s) at 0.2 ms, with no gain from going lower (0.05 ms: 31.0 ms)."""


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
    """KV slots the batch may hold: each row reserves its prompt plus max_new_tokens (rounded up
    to whole cache blocks) when it joins."""
    max_prefill_tokens: int = 4096
    """Prompt tokens in one forward pass while no sequence is decoding; longer prompts prefill
    in several passes."""
    prefill_chunk_tokens: int = 16
    """Fewest prompt tokens a forward pass takes beside running sequences' decode tokens, and
    the first chunk before any pass has been timed."""
    prefill_step_factor: float = 2.5
    """How long a forward pass with prompt chunks beside decode tokens may take, in decode
    steps: the bound on every running stream's gap while a prompt joins. Chunks grow and shrink
    to meet it (:mod:`qwen_grpc.engine.prompt_budget`); 0 keeps them at
    ``prefill_chunk_tokens``."""


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
        self.timings = Timings(submitted=time.monotonic())
        """When the request queued, was admitted, had its first token and ended."""

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
            if self.timings.finished is None:
                self.timings.finished = time.monotonic()
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
    row: KVRow | None = None
    prefilled: int = 0
    """Prompt tokens already in the cache; the sequence decodes once all of them are."""

    @property
    def reserved_tokens(self) -> int:
        return len(self.request.prompt_ids) + self.max_new_tokens

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.request.prompt_ids)

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
        self._chunk_budget = PromptBudget(
            limits.prefill_chunk_tokens, limits.max_prefill_tokens, limits.prefill_step_factor
        )
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._rows: list[_Sequence] = []
        """Admitted sequences, prefilling or decoding, oldest first."""
        self._cache = model.new_cache(limits.kv_cache_tokens)
        self.last_progress = time.monotonic()
        # Every handle that may still need an answer, under a lock of its own that nobody
        # holds across work: the watchdog answers them when the engine thread is stuck, and
        # a stuck thread may be holding ``_cond``.
        self._handles_lock = threading.Lock()
        self._handles: weakref.WeakSet[RequestHandle] = weakref.WeakSet()

    # -- caller side -------------------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread; shortens the process's GIL switch interval (see
        :data:`SWITCH_INTERVAL_S`) unless it is already shorter."""
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
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
        # The engine thread changes the batch outside the lock: what is read here may be a
        # step old.
        running = [seq for seq in self._rows if not seq.finished]
        if len(running) + len(ahead) < self.limits.max_batch_size:
            return None
        if request.deadline is not None:
            estimate = self._estimator.seconds_to_first_token(
                [_work(seq) for seq in running],
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
        """Requests wait, or are admitted (prefilling or decoding)."""
        return bool(self._pending or self._rows)

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
            while self._wait_for_work():
                self.last_progress = time.monotonic()
                if self._rows:
                    self._step()
        except BaseException:
            _LOGGER.exception("the engine thread died")
        finally:
            self.abandon(UnavailableError("the engine stopped"))
            with self._cond:
                self._pending.clear()
            self._drop_all_rows()

    def _wait_for_work(self) -> bool:
        """Blocks until there is something to do and admits what fits; False means stop.

        The lock guards the queue and flags only: rows leave the batch outside it, so
        ``submit`` never waits on the model's memory.
        """
        with self._cond:
            while not self._stopping and not self._pending and not self._rows:
                self._cond.wait()
            if self._stopping:
                return False
        now = time.monotonic()
        self._drop_rows_that_left(now)
        with self._cond:
            self._drop_pending_that_left(now)
            self._admit()
        return True

    def _drop_pending_that_left(self, now: float) -> None:
        """Frees queue places of requests cancelled or expired while they waited."""

        def answered(seq: _Sequence) -> bool:
            reason = seq.dropped_reason(now)
            if reason is not None:
                seq.handle.put(reason)
            return reason is not None

        self._pending.remove(answered)

    def _admit(self) -> None:
        """Takes queued requests in turn (clients take turns, see :class:`FairQueue`) while
        batch slots and the KV budget allow; the rest join at a later step boundary.

        Each row reserves its prompt plus max_new_tokens in cache blocks, real tokens with no
        padding, so a running sequence never finds the cache full.
        """
        while self._pending and len(self._rows) < self.limits.max_batch_size:
            candidate = self._pending.peek()
            if not self._cache.can_reserve(candidate.reserved_tokens):
                break
            self._pending.pop()
            candidate.row = self._cache.open_row(candidate.reserved_tokens)
            candidate.handle.timings.admitted = time.monotonic()
            self._rows.append(candidate)

    def _step(self) -> None:
        """One forward pass: every decoding row's next token and the prompt chunks that fit.

        A failed pass leaves every row's cache as it was (lengths move only on success). If
        prompt chunks were in it, the sequences being prefilled fail and the running ones carry
        on: a new prompt is the likelier culprit, and if it was not, the next pass shows it. A
        pass of decode tokens alone that fails takes its rows with it.
        """
        decoding = [seq for seq in self._rows if seq.decoding]
        chunks = self._prompt_chunks(self._prompt_budget())
        segments = [Segment.next_token(_row(seq), [seq.last_token]) for seq in decoding]
        segments += [segment for _, segment in chunks]
        started = time.perf_counter()
        try:
            plan = plan_step(self._cache, segments)
            logits = self.model.step(plan, self._cache, self._mark_progress)
        except Exception:
            affected = [seq for seq, _ in chunks] or decoding
            _LOGGER.exception(
                "generation failed for requests %s",
                ", ".join(seq.request.request_id for seq in affected),
            )
            for seq in affected:
                seq.finished = True
                seq.handle.put(_failure(seq))
            self._drop_rows_that_left(time.monotonic())
            return
        plan.commit()
        prompt_tokens = sum(len(segment.tokens) for _, segment in chunks)
        self._observe_step(len(decoding), prompt_tokens, started)
        answering = decoding + [seq for seq, segment in chunks if _completes(seq, segment)]
        for seq, segment in chunks:
            seq.prefilled += len(segment.tokens)
        for row, seq in enumerate(answering):
            self._accept_token_isolated(seq, logits[row])
        self.last_progress = time.monotonic()
        self._drop_rows_that_left(time.monotonic())

    def _prompt_budget(self) -> int:
        """Prompt tokens the next pass may take: a chunk beside decoding rows, else a prefill."""
        if any(seq.decoding for seq in self._rows):
            return self._chunk_budget.tokens
        return self.limits.max_prefill_tokens

    def _prompt_chunks(self, budget: int) -> list[tuple[_Sequence, Segment]]:
        """The next pieces of the prompts being prefilled, ``budget`` tokens at most.

        Clients share the budget equally, and a client's share goes to its prompts oldest
        first; what a client cannot use goes to the others. So one client's backlog of prompts
        does not hold back another client's prompt, as the queue's turns do not either.
        """
        waiting: dict[str, list[_Sequence]] = {}
        for seq in self._rows:
            if not seq.decoding:
                waiting.setdefault(seq.request.client, []).append(seq)
        taken: dict[int, int] = {}
        left = budget
        while left > 0 and waiting:
            share = max(1, left // len(waiting))
            for client in list(waiting):
                left -= self._spend(share, waiting[client], taken)
                if not waiting[client]:
                    del waiting[client]
        chunks: list[tuple[_Sequence, Segment]] = []
        for seq in self._rows:
            count = taken.get(id(seq), 0)
            if count == 0:
                continue
            prompt = seq.request.prompt_ids
            piece = prompt[seq.prefilled : seq.prefilled + count]
            done = seq.prefilled + count == len(prompt)
            segment = Segment.next_token if done else Segment.inner
            chunks.append((seq, segment(_row(seq), piece)))
        return chunks

    @staticmethod
    def _spend(allowance: int, prompts: list[_Sequence], taken: dict[int, int]) -> int:
        """Gives ``prompts`` (oldest first) up to ``allowance`` tokens, recording them in
        ``taken``; drops prompts that are then whole; returns how many it gave."""
        spent = 0
        while prompts and spent < allowance:
            seq = prompts[0]
            remaining = len(seq.request.prompt_ids) - seq.prefilled - taken.get(id(seq), 0)
            count = min(remaining, allowance - spent)
            taken[id(seq)] = taken.get(id(seq), 0) + count
            spent += count
            if count < remaining:
                break
            prompts.pop(0)
        return spent

    def _observe_step(self, decode_rows: int, prompt_tokens: int, started: float) -> None:
        """Reports the pass as a decode step, a prefill, or both (one pass did both), to the
        observer and to the first-token estimate."""
        seconds = time.perf_counter() - started
        if decode_rows:
            self._estimator.on_decode_step(seconds)
            self._chunk_budget.on_step(prompt_tokens, seconds)
        if prompt_tokens:
            self._estimator.on_prefill(prompt_tokens, seconds)
        if self.observer is None:
            return
        if decode_rows:
            self.observer.on_step("decode", decode_rows, decode_rows, seconds)
        if prompt_tokens:
            self.observer.on_step("prefill", 1, prompt_tokens, seconds)

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
        if seq.generated == 0:
            seq.handle.timings.first_token = time.monotonic()
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
        """Removes finished, cancelled and expired rows; their cache blocks go back to the pool."""
        keep: list[_Sequence] = []
        for seq in self._rows:
            reason = None if seq.finished else seq.dropped_reason(now)
            if reason is not None:
                seq.handle.put(reason)
            if seq.finished or reason is not None:
                self._cache.close_row(_row(seq))
            else:
                keep.append(seq)
        self._rows = keep

    def _drop_all_rows(self) -> None:
        for seq in self._rows:
            self._cache.close_row(_row(seq))
        self._rows = []


def _work(seq: _Sequence) -> Work:
    return Work(len(seq.request.prompt_ids), seq.max_new_tokens, seq.generated)


def _row(seq: _Sequence) -> KVRow:
    assert seq.row is not None, "an admitted sequence has a cache row"
    return seq.row


def _completes(seq: _Sequence, segment: Segment) -> bool:
    """The chunk is the prompt's last: its pass yields the sequence's first token."""
    return seq.prefilled + len(segment.tokens) == len(seq.request.prompt_ids)


def _failure(seq: _Sequence) -> GenerationFailedError:
    return GenerationFailedError(f"generation failed (request id {seq.request.request_id})")
