// Decode attention straight from the paged KV cache, for CPUs.
//
// The gather + SDPA backend copies every request's blocks into a padded tensor per layer and
// step (most of its time on a CPU is that copy). This kernel reads each block where it lies:
// one work item per request computes the scores of all its query heads, a softmax, and the
// weighted sum of values, in float32 whatever the cache dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Ask for a block's slots before they are needed: blocks lie anywhere in the cache, beyond what
// the hardware prefetcher guesses. A block's slots are contiguous (every KV head of a slot, then
// the next slot), so this is one run of ``bytes``.
inline void prefetch(const void* first, int64_t bytes) {
  for (int64_t byte = 0; byte < bytes; byte += 64) __builtin_prefetch(static_cast<const char*>(first) + byte);
}

constexpr int64_t PREFETCH_BLOCKS = 16;

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// DIM > 0: the head size known at compile time (the inner loops vectorise fully); 0: any size.
// One work item per request: it reads each of its blocks once, whole (all KV heads of every slot,
// contiguous), for the scores of all query heads, then once more for the values. Reading whole
// blocks instead of one head's strided slice at a time keeps the reads sequential.
template <typename T, int64_t DIM>
void decode(const T* q, int64_t q_token_stride, int64_t q_head_stride,
            const T* k_cache, const T* v_cache, const int64_t* tables, int64_t table_width,
            const int64_t* lengths, const int64_t* rows, T* out, int64_t n_rows,
            int64_t block_size, int64_t q_heads, int64_t kv_heads, int64_t dim_, float scale) {
  const int64_t dim = DIM > 0 ? DIM : dim_;
  const int64_t group = q_heads / kv_heads;
  const int64_t token_stride = kv_heads * dim;  // between consecutive slots of the cache
  const int64_t slot_bytes = token_stride * static_cast<int64_t>(sizeof(T));
  // fewer requests than threads (a lone request, say): each request's KV heads are split into
  // parts, so that every thread has work
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::min(kv_heads, std::max<int64_t>(1, (threads + n_rows - 1) / n_rows));
  // requests differ in context length: hand out work items dynamically, not in equal halves
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores, query(q_heads * dim), acc(q_heads * dim), total(q_heads);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_rows * parts; ++item) {
      const int64_t r = item / parts, part = item % parts;
      // the query heads of this item: those sharing KV heads [part * kv_heads / parts, ...)
      const int64_t h0 = part * kv_heads / parts * group, h1 = (part + 1) * kv_heads / parts * group;
      const int64_t row = rows[r], length = lengths[r];
      const int64_t* table = tables + r * table_width;
      const int64_t n_blocks = (length + block_size - 1) / block_size;
      auto block = [&](const T* cache, int64_t b) { return cache + table[b] * block_size * token_stride; };
      auto slots = [&](int64_t b) { return std::min(block_size, length - b * block_size); };
      // the first PREFETCH_BLOCKS blocks of keys and values asked for at once, before any is read,
      // then each pass asks as far ahead of the block it reads. From DRAM (a pass over the step's
      // weights has pushed the cache out of the CPU's caches by the time a layer comes round
      // again), waiting on one block's latency after another read 10-13 GB/s of a 40 GB/s memory
      // here. PREFETCH_BLOCKS blocks of both (0.4 MB for SmolLM2) fit in a core's L2.
      for (int64_t b = 0; b < std::min(n_blocks, PREFETCH_BLOCKS); ++b) {
        prefetch(block(k_cache, b), slots(b) * slot_bytes);
        prefetch(block(v_cache, b), slots(b) * slot_bytes);
      }
      for (int64_t head = h0; head < h1; ++head) {
        const T* src = q + row * q_token_stride + head * q_head_stride;
        for (int64_t i = 0; i < dim; ++i) query[head * dim + i] = to_float(src[i]) * scale;
      }
      scores.resize(q_heads * length);
      // scores: each key is read once for the query heads that share it
      for (int64_t b = 0; b < n_blocks; ++b) {
        const T* key = block(k_cache, b);
        const int64_t first = b * block_size, n = slots(b);
        if (b + PREFETCH_BLOCKS < n_blocks) prefetch(block(k_cache, b + PREFETCH_BLOCKS), slots(b + PREFETCH_BLOCKS) * slot_bytes);
        for (int64_t o = 0; o < n; ++o, key += token_stride) {
          for (int64_t head = h0; head < h1; ++head) {
            const float* qh = query.data() + head * dim;
            const T* kh = key + (head / group) * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < dim; ++i) dot += qh[i] * to_float(kh[i]);
            scores[head * length + first + o] = dot;
          }
        }
      }
      for (int64_t head = h0; head < h1; ++head) {
        float* s = scores.data() + head * length;
        const float peak = *std::max_element(s, s + length);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < length; ++t) {
          s[t] = std::exp(s[t] - peak);
          sum += s[t];
        }
        total[head] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < n_blocks; ++b) {
        const T* value = block(v_cache, b);
        const int64_t first = b * block_size, n = slots(b);
        if (b + PREFETCH_BLOCKS < n_blocks) prefetch(block(v_cache, b + PREFETCH_BLOCKS), slots(b + PREFETCH_BLOCKS) * slot_bytes);
        for (int64_t o = 0; o < n; ++o, value += token_stride) {
          for (int64_t head = h0; head < h1; ++head) {
            const float p = scores[head * length + first + o];
            const T* vh = value + (head / group) * dim;
            float* a = acc.data() + head * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) a[i] += p * to_float(vh[i]);
          }
        }
      }
      for (int64_t head = h0; head < h1; ++head) {
        T* dst = out + (row * q_heads + head) * dim;
        const float inverse = 1.f / total[head];
        for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<T>(acc[head * dim + i] * inverse);
      }
    }
  }
}

}  // namespace

// query [tokens, q_heads, dim] (last dim contiguous); caches [blocks, block_size, kv_heads, dim]
// contiguous; tables [rows, width] and lengths [rows] int64; rows: packed token index of each
// request; out [tokens, q_heads, dim] contiguous, written at ``rows`` only.
void paged_decode(torch::Tensor query, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor tables,
                  torch::Tensor lengths, torch::Tensor rows, torch::Tensor out, double scale) {
  TORCH_CHECK(query.stride(2) == 1, "query's last dimension must be contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && out.is_contiguous(), "caches and out must be contiguous");
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lengths.scalar_type() == torch::kLong && rows.scalar_type() == torch::kLong,
              "tables, lengths and rows must be int64");
  TORCH_CHECK(query.scalar_type() == k_cache.scalar_type() && out.scalar_type() == query.scalar_type(), "dtypes differ");
  const int64_t q_heads = query.size(1), kv_heads = k_cache.size(2), dim = query.size(2);
  TORCH_CHECK(q_heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  auto t = tables.contiguous(), l = lengths.contiguous(), r = rows.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto kernel) {
      kernel(query.data_ptr<scalar_t>(), query.stride(0), query.stride(1), k_cache.data_ptr<scalar_t>(),
             v_cache.data_ptr<scalar_t>(), t.data_ptr<int64_t>(), t.size(1), l.data_ptr<int64_t>(),
             r.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), r.size(0), k_cache.size(1), q_heads, kv_heads,
             dim, static_cast<float>(scale));
    };
    if (dim == 64) run(decode<scalar_t, 64>);
    else if (dim == 128) run(decode<scalar_t, 128>);
    else run(decode<scalar_t, 0>);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV cache");
}
