// Decode attention over a paged KV cache: `qwen_q8::paged_decode_attention`.
//
// Layout. Keys and values live in pools [NB, KVH, BS, D] of int8 (with float32 scales
// [NB, KVH, BS] from quantize_kv), float32 or bfloat16. Row b's token t sits in block
// block_table[b, t / BS] at offset t % BS, so for one (block, kv head) the BS tokens are
// BS * D contiguous elements: a block is one sequential stream, and only the jump from one
// block to the next is random. Row b attends over its first lengths[b] tokens; table entries
// past ceil(length / BS) are never read (they may hold -1), nor are the slots of the last
// block past the length, so whatever sits in them (NaN included) cannot reach the output.
//
// Arithmetic, all float32: every element is widened exactly (int8
// and bf16 to float32), score = (q . k) * key_scale * softmax_scale, softmax with the max
// trick over the visible tokens, output = sum_t p_t * v_t * value_scale / sum_t p_t. A row
// with length 0 gives zeros. Float pools have no scales (a scale of 1 in the formulas).
//
// Work is split over (row, kv head); each task serves the query heads sharing its kv head, so
// a key or value row is widened once per group. A task's arithmetic depends on its own row
// only, never on the batch or on which thread runs it: a row gives the same bits alone or in
// any batch (greedy decoding relies on it). Tasks are dealt to threads in contiguous ranges of
// equal total length, so a batch of ragged rows still keeps every thread busy.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention.h"

namespace {

using qwen_attention::accumulate_block;
using qwen_attention::check_pool;
using qwen_attention::F32x16;
using qwen_attention::kAccumulators;
using qwen_attention::kLanes;
using qwen_attention::kMaxChunks;
using qwen_attention::kQuantized;
using qwen_attention::prefetch_rows;
using qwen_attention::scales_of;
using qwen_attention::score_block;
using qwen_attention::softmax_in_place;
using qwen_attention::store;
using qwen_attention::zeros;
constexpr const char* kOp = "paged_decode_attention";
// Fixed per-task cost in the thread split, in tokens: a task with a short row still pays
// for its softmax and output stores.
constexpr int64_t kTaskOverhead = 16;

template <typename T>
struct PagedProblem {
  const float* queries;       // [B, H, D]
  const T* keys;              // [NB, KVH, BS, D]
  const float* key_scales;    // [NB, KVH, BS], int8 pools only
  const T* values;            // [NB, KVH, BS, D]
  const float* value_scales;  // [NB, KVH, BS], int8 pools only
  const int32_t* table;       // [B, table_width]
  const int32_t* lengths;     // [B]
  float* out;                 // [B, H, D], zero-filled
  int64_t table_width;
  int64_t heads;
  int64_t kv_heads;
  int64_t block_size;
  float scale;
};

// A thread's buffers, reused across its tasks.
struct Scratch {
  std::vector<float> scores;  // group x padded softmax weights
  std::vector<uint8_t> live;  // per head: anything visible (else its output stays zero)
};

// One (row, kv head): the `group` query heads that read it.
template <typename T, int CHUNKS>
void attend_paged(const PagedProblem<T>& p, int64_t row, int64_t kv_head, Scratch& scratch) {
  constexpr int64_t dim = CHUNKS * kLanes;
  const int64_t length = p.lengths[row];
  if (length == 0) return;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t block_size = p.block_size;
  const int64_t blocks = (length + block_size - 1) / block_size;
  const int64_t padded = (length + kLanes - 1) / kLanes * kLanes;
  const int32_t* table = p.table + row * p.table_width;
  const float* queries = p.queries + (row * p.heads + kv_head * group) * dim;
  float* out = p.out + (row * p.heads + kv_head * group) * dim;
  // Token index, in the pool, of slot 0 of block `id` for this kv head.
  const auto first_token = [&](int64_t id) { return (id * p.kv_heads + kv_head) * block_size; };
  const auto tokens_in = [&](int64_t b) { return std::min(block_size, length - b * block_size); };

  std::vector<float>& scores = scratch.scores;
  std::vector<uint8_t>& live = scratch.live;
  scores.assign(group * padded, -std::numeric_limits<float>::infinity());
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = first_token(table[b]);
    if (b + 1 < blocks) {
      prefetch_rows(p.keys + first_token(table[b + 1]) * dim, tokens_in(b + 1), dim);
    }
    score_block<T, CHUNKS>(queries, group, p.keys + first * dim,
                           kQuantized<T> ? p.key_scales + first : nullptr, tokens_in(b), p.scale,
                           scores.data() + b * block_size, padded);
  }
  live.resize(group);
  for (int64_t g = 0; g < group; ++g) {
    live[g] = softmax_in_place(scores.data() + g * padded, length, padded);
  }

  constexpr int per_pass = std::max(1, kAccumulators / CHUNKS);
  for (int64_t g0 = 0; g0 < group; g0 += per_pass) {
    const int64_t count = std::min<int64_t>(per_pass, group - g0);
    F32x16 acc[per_pass][CHUNKS];
    for (int g = 0; g < per_pass; ++g) {
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) acc[g][ch] = zeros();
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = first_token(table[b]);
      if (b + 1 < blocks) {
        prefetch_rows(p.values + first_token(table[b + 1]) * dim, tokens_in(b + 1), dim);
      }
      accumulate_block<T, CHUNKS, per_pass>(acc, count, scores.data() + g0 * padded + b * block_size,
                                            padded, p.values + first * dim,
                                            kQuantized<T> ? p.value_scales + first : nullptr,
                                            tokens_in(b));
    }
    for (int64_t g = 0; g < count; ++g) {
      if (!live[g0 + g]) continue;
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) {
        store(out + (g0 + g) * dim + ch * kLanes, acc[g][ch]);
      }
    }
  }
}

template <typename T>
using PagedKernel = void (*)(const PagedProblem<T>&, int64_t, int64_t, Scratch&);

template <typename T, int... N>
constexpr auto make_paged_kernels(std::integer_sequence<int, N...>) {
  return std::array<PagedKernel<T>, sizeof...(N)>{&attend_paged<T, N + 1>...};
}

template <typename T>
constexpr auto kPagedKernels =
    make_paged_kernels<T>(std::make_integer_sequence<int, kMaxChunks>{});

// Task boundaries for `parts` threads: contiguous ranges of (row, kv head) tasks with about
// equal total cost. Which thread runs a task does not change its result, only the time.
std::vector<int64_t> split_tasks(const int32_t* lengths, int64_t batch, int64_t kv_heads,
                                 int64_t parts) {
  std::vector<int64_t> cost(batch * kv_heads + 1, 0);
  for (int64_t task = 0; task < batch * kv_heads; ++task) {
    cost[task + 1] = cost[task] + lengths[task / kv_heads] + kTaskOverhead;
  }
  std::vector<int64_t> bounds(parts + 1, batch * kv_heads);
  bounds[0] = 0;
  for (int64_t part = 1; part < parts; ++part) {
    const int64_t target = cost.back() * part / parts;
    bounds[part] = std::lower_bound(cost.begin(), cost.end(), target) - cost.begin();
  }
  return bounds;
}

template <typename T>
void run_paged(const PagedProblem<T>& problem, int64_t batch, int64_t dim) {
  const PagedKernel<T> kernel = kPagedKernels<T>[dim / kLanes - 1];
  const int64_t tasks = batch * problem.kv_heads;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), tasks);
  const std::vector<int64_t> bounds = split_tasks(problem.lengths, batch, problem.kv_heads, parts);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t task = bounds[part]; task < bounds[part + 1]; ++task) {
        kernel(problem, task / problem.kv_heads, task % problem.kv_heads, scratch);
      }
    }
  });
}

// Lengths fit the table and every block a row reads exists: a bad id would read outside the
// pool. ValueError in Python, like the wrapper's own checks.
void check_table(const at::Tensor& table, const at::Tensor& lengths, int64_t batch,
                 int64_t blocks, int64_t block_size) {
  TORCH_CHECK(table.dim() == 2 && table.size(0) == batch && table.is_contiguous() &&
                  table.scalar_type() == at::kInt,
              "paged_decode_attention: block_table must be contiguous int32 [B, MB]");
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == batch && lengths.is_contiguous() &&
                  lengths.scalar_type() == at::kInt,
              "paged_decode_attention: lengths must be contiguous int32 [B]");
  const int64_t width = table.size(1);
  const int32_t* ids = table.data_ptr<int32_t>();
  const int32_t* length = lengths.data_ptr<int32_t>();
  for (int64_t row = 0; row < batch; ++row) {
    TORCH_CHECK_VALUE(length[row] >= 0 && length[row] <= width * block_size,
                      "paged_decode_attention: lengths[", row, "] = ", length[row],
                      " is outside [0, ", width * block_size, "] (block table width x BS)");
    const int64_t used = (length[row] + block_size - 1) / block_size;
    for (int64_t b = 0; b < used; ++b) {
      const int32_t id = ids[row * width + b];
      TORCH_CHECK_VALUE(id >= 0 && id < blocks, "paged_decode_attention: block_table[", row,
                        ", ", b, "] = ", id, " is outside [0, ", blocks, ")");
    }
  }
}

template <typename T>
PagedProblem<T> make_problem(const at::Tensor& queries, const at::Tensor& keys,
                             const float* key_scales, const at::Tensor& values,
                             const float* value_scales, const at::Tensor& table,
                             const at::Tensor& lengths, at::Tensor& out, double scale) {
  return PagedProblem<T>{queries.data_ptr<float>(), keys.data_ptr<T>(),
                         key_scales,                values.data_ptr<T>(),
                         value_scales,              table.data_ptr<int32_t>(),
                         lengths.data_ptr<int32_t>(), out.data_ptr<float>(),
                         table.size(1),             queries.size(1),
                         keys.size(1),              keys.size(2),
                         static_cast<float>(scale)};
}

at::Tensor paged_decode_attention(const at::Tensor& queries, const at::Tensor& keys,
                                  const std::optional<at::Tensor>& key_scales,
                                  const at::Tensor& values,
                                  const std::optional<at::Tensor>& value_scales,
                                  const at::Tensor& block_table, const at::Tensor& lengths,
                                  double scale) {
  TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == at::kFloat &&
                  queries.is_contiguous(),
              "paged_decode_attention: queries must be contiguous float32 [B, H, D]");
  check_pool(keys, keys, kOp, "keys");
  check_pool(values, keys, kOp, "values");
  const int64_t batch = queries.size(0);
  const int64_t heads = queries.size(1);
  const int64_t dim = queries.size(2);
  const int64_t kv_heads = keys.size(1);
  const int64_t block_size = keys.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0,
              "paged_decode_attention: query heads must be a multiple of kv heads");
  TORCH_CHECK(block_size > 0, "paged_decode_attention: block size must be at least 1");
  TORCH_CHECK(keys.size(3) == dim && dim % kLanes == 0 && dim > 0 && dim <= kMaxChunks * kLanes,
              "paged_decode_attention: head_dim must match the pool and be a multiple of 16, at "
              "most 256");
  const float* key_scale_ptr = scales_of(key_scales, keys, kOp, "key_scales");
  const float* value_scale_ptr = scales_of(value_scales, values, kOp, "value_scales");
  check_table(block_table, lengths, batch, keys.size(0), block_size);
  at::Tensor out = at::zeros({batch, heads, dim}, queries.options());
  if (batch == 0 || heads == 0) return out;
  switch (keys.scalar_type()) {
    case at::kChar:
      run_paged(make_problem<int8_t>(queries, keys, key_scale_ptr, values, value_scale_ptr,
                                     block_table, lengths, out, scale),
                batch, dim);
      break;
    case at::kFloat:
      run_paged(make_problem<float>(queries, keys, nullptr, values, nullptr, block_table,
                                    lengths, out, scale),
                batch, dim);
      break;
    default:
      run_paged(make_problem<c10::BFloat16>(queries, keys, nullptr, values, nullptr,
                                            block_table, lengths, out, scale),
                batch, dim);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_q8, m) {
  m.def(
      "paged_decode_attention(Tensor queries, Tensor keys, Tensor? key_scales, Tensor values, "
      "Tensor? value_scales, Tensor block_table, Tensor lengths, float scale) -> Tensor",
      &paged_decode_attention);
}
