// Paged decode attention: the entry point and the kernel that combines the KV splits.
// The split kernels are in paged_attention.cuh (instantiated in paged_attention_{f32,f16,bf16}.cu).
//
// Combining the splits of one (sequence, query head), with lse_i in log2 units and o_i normalized per split:
//   M = max_i lse_i,  w_i = exp2(lse_i - M),  out = (sum_i w_i o_i) / (sum_i w_i)
// summed in split order. With a single split, w = 1 and out = o exactly, so a sequence that fits in one split
// gets the same bits whether the grid has one split (the split kernel writes `out`) or many (this kernel
// does): a sequence's output never depends on the host bound max_splits, hence not on the batch around it.
#include "paged_attention.cuh"

namespace trinfer {
namespace {

constexpr int kReduceThreads = 128;

// CTA (query head, sequence). Every thread walks the splits in order for its output dims, recomputing the
// weights (n exp2 per thread, n <= max_splits), so the sums are in one fixed order and no shared buffer
// limits the number of splits.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) paged_decode_reduce_kernel(PagedDecodeArgs a, int max_splits) {
  __shared__ float scratch[kReduceThreads / 32];
  const int h = blockIdx.x;
  const int64_t b = blockIdx.y;
  const int HD = static_cast<int>(a.head_dim);
  const int seq_len = min(a.seq_lens[b], static_cast<int>(a.capacity));
  const int S = static_cast<int>(a.split_size);
  const int n = seq_len <= 0 ? 0 : (seq_len + S - 1) / S;  // <= max_splits: capacity <= max_splits * S
  T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + h * a.out_stride_head;
  if (n == 0) {
    for (int d = threadIdx.x; d < HD; d += kReduceThreads) out[d] = from_float<T>(0.0f);
    return;
  }
  const int64_t ph = (b * a.num_q_heads + h) * max_splits;
  const float* part = a.workspace + ph * HD;
  const float* lse = a.workspace + a.batch * a.num_q_heads * max_splits * HD + ph;

  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += kReduceThreads) m = fmaxf(m, lse[i]);
  m = warp_max(m);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
  __syncthreads();
  m = scratch[0];
#pragma unroll
  for (int w = 1; w < kReduceThreads / 32; ++w) m = fmaxf(m, scratch[w]);

  for (int d = threadIdx.x; d < HD; d += kReduceThreads) {
    float num = 0.0f, den = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float w = lse[i] == m ? 1.0f : exp2f(lse[i] - m);  // exactly 1 for the largest (or only) split
      num = fmaf(w, part[int64_t(i) * HD + d], num);
      den += w;
    }
    out[d] = from_float<T>(num / den);
  }
}

template <typename T>
cudaError_t launch(const PagedDecodeArgs& a, cudaStream_t stream) {
  const int max_splits = static_cast<int>(a.max_splits);
  cudaError_t err = decode::launch_split_kernel<T>(a, max_splits, stream);
  if (err != cudaSuccess || max_splits == 1) return err;
  const dim3 grid(static_cast<unsigned>(a.num_q_heads), static_cast<unsigned>(a.batch));
  paged_decode_reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(a, max_splits);
  return cudaGetLastError();
}

}  // namespace

int64_t paged_decode_workspace_floats(int64_t batch, int64_t num_q_heads, int64_t head_dim, int64_t max_splits) {
  return max_splits <= 1 ? 0 : batch * num_q_heads * max_splits * (head_dim + 1);
}

bool paged_decode_supports_head_dim(int64_t head_dim) {
  return head_dim == 64 || head_dim == 80 || head_dim == 96 || head_dim == 128 || head_dim == 256;
}

cudaError_t paged_decode_attention(DType dtype, const PagedDecodeArgs& args, cudaStream_t stream) {
  if (args.batch <= 0 || args.num_q_heads <= 0) return cudaSuccess;
  const int64_t group = args.num_kv_heads > 0 ? args.num_q_heads / args.num_kv_heads : 0;
  const int64_t ctas_y = args.num_kv_heads * ((group + 7) / 8);
  const bool ok = paged_decode_supports_head_dim(args.head_dim) && args.num_kv_heads > 0 &&
                  args.num_q_heads % args.num_kv_heads == 0 && ctas_y <= 65535 && args.block_size > 0 &&
                  (args.block_size & (args.block_size - 1)) == 0 && args.split_size > 0 &&
                  args.split_size <= kMaxDecodeSplit && args.batch <= 65535 && args.max_splits >= 1 &&
                  args.max_splits <= 0x7fffffff &&
                  args.capacity >= 0 && args.capacity <= 0x7fffffff &&
                  (args.max_splits == 1 || args.workspace != nullptr);
  if (!ok) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    // Every K/V row is read with 16-byte vectors.
    constexpr int64_t E = Vec<T>::kElems;
    const bool rows_aligned = aligned16(args.k_cache) && aligned16(args.v_cache) && args.k_stride_block % E == 0 &&
                              args.k_stride_slot % E == 0 && args.k_stride_head % E == 0 &&
                              args.v_stride_block % E == 0 && args.v_stride_slot % E == 0 &&
                              args.v_stride_head % E == 0;
    return rows_aligned ? launch<T>(args, stream) : cudaErrorInvalidValue;
  });
}

}  // namespace trinfer
