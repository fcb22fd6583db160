"""The engine on its own: batching, detokenization and stop sequences, on the tiny model."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from harness.steps import StepGate
from qwen_grpc.engine import scheduler
from qwen_grpc.engine.decoder import Decoder, UnsupportedModelError
from qwen_grpc.engine.errors import DeadlineExceededError, GenerationFailedError, OverloadedError
from qwen_grpc.engine.model import LoadedModel, load_model
from qwen_grpc.engine.prompt import SharedTokenizer
from qwen_grpc.engine.sampling import TokenSampler
from qwen_grpc.engine.scheduler import Engine, RequestHandle, SchedulerLimits
from qwen_grpc.engine.text import IncrementalDetokenizer, StopSequenceMatcher
from qwen_grpc.engine.types import (
    ChatMessage,
    Completed,
    GenerationRequest,
    Role,
    SamplingParams,
    TextDelta,
)

PROMPTS = [
    "Hi",
    "请用中文介绍一下北京的历史和文化。越详细越好。",
    "Write a haiku about the sea 🌊",
    "What is 2 + 2? Explain step by step, in at least three sentences, please.",
]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, "float32", threads=0)


@pytest.fixture(scope="module")
def transformers_model(tiny_model_dir: Path) -> PreTrainedModel:
    """The reference: transformers' own float32 model, independent of the engine's decoder."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture
def engine(tiny_model: LoadedModel) -> Iterator[Engine]:
    running = Engine(
        tiny_model, SchedulerLimits(max_batch_size=8), SharedTokenizer(tiny_model.tokenizer)
    )
    running.start()
    yield running
    running.stop()


def encode(engine: Engine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode_chat([ChatMessage(Role.USER, text)]))


def reference_generate(
    reference: PreTrainedModel, model: LoadedModel, prompt: tuple[int, ...], max_new_tokens: int
) -> str:
    """transformers' own greedy generate for one request alone."""
    with torch.inference_mode():
        output = reference.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=sorted(model.stop_token_ids),
            pad_token_id=sorted(model.stop_token_ids)[0],
        )
    new = [t for t in output[0, len(prompt) :].tolist() if t not in model.stop_token_ids]
    return str(model.tokenizer.decode(new, skip_special_tokens=True))


def wait_until_idle(engine: Engine, within: float = 1.0) -> bool:
    deadline = time.monotonic() + within
    while engine.active_sequences and time.monotonic() < deadline:
        time.sleep(0.005)
    return engine.active_sequences == 0


def collect(handle: RequestHandle) -> tuple[str, Completed]:
    parts: list[str] = []
    for event in handle:
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("stream ended without Completed")


class DecodeBatchSizes:
    """Records the batch size of every decode step (a :class:`StepObserver`)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step(self, kind: str, batch_size: int, tokens: int, seconds: float) -> None:
        if kind == "decode":
            self.sizes.append(batch_size)


def test_batched_greedy_matches_generate_alone_whatever_joins_when(
    engine: Engine, tiny_model: LoadedModel, transformers_model: PreTrainedModel
) -> None:
    lengths = [40, 25, 60, 33]
    expected = [
        reference_generate(transformers_model, tiny_model, encode(engine, p), n)
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    batches = DecodeBatchSizes()
    engine.observer = batches
    handles = []
    with StepGate(engine) as gate:
        for index, (prompt, length) in enumerate(zip(PROMPTS, lengths, strict=True)):
            # Each request joins a batch that has decoded 5 more steps than the last one saw.
            assert gate.wait_for(lambda index=index: gate.decode_steps >= 5 * index)
            params = SamplingParams(max_new_tokens=length, greedy=True)
            handles.append(
                engine.submit(GenerationRequest(f"r{index}", encode(engine, prompt), params))
            )
        texts = [collect(h)[0] for h in handles]
    assert texts == expected
    assert batches.sizes[0] == 1 and max(batches.sizes) == 4, batches.sizes
    assert wait_until_idle(engine)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    prompt = encode(engine, PROMPTS[2])
    alone = collect(engine.submit(GenerationRequest("alone", prompt, params)))[0]
    noise = [
        engine.submit(
            GenerationRequest(
                f"n{i}", encode(engine, p), SamplingParams(max_new_tokens=30, temperature=1.0)
            )
        )
        for i, p in enumerate(PROMPTS)
    ]
    together = collect(engine.submit(GenerationRequest("together", prompt, params)))[0]
    for handle in noise:
        collect(handle)
    assert together == alone


def test_cancelled_sequences_leave_the_batch_within_a_step(engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=400, greedy=True)
    handles = [
        engine.submit(GenerationRequest(f"c{i}", encode(engine, PROMPTS[i % 4]), params))
        for i in range(6)
    ]
    for handle in handles:
        next(iter(handle))
    for handle in handles:
        handle.cancel()
    assert wait_until_idle(engine, within=1.0)
    _, done = collect(
        engine.submit(
            GenerationRequest(
                "after", encode(engine, "Hi"), SamplingParams(max_new_tokens=4, greedy=True)
            )
        )
    )
    assert done.usage.completion_tokens >= 1


def test_detokenizer_emits_whole_characters_only(tiny_model: LoadedModel) -> None:
    tokenizer = SharedTokenizer(tiny_model.tokenizer)
    text = "北京是中国的首都🎉🐍 and naïve café — 👩‍💻 done."
    ids = tiny_model.tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len([d for d in deltas if d]), "some characters span several tokens"


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "stopped"),
    [
        (["Hello wor", "ld, bye"], ("world",), "Hello ", True),
        (["ab", "c", "d"], ("cx",), "abcd", False),
        (["x<", "|", "end|>"], ("<|end|>",), "x", True),
        (["no stops here"], (), "no stops here", False),
    ],
)
def test_stop_matcher_never_emits_part_of_a_stop_sequence(
    pieces: list[str], stops: tuple[str, ...], emitted: str, stopped: bool
) -> None:
    matcher = StopSequenceMatcher(stops)
    out: list[str] = []
    hit = False
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(matcher.flush())
    assert "".join(out) == emitted
    assert hit is stopped


def test_engine_thread_is_the_only_thread_running_the_model(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    callers: set[str] = set()
    forward = Decoder.__call__

    def recording_forward(self: Decoder, *args: Any) -> torch.Tensor:
        callers.add(threading.current_thread().name)
        return forward(self, *args)

    monkeypatch.setattr(Decoder, "__call__", recording_forward)
    handles = [
        engine.submit(
            GenerationRequest(
                f"t{i}", encode(engine, p), SamplingParams(max_new_tokens=5, greedy=True)
            )
        )
        for i, p in enumerate(PROMPTS)
    ]
    for handle in handles:
        collect(handle)
    assert callers == {"qwen-engine"}


def test_cancelled_requests_free_their_queue_place_while_the_batch_is_full(
    tiny_model: LoadedModel,
) -> None:
    engine = Engine(
        tiny_model,
        SchedulerLimits(max_batch_size=1, max_queue=2),
        SharedTokenizer(tiny_model.tokenizer),
    )
    engine.start()
    try:
        prompt = encode(engine, "Hi")
        long = SamplingParams(max_new_tokens=1900, greedy=True)
        running = engine.submit(GenerationRequest("running", prompt, long))
        next(iter(running))
        queued = [engine.submit(GenerationRequest(f"q{i}", prompt, long)) for i in range(2)]
        with pytest.raises(OverloadedError):
            engine.submit(GenerationRequest("overflow", prompt, long))
        for handle in queued:
            handle.cancel()
        deadline = time.monotonic() + 2
        while engine.queued_requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.queued_requests == 0
        engine.submit(GenerationRequest("fits-again", prompt, long)).cancel()
        running.cancel()
    finally:
        engine.stop()


def test_a_light_clients_request_is_served_before_a_heavy_clients_backlog(
    tiny_model: LoadedModel,
) -> None:
    engine = Engine(
        tiny_model, SchedulerLimits(max_batch_size=1), SharedTokenizer(tiny_model.tokenizer)
    )
    engine.start()
    try:
        prompt = encode(engine, "Tell a long story")
        short = SamplingParams(max_new_tokens=8, greedy=True)

        def heavy(index: int) -> RequestHandle:
            return engine.submit(GenerationRequest(f"heavy-{index}", prompt, short, client="heavy"))

        with StepGate(engine) as gate:
            gate.hold()
            backlog = [heavy(0)]
            assert gate.held.wait(30), "the first request never started decoding"
            backlog += [heavy(index) for index in range(1, 7)]
            long = SamplingParams(max_new_tokens=1000, greedy=True)
            light = engine.submit(GenerationRequest("light", prompt, long, client="light"))
            gate.release()
            next(iter(light))
            # One batch slot: while the light request generates, nobody else can start.
            answered = [handle.done for handle in backlog]
            still_waiting = engine.queued_requests
            light.cancel()
            for handle in backlog:
                handle.cancel()
    finally:
        engine.stop()
    assert light.queue_position == 2
    assert [handle.queue_position for handle in backlog] == [None, 1, 2, 3, 4, 5, 6]
    # The heavy client's first two were served; its third waits behind the light request.
    assert answered == [True, True, False, False, False, False, False]
    assert still_waiting == 5


def test_a_request_that_can_start_at_once_is_never_refused_by_the_estimate(
    tiny_model: LoadedModel,
) -> None:
    engine = Engine(
        tiny_model, SchedulerLimits(max_batch_size=1), SharedTokenizer(tiny_model.tokenizer)
    )
    engine.start()
    try:
        prompt = encode(engine, "Tell a long story")
        long = SamplingParams(max_new_tokens=200, greedy=True)
        collect(engine.submit(GenerationRequest("measured", prompt, long)))

        def hurried() -> GenerationRequest:
            """Due sooner than any prefill could answer it."""
            return GenerationRequest("hurried", prompt, long, deadline=time.monotonic() + 0.001)

        with StepGate(engine) as gate:
            gate.hold()
            running = engine.submit(GenerationRequest("running", prompt, long))
            assert gate.held.wait(30), "the running request never started decoding"
            with pytest.raises(DeadlineExceededError, match="the first token is estimated in"):
                engine.submit(hurried())
            running.cancel()
            gate.release()
            gate.steps_until_idle()
        handle = engine.submit(hurried())
        assert handle.queue_position is None
        with pytest.raises(DeadlineExceededError, match="passed during generation"):
            collect(handle)
    finally:
        engine.stop()


def greedy_texts(engine: Engine, lengths: list[int], together: bool) -> list[str]:
    """Greedy answers to PROMPTS, submitted at once (joining one another) or one at a time."""
    handles: list[RequestHandle] = []
    texts: list[str] = []
    for index, (prompt, length) in enumerate(zip(PROMPTS, lengths, strict=True)):
        params = SamplingParams(max_new_tokens=length, greedy=True)
        handle = engine.submit(GenerationRequest(f"g{index}", encode(engine, prompt), params))
        if together:
            handles.append(handle)
        else:
            texts.append(collect(handle)[0])
    return texts + [collect(handle)[0] for handle in handles]


def test_q8_greedy_output_is_the_same_batched_and_alone(tiny_model_dir: Path) -> None:
    model = load_model(tiny_model_dir, "q8", threads=0)
    engine = Engine(model, SchedulerLimits(), SharedTokenizer(model.tokenizer))
    engine.start()
    try:
        lengths = [40, 25, 60, 33]
        alone = greedy_texts(engine, lengths, together=False)
        assert greedy_texts(engine, lengths, together=True) == alone
    finally:
        engine.stop()


@pytest.mark.parametrize("dtype", ["bfloat16", "q8", "int8"])
def test_every_precision_mode_serves_the_tiny_model(tiny_model_dir: Path, dtype: str) -> None:
    model = load_model(tiny_model_dir, dtype, threads=0)
    engine = Engine(model, SchedulerLimits(), SharedTokenizer(model.tokenizer))
    engine.start()
    try:
        handles = [
            engine.submit(
                GenerationRequest(
                    f"{dtype}-{i}", encode(engine, p), SamplingParams(max_new_tokens=6, greedy=True)
                )
            )
            for i, p in enumerate(PROMPTS)
        ]
        finals = [collect(h)[1] for h in handles]
    finally:
        engine.stop()
    assert all(1 <= f.usage.completion_tokens <= 6 for f in finals)


@pytest.mark.parametrize("step_factor", [0.0, 2.5], ids=["fixed-chunks", "sized-chunks"])
def test_prompts_join_running_streams_in_chunks_and_answer_as_alone(
    tiny_model: LoadedModel, step_factor: float
) -> None:
    # Fixed chunks are the step budget exactly; chunks sized to the step bound vary with the
    # machine's timing, and the answers must not.
    chunk = 8
    prefills: list[int] = []
    recording = threading.Event()

    class Recorder:
        def on_step(self, kind: str, batch_size: int, tokens: int, seconds: float) -> None:
            if kind == "prefill" and recording.is_set():
                prefills.append(tokens)

    tokenizer = SharedTokenizer(tiny_model.tokenizer)
    prompts = [
        tuple(tokenizer.encode_chat([ChatMessage(Role.USER, text)]))
        for text in ("Tell me about the sea and every fish that swims in it.", "Hi.", "Why?")
    ]
    alone = Engine(tiny_model, SchedulerLimits(), tokenizer)
    alone.start()
    try:
        expected = [
            collect(alone.submit(GenerationRequest(f"a{i}", p, SamplingParams(8, greedy=True))))
            for i, p in enumerate(prompts)
        ]
    finally:
        alone.stop()
    engine = Engine(
        tiny_model,
        SchedulerLimits(prefill_chunk_tokens=chunk, prefill_step_factor=step_factor),
        tokenizer,
        observer=Recorder(),
    )
    engine.start()
    try:
        running = engine.submit(
            GenerationRequest("running", prompts[1], SamplingParams(400, greedy=True))
        )
        next(iter(running))
        recording.set()
        joiners = [
            engine.submit(GenerationRequest(f"j{i}", p, SamplingParams(8, greedy=True)))
            for i, p in enumerate(prompts)
        ]
        results = [collect(handle) for handle in joiners]
        running.cancel()
    finally:
        engine.stop()
    assert results == expected
    assert sum(prefills) == sum(len(p) for p in prompts)
    if step_factor == 0:
        assert max(prefills) <= chunk < len(prompts[0])


def test_a_clients_prompt_is_not_held_back_by_another_clients_backlog_of_prompts(
    tiny_model: LoadedModel,
) -> None:
    # Clients share each step's prompt budget: the light client's prompt prefills beside the
    # heavy client's oldest one, not after all three.
    tokenizer = SharedTokenizer(tiny_model.tokenizer)
    prompt = tuple(
        tokenizer.encode_chat([ChatMessage(Role.USER, "Tell me about the sea and every fish.")])
    )
    engine = Engine(
        tiny_model, SchedulerLimits(prefill_chunk_tokens=8, prefill_step_factor=0), tokenizer
    )
    engine.start()
    first_tokens: list[str] = []
    lock = threading.Lock()

    def record_first_token(name: str, handle: RequestHandle) -> None:
        next(iter(handle))
        with lock:
            first_tokens.append(name)

    try:
        running = engine.submit(GenerationRequest("r", prompt, SamplingParams(400, greedy=True)))
        next(iter(running))
        params = SamplingParams(4, greedy=True)
        with StepGate(engine) as gate:
            gate.hold()
            assert gate.held.wait(30), "the running stream never decoded"
            handles = {
                name: engine.submit(GenerationRequest(name, prompt, params, client="heavy"))
                for name in ("heavy-0", "heavy-1", "heavy-2")
            }
            gate.release()  # one step: the heavy prompts join the batch, ahead of the light one
            gate.hold()
            admitted = gate.wait_for(lambda: gate.held.is_set() and engine.queued_requests == 0)
            assert admitted, "the heavy prompts never joined the batch"
            handles["light"] = engine.submit(
                GenerationRequest("light", prompt, params, client="light")
            )
            watchers = [
                threading.Thread(target=record_first_token, args=item) for item in handles.items()
            ]
            for watcher in watchers:
                watcher.start()
            gate.release()
            for watcher in watchers:
                watcher.join(60)
        running.cancel()
    finally:
        engine.stop()
    assert len(prompt) > 3 * 8
    assert first_tokens.index("light") < first_tokens.index("heavy-1"), first_tokens
    assert first_tokens.index("light") < first_tokens.index("heavy-2"), first_tokens


def test_a_long_prompt_joins_short_streams_when_its_real_tokens_fit_the_budget(
    tiny_model: LoadedModel,
) -> None:
    tokenizer = SharedTokenizer(tiny_model.tokenizer)
    short = encode_with(tokenizer, "Hi.")
    long = encode_with(tokenizer, "the sea " * 300)
    # Seven short rows and the long one fit in real tokens; padded to the longest row, as the
    # dense cache padded them, eight rows would need twice the budget.
    budget = 7 * (len(short) + 200) + len(long) + 8 + 8 * 32
    assert 8 * (len(long) + 8) > 2 * budget
    engine = Engine(tiny_model, SchedulerLimits(kv_cache_tokens=budget), tokenizer)
    engine.start()
    try:
        streams = [
            engine.submit(GenerationRequest(f"s{i}", short, SamplingParams(200, greedy=True)))
            for i in range(7)
        ]
        for stream in streams:
            next(iter(stream))
        _, final = collect(
            engine.submit(GenerationRequest("long", long, SamplingParams(8, greedy=True)))
        )
        still_running = sum(not stream.done for stream in streams)
        for stream in streams:
            stream.cancel()
    finally:
        engine.stop()
    assert final.usage.prompt_tokens == len(long)
    assert still_running == 7


def encode_with(tokenizer: SharedTokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer.encode_chat([ChatMessage(Role.USER, text)]))


def test_detokenizing_does_not_wait_for_a_huge_prompt_being_tokenized(
    tiny_model: LoadedModel,
) -> None:
    tokenizer = SharedTokenizer(tiny_model.tokenizer)
    huge = [ChatMessage(Role.USER, "word " * 400_000)]
    encoding, encoded = threading.Event(), threading.Event()

    def tokenize() -> None:
        encoding.set()
        tokenizer.encode_chat(huge)
        encoded.set()

    tokenizing = threading.Thread(target=tokenize)
    tokenizing.start()
    assert encoding.wait(timeout=10)
    texts: set[str] = set()
    decodes_while_encoding = 0
    while not encoded.is_set() and decodes_while_encoding < 50:
        texts.add(tokenizer.decode([100, 200, 300]))
        decodes_while_encoding += not encoded.is_set()
    tokenizing.join()
    assert encoded.is_set(), "tokenizing the 2 MB prompt failed"
    # Counted, not timed: behind a lock, the second decode would wait out the whole encoding.
    assert decodes_while_encoding == 50
    assert len(texts) == 1


def test_an_architecture_the_decoder_does_not_compute_is_refused_by_name(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_model_dir / name).read_bytes())
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported"):
        load_model(tmp_path, "float32", threads=0)


def test_a_failure_in_one_sequence_leaves_its_batch_neighbours_running(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FaultySampler(TokenSampler):
        """Fails on the third token of the request seeded 666."""

        def __init__(self, params: SamplingParams, *args: object) -> None:
            super().__init__(params, *args)  # type: ignore[arg-type]
            self.calls = 0
            self.faulty = params.seed == 666

        def sample(self, logits: torch.Tensor) -> int:
            self.calls += 1
            if self.faulty and self.calls == 3:
                raise RuntimeError("injected fault")
            return super().sample(logits)

    monkeypatch.setattr(scheduler, "TokenSampler", FaultySampler)
    params = SamplingParams(max_new_tokens=12, greedy=True)
    alone = collect(engine.submit(GenerationRequest("alone", encode(engine, PROMPTS[1]), params)))
    neighbours = [
        engine.submit(GenerationRequest(f"n{i}", encode(engine, PROMPTS[1]), params))
        for i in range(3)
    ]
    faulty = engine.submit(
        GenerationRequest("faulty", encode(engine, PROMPTS[2]), SamplingParams(12, seed=666))
    )
    with pytest.raises(GenerationFailedError):
        collect(faulty)
    assert [collect(h) for h in neighbours] == [alone] * 3
