// Decode attention straight from the paged KV cache, for CPUs.
//
// The gather + SDPA backend copies every request's blocks into a padded tensor per layer and
// step (most of its time on a CPU is that copy). This kernel reads each block where it lies:
// one work item per (request, KV head) computes the scores of the query heads that share that KV
// head, a softmax, and the weighted sum of values, in float32 whatever the cache dtype.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Ask for the head's slice of every slot of a block before it is needed: blocks lie anywhere in
// the cache, beyond what the hardware prefetcher guesses, and reading them is half the time.
template <typename T>
inline void prefetch_block(const T* first, int64_t slots, int64_t token_stride, int64_t dim) {
  for (int64_t o = 0; o < slots; ++o)
    for (int64_t byte = 0; byte < dim * static_cast<int64_t>(sizeof(T)); byte += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(first + o * token_stride) + byte);
}

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// DIM > 0: the head size known at compile time (the inner loops vectorise fully); 0: any size.
template <typename T, int64_t DIM>
void decode(const T* q, int64_t q_token_stride, int64_t q_head_stride,
            const T* k_cache, const T* v_cache, const int64_t* tables, int64_t table_width,
            const int64_t* lengths, const int64_t* rows, T* out, int64_t n_rows,
            int64_t block_size, int64_t q_heads, int64_t kv_heads, int64_t dim_, float scale) {
  const int64_t dim = DIM > 0 ? DIM : dim_;
  const int64_t group = q_heads / kv_heads;
  const int64_t token_stride = kv_heads * dim;  // between consecutive slots of the cache
  // requests differ in context length: hand out work items dynamically, not in equal halves
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores, query(group * dim), acc(group * dim), total(group);
#pragma omp for schedule(dynamic, 2)
    for (int64_t item = 0; item < n_rows * kv_heads; ++item) {
      const int64_t r = item / kv_heads, h = item % kv_heads;
      const int64_t row = rows[r], length = lengths[r];
      const int64_t* table = tables + r * table_width;
      const int64_t n_blocks = (length + block_size - 1) / block_size;
      // the head's slice of block b's first slot in a cache, and how many of its slots hold context
      auto slice = [&](const T* cache, int64_t b) { return cache + table[b] * block_size * token_stride + h * dim; };
      auto slots = [&](int64_t b) { return std::min(block_size, length - b * block_size); };
      for (int64_t g = 0; g < group; ++g) {
        const T* src = q + row * q_token_stride + (h * group + g) * q_head_stride;
        for (int64_t i = 0; i < dim; ++i) query[g * dim + i] = to_float(src[i]) * scale;
      }
      scores.resize(group * length);
      // scores: each key is read once for the query heads that share it
      for (int64_t b = 0; b < n_blocks; ++b) {
        const T* key = slice(k_cache, b);
        const int64_t first = b * block_size, n = slots(b);
        if (b + 1 < n_blocks) prefetch_block(slice(k_cache, b + 1), slots(b + 1), token_stride, dim);
        else prefetch_block(slice(v_cache, 0), slots(0), token_stride, dim);  // the values come next
        for (int64_t o = 0; o < n; ++o, key += token_stride) {
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = query.data() + g * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < dim; ++i) dot += qg[i] * to_float(key[i]);
            scores[g * length + first + o] = dot;
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * length;
        const float peak = *std::max_element(s, s + length);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < length; ++t) {
          s[t] = std::exp(s[t] - peak);
          sum += s[t];
        }
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < n_blocks; ++b) {
        const T* value = slice(v_cache, b);
        const int64_t first = b * block_size, n = slots(b);
        if (b + 1 < n_blocks) prefetch_block(slice(v_cache, b + 1), slots(b + 1), token_stride, dim);
        for (int64_t o = 0; o < n; ++o, value += token_stride) {
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * length + first + o];
            float* a = acc.data() + g * dim;
#pragma omp simd
            for (int64_t i = 0; i < dim; ++i) a[i] += p * to_float(value[i]);
          }
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* dst = out + (row * q_heads + h * group + g) * dim;
        const float inverse = 1.f / total[g];
        for (int64_t i = 0; i < dim; ++i) dst[i] = static_cast<T>(acc[g * dim + i] * inverse);
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
