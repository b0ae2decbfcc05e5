// Greedy sampling: per row of logits, the argmax and (optionally) its log-probability.
//
//   tokens[b]   = argmax_i logits[b, i]     ties -> lowest index; NaN as torch.argmax (first NaN wins)
//   logprobs[b] = logits[b, tokens[b]] - logsumexp_i(logits[b, i])      (fp32)
//
// Reference: trinfer.triton_kernels.references.greedy_sample_ref (torch.argmax / torch.logsumexp).
//
// The vocab is cut into chunks of kGreedyChunk logits; CTA (chunk, row) reduces its chunk to a partial
// {best value, best index, running max, sum of exp(x - max)}. One chunk: the CTA writes the result itself.
// Several: partials go to the workspace and greedy_reduce_kernel (one warp per row) combines them in chunk
// order. So batch 1 with a 128K vocab spreads over ~63 CTAs, and the chunking, hence every bit of a row's
// result, depends only on the vocab size, never on the batch.
#include "common.cuh"

namespace trinfer {
namespace {

constexpr int kThreads = 128;

struct Partial {
  float value;  // best logit (fp32)
  int32_t index;
  float max;    // max logit over the chunk (NaN-ignoring)
  float sum;    // sum of exp(logit - max)
};
static_assert(sizeof(Partial) == 16, "Partial is one 16-byte vector");

// True when candidate (v, i) beats (bv, bi) under torch.argmax's order: NaN above everything, then the larger
// value, then the lower index.
__device__ __forceinline__ bool beats(float v, int32_t i, float bv, int32_t bi) {
  const bool vn = isnan(v), bn = isnan(bv);
  if (vn || bn) return vn && (!bn || i < bi);
  return v > bv || (v == bv && i < bi);
}

// Merge (m2, s2) into the running (m, s) of a log-sum-exp. Infinite maxima are resolved at the end.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty or all -inf
  s = s * expf(m - mn) + s2 * expf(m2 - mn);
  m = mn;
}

__device__ __forceinline__ void merge(Partial& a, const Partial& b) {
  if (beats(b.value, b.index, a.value, a.index)) {
    a.value = b.value;
    a.index = b.index;
  }
  lse_merge(a.max, a.sum, b.max, b.sum);
}

__device__ __forceinline__ Partial shfl_xor(const Partial& p, int o) {
  Partial q;
  q.value = __shfl_xor_sync(kFullMask, p.value, o);
  q.index = __shfl_xor_sync(kFullMask, p.index, o);
  q.max = __shfl_xor_sync(kFullMask, p.max, o);
  q.sum = __shfl_xor_sync(kFullMask, p.sum, o);
  return q;
}

// Every merge is commutative in its result except the order of additions in the sum; the butterfly below
// always adds in the same order, so the result is deterministic.
__device__ __forceinline__ Partial warp_merge(Partial p) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) merge(p, shfl_xor(p, o));
  return p;
}

__device__ __forceinline__ float finish_lse(float m, float s) { return isinf(m) ? m : m + logf(s); }

__device__ __forceinline__ void write_result(const Partial& p, const GreedySampleArgs& a, int64_t row) {
  a.tokens[row * a.tokens_stride] = p.index;
  if (a.logprobs != nullptr) a.logprobs[row * a.logprobs_stride] = p.value - finish_lse(p.max, p.sum);
}

// Fold this thread's G groups of E logits into its partial: group g holds indices first + g * stride + [0, E),
// increasing with g; indices >= vocab are skipped. One rescale of the running sum, one exp per logit.
template <int G, int E>
__device__ __forceinline__ void fold(Partial& p, const float (&f)[G][E], int32_t first, int32_t stride, int32_t vocab) {
  float cmax = -INFINITY;
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int32_t i = first + g * stride + e;
      if (i < vocab) {
        if (beats(f[g][e], i, p.value, p.index)) {
          p.value = f[g][e];
          p.index = i;
        }
        cmax = fmaxf(cmax, f[g][e]);
      }
    }
  if (cmax > p.max) {
    p.sum *= expf(p.max - cmax);
    p.max = cmax;
  }
  if (p.max != -INFINITY) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (first + g * stride + e < vocab) p.sum += expf(f[g][e] - p.max);
  }
}

// VECTOR: 16-byte loads (row start 16-byte aligned); else one element at a time.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kThreads) greedy_partial_kernel(GreedySampleArgs a) {
  using V = Vec<T>;
  constexpr int E = VECTOR ? V::kElems : 1;
  constexpr int kGroups = static_cast<int>(kGreedyChunk) / E / kThreads;  // groups per thread
  static_assert(kGroups * E * kThreads == kGreedyChunk, "chunk is a whole number of groups per thread");
  __shared__ Partial warp_results[kThreads / 32];

  const int64_t row = blockIdx.y;
  const int32_t chunk_start = static_cast<int32_t>(blockIdx.x * kGreedyChunk);
  const int32_t vocab = static_cast<int32_t>(a.vocab);
  const T* logits = static_cast<const T*>(a.logits) + row * a.logits_row_stride;

  // All of a thread's 16-byte loads (16 logits) are issued before any is reduced; scalar loads 8 at a time.
  constexpr int kStep = VECTOR ? kGroups : 8;
  static_assert(kGroups % kStep == 0, "whole steps");
  Partial p{-INFINITY, 0x7fffffff, -INFINITY, 0.0f};
#pragma unroll
  for (int g0 = 0; g0 < kGroups; g0 += kStep) {
    float f[kStep][E];
#pragma unroll
    for (int g = 0; g < kStep; ++g) {
      const int32_t base = chunk_start + (threadIdx.x + (g0 + g) * kThreads) * E;
      if constexpr (VECTOR) {
        if (base + E <= vocab) {
          V v;
          v.raw = load16(logits + base);
          v.to_floats(f[g]);
        } else {
#pragma unroll
          for (int e = 0; e < E; ++e) f[g][e] = base + e < vocab ? to_float(logits[base + e]) : -INFINITY;
        }
      } else {
        f[g][0] = base < vocab ? to_float(__ldg(logits + base)) : -INFINITY;
      }
    }
    fold(p, f, chunk_start + static_cast<int32_t>(threadIdx.x + g0 * kThreads) * E, kThreads * E, vocab);
  }

  p = warp_merge(p);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_results[warp] = p;
  __syncthreads();
  if (warp != 0) return;
  p = lane < kThreads / 32 ? warp_results[lane] : Partial{-INFINITY, 0x7fffffff, -INFINITY, 0.0f};
  p = warp_merge(p);
  if (lane != 0) return;
  if (gridDim.x == 1) {
    write_result(p, a, row);
  } else {
    static_cast<Partial*>(a.workspace)[row * gridDim.x + blockIdx.x] = p;
  }
}

// One warp per row: lane l folds chunks l, l + 32, ... in order, then the butterfly merges the lanes.
__global__ void __launch_bounds__(32) greedy_reduce_kernel(GreedySampleArgs a, int num_chunks) {
  const int64_t row = blockIdx.x;
  const Partial* parts = static_cast<const Partial*>(a.workspace) + row * num_chunks;
  Partial p{-INFINITY, 0x7fffffff, -INFINITY, 0.0f};
  for (int c = threadIdx.x; c < num_chunks; c += 32) merge(p, parts[c]);
  p = warp_merge(p);
  if (threadIdx.x == 0) write_result(p, a, row);
}

template <typename T>
cudaError_t launch(const GreedySampleArgs& a, cudaStream_t stream) {
  const int num_chunks = static_cast<int>(greedy_sample_num_chunks(a.vocab));
  const dim3 grid(num_chunks, static_cast<unsigned>(a.batch));
  const bool vec_ok = aligned16(a.logits) && a.logits_row_stride % Vec<T>::kElems == 0;
  if (vec_ok) {
    greedy_partial_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
  } else {
    greedy_partial_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
  }
  if (num_chunks > 1) greedy_reduce_kernel<<<static_cast<unsigned>(a.batch), 32, 0, stream>>>(a, num_chunks);
  return cudaGetLastError();
}

}  // namespace

int64_t greedy_sample_num_chunks(int64_t vocab) { return vocab <= 0 ? 1 : (vocab + kGreedyChunk - 1) / kGreedyChunk; }

int64_t greedy_sample_workspace_bytes(int64_t batch, int64_t vocab) {
  const int64_t chunks = greedy_sample_num_chunks(vocab);
  return chunks > 1 ? batch * chunks * static_cast<int64_t>(sizeof(Partial)) : 0;
}

cudaError_t greedy_sample(DType dtype, const GreedySampleArgs& args, cudaStream_t stream) {
  if (args.batch <= 0) return cudaSuccess;
  if (args.vocab <= 0 || args.vocab > 0x7fffffff - kGreedyChunk || args.batch > 65535) return cudaErrorInvalidValue;
  if (greedy_sample_workspace_bytes(args.batch, args.vocab) > 0 && (args.workspace == nullptr || !aligned16(args.workspace)))
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto t) { return launch<decltype(t)>(args, stream); });
}

}  // namespace trinfer
