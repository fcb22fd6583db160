"""Paged decode and chunk attention: native and the torch fallback against float64 dense references."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

import pytest
import torch

from qwen_grpc.engine import kernels
from qwen_grpc.engine.kernels import paged_reference

needs_native = pytest.mark.skipif(
    not kernels.native_available(), reason=f"native path unavailable: {kernels.kernel_path()}"
)

DTYPES = [torch.int8, torch.float32, torch.bfloat16]
# (heads, kv_heads): grouped-query and one query head per kv head
HEADS = [(8, 4), (4, 4)]
SPARE_BLOCKS = 3


class Paged(NamedTuple):
    """The arguments of ``paged_decode_attention`` but the scale."""

    queries: torch.Tensor
    keys: torch.Tensor
    key_scales: torch.Tensor | None
    values: torch.Tensor
    value_scales: torch.Tensor | None
    block_table: torch.Tensor
    lengths: torch.Tensor


Attention = Callable[..., torch.Tensor]


def _native(*args: object) -> torch.Tensor:
    return torch.ops.qwen_q8.paged_decode_attention(*args)


def _ragged(batch: int, block_size: int) -> list[int]:
    """Lengths around block edges: empty, one token, a block minus, exactly and plus one,
    and several blocks."""
    every = [0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    every += [2 * block_size, 5 * block_size - 2]
    return {1: [3 * block_size + 5], 3: [block_size + 1, 0, block_size - 1]}.get(batch, every)


def _paged(
    batch: int,
    heads: int,
    kv_heads: int,
    dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    lengths: list[int] | None = None,
    garbage: float = float("nan"),
    garbage_seed: int = 99,
) -> Paged:
    """A pool with shuffled blocks, spare blocks and the slots past each row's length full of
    ``garbage`` (int8: random values and ``garbage`` scales), and garbage ids (-1, out of
    range, other rows') in the unused table entries: none of it may reach the output. The
    garbage has its own seed, so the same ``seed`` gives the same rows whatever fills the
    rest."""
    generator = torch.Generator().manual_seed(seed)
    junk = torch.Generator().manual_seed(garbage_seed)
    lengths = lengths if lengths is not None else _ragged(batch, block_size)
    used = [-(-length // block_size) for length in lengths]
    pool_blocks = sum(used) + SPARE_BLOCKS
    order = torch.randperm(pool_blocks, generator=generator)
    width = max(used) + 2
    table = torch.randint(-1, pool_blocks + 4, (batch, width), generator=junk)
    unused = torch.ones(pool_blocks, block_size, dtype=torch.bool)
    start = 0
    for row, (length, count) in enumerate(zip(lengths, used, strict=True)):
        table[row, :count] = order[start : start + count]
        for token in range(length):
            unused[order[start + token // block_size], token % block_size] = False
        start += count
    keys, key_scales = _pool(kv_heads, dim, unused, dtype, generator, garbage, junk)
    values, value_scales = _pool(kv_heads, dim, unused, dtype, generator, garbage, junk)
    queries = torch.randn(batch, heads, dim, generator=generator) * 2
    return Paged(
        queries,
        keys,
        key_scales,
        values,
        value_scales,
        table.to(torch.int32),
        torch.tensor(lengths, dtype=torch.int32),
    )


def _pool(
    kv_heads: int,
    dim: int,
    unused: torch.Tensor,
    dtype: torch.dtype,
    generator: torch.Generator,
    garbage: float,
    junk: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[NB, KVH, BS, D]`` random states, ``garbage`` where ``unused [NB, BS]`` (int8:
    random values and ``garbage`` scales)."""
    pool_blocks, block_size = unused.shape
    states = torch.randn(pool_blocks, kv_heads, block_size, dim, generator=generator)
    hidden = unused[:, None, :].expand(pool_blocks, kv_heads, block_size)
    if dtype != torch.int8:
        return states.masked_fill(hidden[..., None], garbage).to(dtype), None
    values, scales = kernels.quantize_kv(states)
    noise = torch.randint(-127, 128, values.shape, generator=junk).to(torch.int8)
    values = torch.where(hidden[..., None], noise, values)
    return values, scales.masked_fill(hidden, garbage)


def _float64_reference(inputs: Paged, scale: float) -> torch.Tensor:
    """Token by token through the table into dense float64 states, then plain softmax
    attention head by head: independent of both paths."""
    batch, heads, dim = inputs.queries.shape
    kv_heads, block_size = inputs.keys.shape[1], inputs.keys.shape[2]
    group = heads // kv_heads
    out = torch.zeros(batch, heads, dim, dtype=torch.float64)
    for row, length in enumerate(inputs.lengths.tolist()):
        tokens = torch.arange(length)
        blocks = inputs.block_table[row, tokens // block_size].long()
        offsets = tokens % block_size
        keys = _dense(inputs.keys, inputs.key_scales, blocks, offsets)
        values = _dense(inputs.values, inputs.value_scales, blocks, offsets)
        for head in range(heads if length else 0):
            kv = head // group
            scores = keys[:, kv] @ inputs.queries[row, head].double() * scale
            out[row, head] = torch.softmax(scores, dim=0) @ values[:, kv]
    return out


def _dense(
    pool: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """float64 ``[tokens, KVH, D]`` of the given (block, offset) slots."""
    states = pool[blocks, :, offsets].double()
    if scales is None:
        return states
    return states * scales[blocks, :, offsets].double()[..., None]


def _alone(attend: Attention, inputs: Paged, row: int, scale: float) -> torch.Tensor:
    """Row ``row`` as a batch of one, its table cut to the blocks it uses."""
    block_size = inputs.keys.shape[2]
    used = max(1, -(-int(inputs.lengths[row]) // block_size))
    return attend(
        inputs.queries[row : row + 1],
        inputs.keys,
        inputs.key_scales,
        inputs.values,
        inputs.value_scales,
        inputs.block_table[row : row + 1, :used].contiguous(),
        inputs.lengths[row : row + 1],
        scale,
    )[0]


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _error(expected: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.double() - expected).abs().max()) if out.numel() else 0.0


SHAPES = [
    (batch, heads, kv_heads, dim)
    for batch in (1, 3, 8)
    for heads, kv_heads in HEADS
    for dim in (64, 128)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fallback_matches_a_float64_reference(
    shape: tuple[int, int, int, int], dtype: torch.dtype
) -> None:
    inputs = _paged(*shape, block_size=32, dtype=dtype, seed=sum(shape))
    scale = 1 / math.sqrt(shape[-1])
    out = paged_reference.paged_decode_attention(*inputs, scale)
    assert out.dtype == torch.float32 and out.shape == inputs.queries.shape
    assert _error(_float64_reference(inputs, scale), out) < 1e-5


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_native_matches_the_fallback_and_float64(
    shape: tuple[int, int, int, int], dtype: torch.dtype
) -> None:
    inputs = _paged(*shape, block_size=32, dtype=dtype, seed=sum(shape))
    scale = 1 / math.sqrt(shape[-1])
    out = _native(*inputs, scale)
    assert out.dtype == torch.float32 and out.shape == inputs.queries.shape
    assert _error(paged_reference.paged_decode_attention(*inputs, scale).double(), out) < 2e-6
    assert _error(_float64_reference(inputs, scale), out) < 2e-6


@pytest.mark.parametrize("block_size", [1, 5, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_block_size_matches_float64_on_both_paths(block_size: int, dtype: torch.dtype) -> None:
    inputs = _paged(8, 6, 2, 64, block_size, dtype, seed=block_size)
    expected = _float64_reference(inputs, 0.125)
    assert _error(expected, paged_reference.paged_decode_attention(*inputs, 0.125)) < 1e-5
    assert _error(expected, kernels.paged_decode_attention(*inputs, 0.125)) < 2e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_unsupported_head_dim_runs_on_the_fallback(dtype: torch.dtype) -> None:
    inputs = _paged(3, 6, 3, 40, 16, dtype, seed=4)
    out = kernels.paged_decode_attention(*inputs, 0.15)
    assert _error(_float64_reference(inputs, 0.15), out) < 1e-5


@pytest.mark.parametrize("attend", [kernels.paged_decode_attention, _native], ids=["api", "op"])
def test_rows_of_length_zero_give_zeros(attend: Attention) -> None:
    if attend is _native and not kernels.native_available():
        pytest.skip(f"native path unavailable: {kernels.kernel_path()}")
    inputs = _paged(3, 4, 4, 64, 32, torch.float32, seed=3, lengths=[0, 40, 0])
    out = attend(*inputs, 0.125)
    assert not bool(out[0].any()) and not bool(out[2].any()) and bool(out[1].all())
    fallback = paged_reference.paged_decode_attention(*inputs, 0.125)
    assert not bool(fallback[0].any()) and not bool(fallback[2].any())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_what_lies_outside_the_rows_never_reaches_the_output(dtype: torch.dtype) -> None:
    """NaN there, or large finite values and other ids: the same bits, on both paths."""
    nan = _paged(8, 8, 4, 64, 16, dtype, seed=12)
    large = _paged(8, 8, 4, 64, 16, dtype, seed=12, garbage=3e4, garbage_seed=5)
    assert not torch.equal(nan.block_table, large.block_table)
    for attend in (kernels.paged_decode_attention, paged_reference.paged_decode_attention):
        clean = attend(*nan, 0.125)
        assert bool(torch.isfinite(clean).all())
        assert torch.equal(attend(*large, 0.125), clean)


def test_the_nan_would_be_seen_if_a_row_reached_into_it() -> None:
    """Guards the test above: one token more reads a NaN slot and poisons the row."""
    inputs = _paged(3, 4, 4, 64, 32, torch.float32, seed=5, lengths=[33, 10, 20])
    longer = inputs._replace(lengths=inputs.lengths + torch.tensor([1, 0, 0], dtype=torch.int32))
    for attend in (kernels.paged_decode_attention, paged_reference.paged_decode_attention):
        out = attend(*longer, 0.125)
        assert bool(out[0].isnan().all()) and bool(torch.isfinite(out[1:]).all())


def _batch_invariance(attend: Attention, dtype: torch.dtype) -> None:
    inputs = _paged(8, 8, 4, 64, 32, dtype, seed=21)
    batched = attend(*inputs, 0.125)
    for row in range(8):
        assert torch.equal(_alone(attend, inputs, row, 0.125), batched[row])
    order = torch.tensor([5, 2, 7, 0, 1, 6, 3, 4])
    shuffled = inputs._replace(
        queries=inputs.queries[order],
        block_table=inputs.block_table[order],
        lengths=inputs.lengths[order],
    )
    assert torch.equal(attend(*shuffled, 0.125), batched[order])
    with _threads(1):
        assert torch.equal(attend(*inputs, 0.125), batched)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_rows_give_the_same_bits_alone_in_any_batch_and_thread_count(
    dtype: torch.dtype,
) -> None:
    _batch_invariance(_native, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fallback_rows_give_the_same_bits_alone_in_any_batch_and_thread_count(
    dtype: torch.dtype,
) -> None:
    _batch_invariance(paged_reference.paged_decode_attention, dtype)


def test_bf16_queries_are_widened() -> None:
    inputs = _paged(3, 4, 2, 64, 16, torch.bfloat16, seed=8)
    narrow = inputs._replace(queries=inputs.queries.bfloat16())
    widened = inputs._replace(queries=inputs.queries.bfloat16().float())
    assert torch.equal(
        kernels.paged_decode_attention(*narrow, 0.125),
        kernels.paged_decode_attention(*widened, 0.125),
    )


BAD_INPUTS: dict[str, Callable[[Paged], Paged]] = {
    "2-D queries": lambda p: p._replace(queries=p.queries[0]),
    "heads not a multiple": lambda p: p._replace(queries=p.queries[:, :3]),
    "head dims differ": lambda p: p._replace(queries=p.queries[..., :32]),
    "pool shapes differ": lambda p: p._replace(
        values=p.values[:-1],
        value_scales=p.value_scales[:-1] if p.value_scales is not None else None,
    ),
    "pool dtypes differ": lambda p: p._replace(values=p.values.float(), value_scales=None),
    "int32 pool": lambda p: p._replace(keys=p.keys.int(), values=p.values.int()),
    "int8 without scales": lambda p: p._replace(key_scales=None),
    "scales of the wrong shape": lambda p: p._replace(
        value_scales=p.value_scales[:, :1] if p.value_scales is not None else None
    ),
    "float pool with scales": lambda p: p._replace(keys=p.keys.float(), values=p.values.float()),
    "int64 table": lambda p: p._replace(block_table=p.block_table.long()),
    "table rows": lambda p: p._replace(block_table=p.block_table[:2]),
    "int64 lengths": lambda p: p._replace(lengths=p.lengths.long()),
    "lengths shape": lambda p: p._replace(lengths=p.lengths[:2]),
    "length past the table": lambda p: p._replace(
        lengths=torch.tensor([20, 0, 16 * p.block_table.shape[1] + 1], dtype=torch.int32)
    ),
    "negative length": lambda p: p._replace(lengths=torch.tensor([20, -1, 33], dtype=torch.int32)),
}


@pytest.mark.parametrize("dim", [64, 40], ids=["native-dim", "fallback-dim"])
@pytest.mark.parametrize("mutation", list(BAD_INPUTS), ids=str)
def test_bad_input_raises_value_error(mutation: str, dim: int) -> None:
    inputs = _paged(3, 4, 2, dim, 16, torch.int8, seed=9, lengths=[20, 0, 33])
    with pytest.raises(ValueError):
        kernels.paged_decode_attention(*BAD_INPUTS[mutation](inputs), 0.125)


@pytest.mark.parametrize("dim", [64, 40], ids=["native-dim", "fallback-dim"])
@pytest.mark.parametrize("bad_id", [-1, 1000])
def test_a_used_block_id_outside_the_pool_raises_value_error(dim: int, bad_id: int) -> None:
    inputs = _paged(3, 4, 2, dim, 16, torch.float32, seed=9, lengths=[20, 0, 33])
    table = inputs.block_table.clone()
    table[2, 2] = bad_id
    with pytest.raises(ValueError, match="block"):
        kernels.paged_decode_attention(*inputs._replace(block_table=table), 0.125)


def test_int8_attention_stays_close_to_unquantized_attention() -> None:
    # The int8 cache's whole error, one row of 200 tokens in blocks of 32: within 2 %.
    generator = torch.Generator().manual_seed(11)
    queries = torch.randn(1, 16, 64, generator=generator)
    keys, values = torch.randn(2, 16, 200, 64, generator=generator)
    scores = torch.einsum("hd,hcd->hc", queries[0], keys) * 0.125
    exact = torch.einsum("hc,hcd->hd", torch.softmax(scores, dim=-1), values)
    blocks = -(-200 // 32)

    def pool(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padded = torch.zeros(16, blocks * 32, 64)
        padded[:, :200] = states
        quantized, scales = kernels.quantize_kv(padded.view(16, blocks, 32, 64).transpose(0, 1))
        return quantized.contiguous(), scales.contiguous()

    table = torch.arange(blocks, dtype=torch.int32).view(1, blocks)
    lengths = torch.tensor([200], dtype=torch.int32)
    out = kernels.paged_decode_attention(queries, *pool(keys), *pool(values), table, lengths, 0.125)
    assert float((out[0] - exact).norm() / exact.norm()) < 0.02


@pytest.fixture(params=["native", "fallback"])
def either_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs the test on the native kernels, then with them switched off."""
    if request.param == "native" and not kernels.native_available():
        pytest.skip(f"native path unavailable: {kernels.kernel_path()}")
    if request.param == "fallback":
        monkeypatch.setattr(kernels, "_native_head_dim", lambda _dim: False)


def _chunk_inputs(
    position: int, count: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int
) -> tuple[Paged, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pool holding one row of ``position + count`` tokens (its history), the row's block ids
    (int32), and a chunk's queries, keys and values."""
    inputs = _paged(1, heads, kv_heads, 64, 16, dtype, seed, lengths=[position + count])
    generator = torch.Generator().manual_seed(seed + 1)
    queries = torch.randn(count, heads, 64, generator=generator)
    own_keys, own_values = torch.randn(2, count, kv_heads, 64, generator=generator)
    return inputs, queries, own_keys, own_values


def _attend_chunk(
    inputs: Paged,
    queries: torch.Tensor,
    own_keys: torch.Tensor,
    own_values: torch.Tensor,
    blocks: torch.Tensor,
    position: int,
) -> torch.Tensor:
    """``paged_chunk_attention`` of a chunk over the pools of ``inputs``, softmax scale 1/8."""
    pools = inputs.keys, inputs.key_scales, inputs.values, inputs.value_scales
    return kernels.paged_chunk_attention(
        queries, own_keys, own_values, *pools, blocks, position, 0.125
    )


def _dense_chunk(
    inputs: Paged,
    queries: torch.Tensor,
    own_keys: torch.Tensor,
    own_values: torch.Tensor,
    position: int,
) -> torch.Tensor:
    """float64 causal attention over the gathered history and the chunk, written out."""
    count, heads, _ = queries.shape
    kv_heads = own_keys.shape[1]
    ids = inputs.block_table[0, : -(-max(position, 1) // 16)].long()
    history = [
        paged_reference.gather_tokens(pool, scales, ids, position).transpose(0, 1)
        for pool, scales in (
            (inputs.keys, inputs.key_scales),
            (inputs.values, inputs.value_scales),
        )
    ]
    keys = torch.cat([history[0], own_keys]).double()
    values = torch.cat([history[1], own_values]).double()
    kv = torch.arange(heads) // (heads // kv_heads)
    scores = torch.einsum("chd,thd->hct", queries.double(), keys[:, kv]) * 0.125
    visible = torch.arange(position + count) <= torch.arange(position, position + count)[:, None]
    weights = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
    return torch.einsum("hct,thd->chd", weights, values[:, kv])


@pytest.mark.usefixtures("either_path")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize(("position", "count"), [(0, 1), (0, 37), (15, 2), (16, 17), (100, 48)])
def test_a_chunk_attends_causally_over_its_history_and_itself(
    dtype: torch.dtype, heads: int, kv_heads: int, position: int, count: int
) -> None:
    inputs, queries, own_keys, own_values = _chunk_inputs(
        position, count, heads, kv_heads, dtype, seed=position + count
    )
    out = _attend_chunk(inputs, queries, own_keys, own_values, inputs.block_table[0], position)
    assert out.shape == (count, heads, 64) and out.dtype == torch.float32
    expected = _dense_chunk(inputs, queries, own_keys, own_values, position)
    assert float((out.double() - expected).abs().max()) < 1e-5


@pytest.mark.usefixtures("either_path")
def test_a_prompt_split_into_chunks_attends_as_in_one_pass() -> None:
    # With a float32 pool the history is exact, so chunking changes nothing but rounding.
    inputs, queries, own_keys, own_values = _chunk_inputs(0, 90, 8, 2, torch.float32, seed=5)
    keys, values = inputs.keys, inputs.values
    ids = inputs.block_table[0].long()
    for token in range(90):  # the whole prompt's keys and values land in the row's blocks
        keys[ids[token // 16], :, token % 16] = own_keys[token]
        values[ids[token // 16], :, token % 16] = own_values[token]
    blocks = inputs.block_table[0]
    whole = _attend_chunk(inputs, queries, own_keys, own_values, blocks, 0)
    pieces = [
        _attend_chunk(
            inputs, queries[start:end], own_keys[start:end], own_values[start:end], blocks, start
        )
        for start, end in ((0, 33), (33, 34), (34, 90))
    ]
    assert float((torch.cat(pieces) - whole).abs().max()) < 1e-5


@pytest.mark.usefixtures("either_path")
def test_a_chunk_history_block_outside_the_pool_is_a_value_error() -> None:
    inputs, queries, own_keys, own_values = _chunk_inputs(20, 4, 8, 4, torch.int8, seed=3)
    blocks = inputs.block_table[0].clone()
    blocks[0] = 1000
    with pytest.raises(ValueError, match="outside"):
        _attend_chunk(inputs, queries, own_keys, own_values, blocks, 20)
