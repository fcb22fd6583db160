// Attention of a prompt chunk over its row's paged history and itself:
// `qwen_q8::paged_chunk_attention`.
//
// A chunk of C tokens of one row starts at position P: its P earlier tokens live in the pools
// ([NB, KVH, BS, D], int8 with float32 scales, float32 or bfloat16) at the row's blocks, and its
// own keys and values arrive as float32 [C, KVH, D], exact, as an unchunked prefill has them.
// Query i sees the history and the chunk's tokens 0..i.
//
// Torch needed the history materialized in float32 for every layer of every chunk step (16 MB
// a layer at 2,000 tokens of the Qwen shape, written to memory and read back by SDPA). Here a
// task, one kv head and a tile of queries, widens the tokens it reads into a buffer of its
// own that stays in cache, then runs the decode kernel's arithmetic on it (attention.h):
// scores, softmax with the max trick, weighted sum of values, all float32.
//
// A query's result depends on its own inputs only, not on the tiling or the thread.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

using namespace qwen_simd;
using qwen_attention::check_pool;
using qwen_attention::kAccumulators;
using qwen_attention::kMaxChunks;
using qwen_attention::scales_of;

constexpr const char* kOp = "paged_chunk_attention";

template <typename T>
struct ChunkProblem {
  const float* queries;       // [C, H, D]
  const float* own_keys;      // [C, KVH, D]
  const float* own_values;    // [C, KVH, D]
  const T* keys;              // [NB, KVH, BS, D]
  const float* key_scales;    // [NB, KVH, BS], int8 pools only
  const T* values;            // [NB, KVH, BS, D]
  const float* value_scales;  // [NB, KVH, BS], int8 pools only
  const int32_t* blocks;      // the row's block ids, covering `position` tokens
  float* out;                 // [C, H, D]
  int64_t count;
  int64_t position;
  int64_t heads;
  int64_t kv_heads;
  int64_t block_size;
  float scale;
};

struct Scratch {
  std::vector<float> keys;        // tokens x D, widened
  std::vector<float> values;      // tokens x D, widened
  std::vector<float> transposed;  // D x 16 lanes of queries (+ alignment slack)
  std::vector<float> scores;      // tokens x 16 lanes (+ alignment slack)
};

// The first 64-byte boundary in a buffer allocated 16 floats longer than it needs.
inline float* aligned(float* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((address + 63) & ~uintptr_t{63});
}

// Widens `count` tokens of D elements (times their scales, for int8) into `out`.
template <typename T, int CHUNKS>
inline void widen_tokens(const T* src, const float* scales, int64_t count, float* out) {
  constexpr int64_t dim = CHUNKS * kLanes;
  for (int64_t t = 0; t < count; ++t) {
    const F32x16 scale = broadcast(scales ? scales[t] : 1.0f);
#pragma GCC unroll 16
    for (int ch = 0; ch < CHUNKS; ++ch) {
      const F32x16 v = load16(src + t * dim + ch * kLanes);
      store(out + t * dim + ch * kLanes, scales ? mul(v, scale) : v);
    }
  }
}

// One kv head's history (from the pool) and the chunk's first `own` tokens, as float32
// [position + own, D] in `out`.
template <typename T, int CHUNKS>
void gather(const T* pool, const float* scales, const float* own_tokens, const ChunkProblem<T>& p,
            int64_t kv_head, int64_t own, float* out) {
  constexpr int64_t dim = CHUNKS * kLanes;
  const int64_t used = (p.position + p.block_size - 1) / p.block_size;
  for (int64_t b = 0; b < used; ++b) {
    const int64_t first = (static_cast<int64_t>(p.blocks[b]) * p.kv_heads + kv_head) * p.block_size;
    const int64_t tokens = std::min(p.block_size, p.position - b * p.block_size);
    widen_tokens<T, CHUNKS>(pool + first * dim, scales ? scales + first : nullptr, tokens,
                            out + b * p.block_size * dim);
  }
  float* tail = out + p.position * dim;
  for (int64_t j = 0; j < own; ++j) {
    const float* src = own_tokens + (j * p.kv_heads + kv_head) * dim;
    std::copy(src, src + dim, tail + j * dim);
  }
}

// Scores, softmax and weighted values of up to 16 lanes, lane0 + r being query head g of chunk
// query i for lane0 + r = i * group + g, against the widened keys and values. The layout is
// transposed, token-major with one lane per query: scores[t] holds token t's score for all 16
// lanes, so a query's softmax max and sum are vertical vector operations, and each score
// vector is 16 fmas per element of D with the key element broadcast (a GEMM-like inner loop, no
// horizontal sums).
template <int CHUNKS>
void attend_lanes(const float* queries, int64_t lane0, int64_t lanes, int64_t group,
                  int64_t heads, int64_t kv_head, int64_t position, float scale,
                  const float* keys, const float* values, float* transposed, float* scores,
                  float* out) {
  constexpr int64_t dim = CHUNKS * kLanes;
  // Lane r's chunk query and the tokens it sees (the last lane's query sees the most).
  const auto query_of = [&](int64_t r) { return (lane0 + r) / group; };
  const int64_t reach = position + query_of(lanes - 1) + 1;
  // Lane r sees tokens t < limit[r]; lanes past `lanes` see nothing.
  alignas(64) int32_t limit[kLanes] = {};
  for (int64_t r = 0; r < lanes; ++r) {
    const int64_t i = query_of(r);
    limit[r] = static_cast<int32_t>(position + i + 1);
    const float* q = queries + (i * heads + kv_head * group + (lane0 + r) % group) * dim;
    for (int64_t d = 0; d < dim; ++d) transposed[d * kLanes + r] = q[d];
  }
  for (int64_t r = lanes; r < kLanes; ++r) {
    for (int64_t d = 0; d < dim; ++d) transposed[d * kLanes + r] = 0.0f;
  }
  const I32x16 limits = load_int(limit);
  const F32x16 neg_inf = broadcast(-std::numeric_limits<float>::infinity());
  const F32x16 factor = broadcast(scale);
  const auto visible = [&](int64_t t) { return below(static_cast<int32_t>(t), limits); };

  constexpr int64_t kKeysPerPass = 4;
  F32x16 top = neg_inf;
  for (int64_t t0 = 0; t0 < reach; t0 += kKeysPerPass) {
    const int64_t count = std::min(kKeysPerPass, reach - t0);
    F32x16 acc[kKeysPerPass];
#pragma GCC unroll 4
    for (int j = 0; j < kKeysPerPass; ++j) acc[j] = zeros();
    const float* k = keys + t0 * dim;
    if (count == kKeysPerPass) {
#pragma GCC unroll 8
      for (int64_t d = 0; d < dim; ++d) {
        const F32x16 q = load(transposed + d * kLanes);
#pragma GCC unroll 4
        for (int j = 0; j < kKeysPerPass; ++j) {
          acc[j] = fmadd(q, broadcast(k[j * dim + d]), acc[j]);
        }
      }
    } else {
      for (int64_t d = 0; d < dim; ++d) {
        const F32x16 q = load(transposed + d * kLanes);
        for (int64_t j = 0; j < count; ++j) {
          acc[j] = fmadd(q, broadcast(k[j * dim + d]), acc[j]);
        }
      }
    }
    for (int64_t j = 0; j < count; ++j) {
      const int64_t t = t0 + j;
      const F32x16 score = select(visible(t), mul(acc[j], factor), neg_inf);
      store(scores + t * kLanes, score);
      top = maximum(top, score);
    }
  }
  // Every real lane sees token 0, so its max is finite; padding lanes get 0 to stay NaN-free.
  top = select(not_equal(top, neg_inf), top, zeros());
  F32x16 total = zeros();
  for (int64_t t = 0; t < reach; ++t) {
    const F32x16 e =
        select(visible(t), exp_nonpositive(sub(load(scores + t * kLanes), top)), zeros());
    store(scores + t * kLanes, e);
    total = add(total, e);
  }
  alignas(64) float inverse[kLanes];
  store(inverse,
        div(broadcast(1.0f), maximum(total, broadcast(std::numeric_limits<float>::min()))));

  constexpr int per_pass = std::max(1, kAccumulators / CHUNKS);
  for (int64_t r0 = 0; r0 < lanes; r0 += per_pass) {
    const int64_t in_pass = std::min<int64_t>(per_pass, lanes - r0);
    const int64_t pass_reach = position + query_of(r0 + in_pass - 1) + 1;
    F32x16 acc[per_pass][CHUNKS];
#pragma GCC unroll 16
    for (int r = 0; r < per_pass; ++r) {
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) acc[r][ch] = zeros();
    }
    for (int64_t t = 0; t < pass_reach; ++t) {
      F32x16 v[CHUNKS];
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) v[ch] = load(values + t * dim + ch * kLanes);
      const float* w = scores + t * kLanes + r0;
#pragma GCC unroll 16
      for (int r = 0; r < per_pass; ++r) {
        const F32x16 weight = broadcast(w[r]);
#pragma GCC unroll 16
        for (int ch = 0; ch < CHUNKS; ++ch) acc[r][ch] = fmadd(weight, v[ch], acc[r][ch]);
      }
    }
    for (int64_t r = 0; r < in_pass; ++r) {
      const int64_t lane = r0 + r;
      const int64_t i = query_of(lane);
      float* o = out + (i * heads + kv_head * group + (lane0 + lane) % group) * dim;
      const F32x16 norm = broadcast(inverse[lane]);
#pragma GCC unroll 16
      for (int ch = 0; ch < CHUNKS; ++ch) store(o + ch * kLanes, mul(acc[r][ch], norm));
    }
  }
}

// One task: every query head that reads kv head `kv_head`, 16 lanes at a time, over the
// history and the chunk's tokens widened once for all of them.
template <typename T, int CHUNKS>
void attend_head(const ChunkProblem<T>& p, int64_t kv_head, Scratch& scratch) {
  constexpr int64_t dim = CHUNKS * kLanes;
  const int64_t group = p.heads / p.kv_heads;
  const int64_t visible = p.position + p.count;
  scratch.keys.resize(visible * dim);
  scratch.values.resize(visible * dim);
  scratch.transposed.resize(dim * kLanes + kLanes);
  scratch.scores.resize(visible * kLanes + kLanes);
  gather<T, CHUNKS>(p.keys, p.key_scales, p.own_keys, p, kv_head, p.count, scratch.keys.data());
  gather<T, CHUNKS>(p.values, p.value_scales, p.own_values, p, kv_head, p.count,
                    scratch.values.data());
  float* transposed = aligned(scratch.transposed.data());
  float* scores = aligned(scratch.scores.data());
  const int64_t lanes_total = p.count * group;
  for (int64_t r0 = 0; r0 < lanes_total; r0 += kLanes) {
    attend_lanes<CHUNKS>(p.queries, r0, std::min(kLanes, lanes_total - r0), group,
                         p.heads, kv_head, p.position, p.scale, scratch.keys.data(),
                         scratch.values.data(), transposed, scores, p.out);
  }
}

template <typename T>
using HeadKernel = void (*)(const ChunkProblem<T>&, int64_t, Scratch&);

template <typename T, int... N>
constexpr auto make_head_kernels(std::integer_sequence<int, N...>) {
  return std::array<HeadKernel<T>, sizeof...(N)>{&attend_head<T, N + 1>...};
}

template <typename T>
constexpr auto kHeadKernels = make_head_kernels<T>(std::make_integer_sequence<int, kMaxChunks>{});

template <typename T>
void run_chunk(const ChunkProblem<T>& p, int64_t dim) {
  const HeadKernel<T> kernel = kHeadKernels<T>[dim / kLanes - 1];
  at::parallel_for(0, p.kv_heads, 1, [&](int64_t begin, int64_t end) {
    Scratch scratch;
    for (int64_t kv_head = begin; kv_head < end; ++kv_head) kernel(p, kv_head, scratch);
  });
}

at::Tensor paged_chunk_attention(const at::Tensor& queries, const at::Tensor& own_keys,
                                 const at::Tensor& own_values, const at::Tensor& keys,
                                 const std::optional<at::Tensor>& key_scales,
                                 const at::Tensor& values,
                                 const std::optional<at::Tensor>& value_scales,
                                 const at::Tensor& blocks, int64_t position, double scale) {
  check_pool(keys, keys, kOp, "keys");
  check_pool(values, keys, kOp, "values");
  const int64_t kv_heads = keys.size(1);
  const int64_t block_size = keys.size(2);
  const int64_t dim = keys.size(3);
  TORCH_CHECK(queries.dim() == 3 && queries.scalar_type() == at::kFloat &&
                  queries.is_contiguous() && queries.size(2) == dim,
              kOp, ": queries must be contiguous float32 [C, H, D] with the pools' D");
  const int64_t count = queries.size(0);
  const int64_t heads = queries.size(1);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, kOp,
              ": query heads must be a multiple of kv heads");
  TORCH_CHECK(dim % kLanes == 0 && dim > 0 && dim <= kMaxChunks * kLanes, kOp,
              ": head_dim must be a multiple of 16, at most 256");
  for (const at::Tensor* own : {&own_keys, &own_values}) {
    TORCH_CHECK(own->dim() == 3 && own->scalar_type() == at::kFloat && own->is_contiguous() &&
                    own->size(0) == count && own->size(1) == kv_heads && own->size(2) == dim,
                kOp, ": the chunk's keys and values must be contiguous float32 [C, KVH, D]");
  }
  TORCH_CHECK(block_size > 0 && position >= 0, kOp, ": needs BS >= 1 and position >= 0");
  const int64_t used = (position + block_size - 1) / block_size;
  TORCH_CHECK(blocks.dim() == 1 && blocks.scalar_type() == at::kInt && blocks.is_contiguous() &&
                  blocks.size(0) >= used,
              kOp, ": blocks must be contiguous int32 covering the position");
  const int32_t* ids = blocks.data_ptr<int32_t>();
  for (int64_t b = 0; b < used; ++b) {
    TORCH_CHECK_VALUE(ids[b] >= 0 && ids[b] < keys.size(0), kOp, ": block id ", ids[b],
                      " is outside the pool of ", keys.size(0));
  }
  const float* key_scale_ptr = scales_of(key_scales, keys, kOp, "key_scales");
  const float* value_scale_ptr = scales_of(value_scales, values, kOp, "value_scales");
  at::Tensor out = at::empty({count, heads, dim}, queries.options());
  if (count == 0 || heads == 0) return out;
  const auto problem = [&](auto* pool_type) {
    using T = std::remove_pointer_t<decltype(pool_type)>;
    return ChunkProblem<T>{queries.data_ptr<float>(), own_keys.data_ptr<float>(),
                           own_values.data_ptr<float>(), keys.data_ptr<T>(), key_scale_ptr,
                           values.data_ptr<T>(), value_scale_ptr, ids, out.data_ptr<float>(),
                           count, position, heads, kv_heads, block_size,
                           static_cast<float>(scale)};
  };
  switch (keys.scalar_type()) {
    case at::kChar:
      run_chunk(problem(static_cast<int8_t*>(nullptr)), dim);
      break;
    case at::kFloat:
      run_chunk(problem(static_cast<float*>(nullptr)), dim);
      break;
    default:
      run_chunk(problem(static_cast<c10::BFloat16*>(nullptr)), dim);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen_q8, m) {
  m.def(
      "paged_chunk_attention(Tensor queries, Tensor own_keys, Tensor own_values, Tensor keys, "
      "Tensor? key_scales, Tensor values, Tensor? value_scales, Tensor blocks, int position, "
      "float scale) -> Tensor",
      &paged_chunk_attention);
}
