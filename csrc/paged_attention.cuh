// Paged decode attention, GQA-grouped and split over the KV sequence (flash-decoding), batch-invariant.
//
//   out[b, h] = sum_t softmax_t(scale * q[b, h] . K[b, t]) V[b, t]      t < seq_lens[b]
//
// where K[b, t] is k_cache[block_tables[b, t // bs], t % bs, h // group] (V alike) and group = q_heads / kv_heads.
// Reference: trinfer.triton_kernels.references.paged_decode_attention_ref (fp32 softmax attention over the
// gathered K/V).
//
// CTA (split, kv head * head chunks, sequence) handles KV tokens [split * S, min((split + 1) * S, len)) for up
// to QG query heads of one KV head's group, so each K/V row is read from memory once per group. S (the split
// size, in tokens) is fixed by the caller, never derived from the batch: a sequence's splits, and so every bit
// of its output, are the same whatever else is in the batch.
//
// Inside a CTA, LANES lanes (a "lane group") own one K/V row of HD elements: lane g holds 16-byte vectors
// g, g + LANES, ...; a warp holds 32 / LANES rows at once and each lane has kUnroll rows in flight.
//  1. q . k: each lane dots its slice with each of the QG query heads (q pre-scaled by scale * log2(e), kept in
//     registers), then a butterfly reduce-scatter over the lane group leaves each head's full sum in a lane,
//     which writes the score to shared memory (scores[t][h]).
//  2. Softmax statistics per head over the split (exact max, then exp2 and sum), one warp per head.
//  3. p . V: each lane accumulates p[t][h] * v over its rows for all heads; lane groups, then warps, are summed
//     in a fixed order (deterministic). The result, divided by the sum, is either the output (one split in
//     total) or a normalized fp32 partial with its log2-sum-exp, which paged_decode_reduce_kernel combines.
#pragma once

#include "common.cuh"

namespace trinfer {
namespace decode {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;  // rows in flight per lane group
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int HD>
struct Layout {
  static constexpr int E = Vec<T>::kElems;                       // elements per 16-byte vector
  static constexpr int NVEC = HD / E;                            // vectors per K/V row
  static constexpr int LANES = NVEC >= 32 ? 32 : next_pow2(NVEC);  // lanes per row
  static constexpr int VPL = ceil_div(NVEC, LANES);              // vectors per lane
  static constexpr int GROUPS = kWarps * (32 / LANES);           // rows per CTA per step
  static_assert(HD % E == 0, "head_dim must be a whole number of 16-byte vectors");
};

// Shared memory (floats): scores [S][QG], later reused for the cross-warp sums [kWarps][QG][HD]; then the
// per-head max and sum [2][QG]; then the split's block ids (ints).
template <int HD, int QG>
__host__ __device__ inline int region_floats(int split) {
  const int a = split * QG, b = kWarps * QG * HD;
  return ((a > b ? a : b) + 3) / 4 * 4;
}

template <int HD, int QG>
inline size_t smem_bytes(int split, int block_size) {
  const int max_blocks = (split + block_size - 1) / block_size + 1;
  return sizeof(float) * (region_floats<HD, QG>(split) + 2 * QG) + sizeof(int) * max_blocks;
}

// After the call, each lane holds the lane group's full sum of v[head] for the returned head; lanes with
// (g & (LANES / QG - 1)) == 0 are the first of the lanes holding each head. log2(QG) halving steps, then plain
// butterfly steps: QG - 1 + log2(LANES / QG) shuffles instead of QG * log2(LANES).
template <int QG, int LANES>
__device__ __forceinline__ float reduce_scatter(float (&v)[QG], int g, int& head) {
  static_assert(QG <= LANES, "one head per lane at least");
  head = 0;
  int o = LANES / 2;
#pragma unroll
  for (int cnt = QG; cnt > 1; cnt /= 2) {
    const int half = cnt / 2;
    const bool upper = (g & o) != 0;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float send = upper ? v[i] : v[i + half];
      const float keep = upper ? v[i + half] : v[i];
      v[i] = keep + __shfl_xor_sync(kFullMask, send, o);
    }
    if (upper) head += half;
    o /= 2;
  }
#pragma unroll
  for (; o >= 1; o /= 2) v[0] += __shfl_xor_sync(kFullMask, v[0], o);
  return v[0];
}

template <typename T, int HD, int QG>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(PagedDecodeArgs a, int log2_bs, int group,
                                                                 int head_chunks, int max_splits) {
  using L = Layout<T, HD>;
  constexpr int E = L::E, LANES = L::LANES, VPL = L::VPL, GROUPS = L::GROUPS, NVEC = L::NVEC;
  extern __shared__ float4 smem_raw[];
  float* smem = reinterpret_cast<float*>(smem_raw);

  const int split = blockIdx.x;
  const int kvh = blockIdx.y / head_chunks, h0 = (blockIdx.y % head_chunks) * QG;
  const int nh = group - h0 < QG ? group - h0 : QG;  // query heads of this CTA
  const int qh0 = kvh * group + h0;                   // its first query head
  const int64_t b = blockIdx.z;
  const int S = static_cast<int>(a.split_size);
  const int seq_len = min(a.seq_lens[b], static_cast<int>(a.capacity));
  const int start = split * S;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  if (start >= seq_len) {
    // An empty sequence outputs zeros; with several splits the reduce kernel writes them.
    if (split == 0 && max_splits == 1) {
      T* out = static_cast<T*>(a.out) + b * a.out_stride_batch;
      for (int i = tid; i < nh * HD; i += kThreads) out[(qh0 + i / HD) * a.out_stride_head + i % HD] = from_float<T>(0.0f);
    }
    return;
  }
  const int end = seq_len - start < S ? seq_len : start + S;
  const int n = end - start;

  float* scores = smem;                               // [S][QG]
  float* s_max = smem + region_floats<HD, QG>(S);     // [QG]
  float* s_sum = s_max + QG;                          // [QG]
  int* s_blocks = reinterpret_cast<int*>(s_sum + QG); // block ids of this split's tokens
  const int first_blk = start >> log2_bs;
  const int nblk = ((end - 1) >> log2_bs) - first_blk + 1;
  const int32_t* bt = a.block_tables + b * a.block_tables_stride + first_blk;
  for (int i = tid; i < nblk; i += kThreads) s_blocks[i] = bt[i];

  const int g = lane & (LANES - 1);                 // lane within its group
  const int row0 = warp * (32 / LANES) + lane / LANES;  // this lane group's first row of each step
  const int bs_mask = (1 << log2_bs) - 1;

  // q of the CTA's heads, this lane's slice, scaled so that exp2 of the score is the softmax numerator.
  float q[QG][VPL][E];
  {
    const T* qb = static_cast<const T*>(a.q) + b * a.q_stride_batch;
    const float qscale = a.scale * kLog2e;
#pragma unroll
    for (int h = 0; h < QG; ++h)
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        const int vec = g + v * LANES;
#pragma unroll
        for (int e = 0; e < E; ++e)
          q[h][v][e] = (h < nh && vec < NVEC) ? to_float(qb[(qh0 + h) * a.q_stride_head + vec * E + e]) * qscale : 0.0f;
      }
  }
  __syncthreads();  // s_blocks

  auto row_ptr = [&](const void* cache, int64_t s_block, int64_t s_slot, int64_t s_head, int t) {
    const int tok = start + t;
    const int64_t phys = s_blocks[(tok >> log2_bs) - first_blk];
    return static_cast<const T*>(cache) + phys * s_block + static_cast<int64_t>(tok & bs_mask) * s_slot + kvh * s_head;
  };

  // ---- 1. scores = q . k -------------------------------------------------------------------------------
  for (int base = 0; base < n; base += GROUPS * kUnroll) {  // warp-uniform trip count: shuffles stay converged
    Vec<T> kv[kUnroll][VPL];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + row0 + u * GROUPS;
      const T* row = t < n ? row_ptr(a.k_cache, a.k_stride_block, a.k_stride_slot, a.k_stride_head, t) : nullptr;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        const int vec = g + v * LANES;
        kv[u][v].raw = (row != nullptr && vec < NVEC) ? load16(row + vec * E) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float dot[QG];
#pragma unroll
      for (int h = 0; h < QG; ++h) dot[h] = 0.0f;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        float k[E];
        kv[u][v].to_floats(k);
#pragma unroll
        for (int h = 0; h < QG; ++h)
#pragma unroll
          for (int e = 0; e < E; ++e) dot[h] = fmaf(q[h][v][e], k[e], dot[h]);
      }
      int head;
      const float s = reduce_scatter<QG, LANES>(dot, g, head);
      const int t = base + row0 + u * GROUPS;
      if (t < n && (g & (LANES / QG - 1)) == 0) scores[t * QG + head] = s;
    }
  }
  __syncthreads();

  // ---- 2. softmax statistics per head (log2 domain) ------------------------------------------------------
  for (int h = warp; h < QG; h += kWarps) {
    float m = -INFINITY;
    for (int t = lane; t < n; t += 32) m = fmaxf(m, scores[t * QG + h]);
    m = warp_max(m);
    float l = 0.0f;
    for (int t = lane; t < n; t += 32) {
      const float p = exp2f(scores[t * QG + h] - m);
      scores[t * QG + h] = p;
      l += p;
    }
    l = warp_sum(l);
    if (lane == 0) {
      s_max[h] = m;
      s_sum[h] = l;
    }
  }
  __syncthreads();

  // ---- 3. acc = p . V ----------------------------------------------------------------------------------
  float acc[QG][VPL][E];
#pragma unroll
  for (int h = 0; h < QG; ++h)
#pragma unroll
    for (int v = 0; v < VPL; ++v)
#pragma unroll
      for (int e = 0; e < E; ++e) acc[h][v][e] = 0.0f;

  for (int base = 0; base < n; base += GROUPS * kUnroll) {
    Vec<T> vv[kUnroll][VPL];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + row0 + u * GROUPS;
      const T* row = t < n ? row_ptr(a.v_cache, a.v_stride_block, a.v_stride_slot, a.v_stride_head, t) : nullptr;
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        const int vec = g + v * LANES;
        vv[u][v].raw = (row != nullptr && vec < NVEC) ? load16(row + vec * E) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int t = base + row0 + u * GROUPS;
      if (t < n) {
        float p[QG];
        if constexpr (QG % 4 == 0) {
#pragma unroll
          for (int h = 0; h < QG; h += 4) {
            const float4 p4 = *reinterpret_cast<const float4*>(scores + t * QG + h);
            p[h] = p4.x; p[h + 1] = p4.y; p[h + 2] = p4.z; p[h + 3] = p4.w;
          }
        } else {
#pragma unroll
          for (int h = 0; h < QG; ++h) p[h] = scores[t * QG + h];
        }
#pragma unroll
        for (int v = 0; v < VPL; ++v) {
          float x[E];
          vv[u][v].to_floats(x);
#pragma unroll
          for (int h = 0; h < QG; ++h)
#pragma unroll
            for (int e = 0; e < E; ++e) acc[h][v][e] = fmaf(p[h], x[e], acc[h][v][e]);
        }
      }
    }
  }

  // Sum the lane groups of each warp (butterfly over the group bits of the lane id).
#pragma unroll
  for (int o = LANES; o < 32; o *= 2)
#pragma unroll
    for (int h = 0; h < QG; ++h)
#pragma unroll
      for (int v = 0; v < VPL; ++v)
#pragma unroll
        for (int e = 0; e < E; ++e) acc[h][v][e] += __shfl_xor_sync(kFullMask, acc[h][v][e], o);

  __syncthreads();  // every read of scores is done: the region now holds the per-warp sums
  float* red = smem;  // [kWarps][QG][HD]
  if (lane < LANES) {
#pragma unroll
    for (int h = 0; h < QG; ++h)
#pragma unroll
      for (int v = 0; v < VPL; ++v) {
        const int vec = g + v * LANES;
        if (vec < NVEC) {
          float* dst = red + (warp * QG + h) * HD + vec * E;
#pragma unroll
          for (int e = 0; e < E; e += 4)
            *reinterpret_cast<float4*>(dst + e) = make_float4(acc[h][v][e], acc[h][v][e + 1], acc[h][v][e + 2], acc[h][v][e + 3]);
        }
      }
  }
  __syncthreads();

  for (int i = tid; i < nh * HD; i += kThreads) {
    const int h = i / HD, d = i - h * HD;
    float o = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) o += red[(w * QG + h) * HD + d];
    o = o / s_sum[h];
    if (max_splits == 1) {
      static_cast<T*>(a.out)[b * a.out_stride_batch + (qh0 + h) * a.out_stride_head + d] = from_float<T>(o);
    } else {
      const int64_t ph = (b * a.num_q_heads + qh0 + h) * max_splits + split;
      a.workspace[ph * HD + d] = o;  // partial outputs, then the log2-sum-exps
      if (d == 0) a.workspace[a.batch * a.num_q_heads * max_splits * HD + ph] = s_max[h] + log2f(s_sum[h]);
    }
  }
}

// Launch the split kernel for one (dtype, head_dim); defined in paged_attention.cuh, instantiated per dtype in
// paged_attention_{f32,f16,bf16}.cu so those compile in parallel.
template <typename T>
cudaError_t launch_split_kernel(const PagedDecodeArgs& a, int max_splits, cudaStream_t stream);

template <typename T, int HD, int QG>
cudaError_t launch_hd_qg(const PagedDecodeArgs& a, int log2_bs, int group, int head_chunks, int max_splits,
                         cudaStream_t stream) {
  const size_t smem = smem_bytes<HD, QG>(static_cast<int>(a.split_size), static_cast<int>(a.block_size));
  auto kernel = paged_decode_kernel<T, HD, QG>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(max_splits, static_cast<unsigned>(a.num_kv_heads * head_chunks), static_cast<unsigned>(a.batch));
  kernel<<<grid, kThreads, smem, stream>>>(a, log2_bs, group, head_chunks, max_splits);
  return cudaGetLastError();
}

template <typename T, int HD>
cudaError_t launch_hd(const PagedDecodeArgs& a, int max_splits, cudaStream_t stream) {
  int log2_bs = 0;
  while ((int64_t(1) << log2_bs) < a.block_size) ++log2_bs;
  const int group = static_cast<int>(a.num_q_heads / a.num_kv_heads);
  // Heads per CTA (QG): 1 for MHA, 4 for groups of 2-4, 8 for larger groups (which take group / 8 CTAs, rounded
  // up). The unused head slots cost FMAs only; decode is bound by the K/V bytes, which are read once per CTA.
  // Three sizes instead of every power of two keep the instantiations (and the compile check) small.
  const int qg = group == 1 ? 1 : (group <= 4 ? 4 : 8);
  const int head_chunks = (group + qg - 1) / qg;
  switch (qg) {
    case 1: return launch_hd_qg<T, HD, 1>(a, log2_bs, group, head_chunks, max_splits, stream);
    case 4: return launch_hd_qg<T, HD, 4>(a, log2_bs, group, head_chunks, max_splits, stream);
    default: return launch_hd_qg<T, HD, 8>(a, log2_bs, group, head_chunks, max_splits, stream);
  }
}

template <typename T>
cudaError_t launch_split_kernel(const PagedDecodeArgs& a, int max_splits, cudaStream_t stream) {
  switch (a.head_dim) {
    case 64: return launch_hd<T, 64>(a, max_splits, stream);
    case 80: return launch_hd<T, 80>(a, max_splits, stream);
    case 96: return launch_hd<T, 96>(a, max_splits, stream);
    case 128: return launch_hd<T, 128>(a, max_splits, stream);
    case 256: return launch_hd<T, 256>(a, max_splits, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern template cudaError_t launch_split_kernel<float>(const PagedDecodeArgs&, int, cudaStream_t);
extern template cudaError_t launch_split_kernel<__half>(const PagedDecodeArgs&, int, cudaStream_t);
extern template cudaError_t launch_split_kernel<__nv_bfloat16>(const PagedDecodeArgs&, int, cudaStream_t);

}  // namespace decode
}  // namespace trinfer
