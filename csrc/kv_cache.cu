// KV-cache write: scatter the new tokens' K and V into their cache slots.
//
//   for t with slot = slot_mapping[t] >= 0:
//     k_cache[slot // block_size, slot % block_size] = k[t];  v_cache[...] = v[t]      ([kv_heads, head_dim])
//
// A slot of -1 (padding of a captured batch) is skipped. Reference: the slot formula of
// trinfer/triton_kernels/kv_cache_layout.py. One CTA per token copies that token's K and V rows with 16-byte
// vectors when every row start is 16-byte aligned (contiguous caches, head_dim a multiple of 8 or 4), else
// element by element.
#include "common.cuh"

namespace trinfer {
namespace {

template <typename T, typename SlotT, bool VECTOR>
__global__ void __launch_bounds__(256) write_kv_cache_kernel(WriteKvCacheArgs a) {
  constexpr int E = VECTOR ? Vec<T>::kElems : 1;
  const int64_t t = blockIdx.x;
  const int64_t slot = static_cast<int64_t>(static_cast<const SlotT*>(a.slot_mapping)[t]);
  if (slot < 0) return;
  const int64_t block = slot / a.block_size, offset = slot % a.block_size;
  const T* k = static_cast<const T*>(a.k) + t * a.k_stride_token;
  const T* v = static_cast<const T*>(a.v) + t * a.v_stride_token;
  T* kc = static_cast<T*>(a.k_cache) + block * a.kc_stride_block + offset * a.kc_stride_slot;
  T* vc = static_cast<T*>(a.v_cache) + block * a.vc_stride_block + offset * a.vc_stride_slot;
  const int groups_per_head = static_cast<int>(a.head_dim / E);
  const int groups = static_cast<int>(a.kv_heads) * groups_per_head;
  // Each iteration has the K and the V load in flight before either store.
  for (int j = threadIdx.x; j < groups; j += blockDim.x) {
    const int h = j / groups_per_head, d = (j - h * groups_per_head) * E;
    if constexpr (VECTOR) {
      const uint4 kv = load16(k + h * a.k_stride_head + d);
      const uint4 vv = load16(v + h * a.v_stride_head + d);
      store16(kc + h * a.kc_stride_head + d, kv);
      store16(vc + h * a.vc_stride_head + d, vv);
    } else {
      const T kx = k[h * a.k_stride_head + d];
      const T vx = v[h * a.v_stride_head + d];
      kc[h * a.kc_stride_head + d] = kx;
      vc[h * a.vc_stride_head + d] = vx;
    }
  }
}

template <typename T, typename SlotT>
cudaError_t launch(const WriteKvCacheArgs& a, cudaStream_t stream) {
  constexpr int E = Vec<T>::kElems;
  const bool vec_ok = a.head_dim % E == 0 && aligned16(a.k) && aligned16(a.v) && aligned16(a.k_cache) &&
                      aligned16(a.v_cache) && a.k_stride_token % E == 0 && a.k_stride_head % E == 0 &&
                      a.v_stride_token % E == 0 && a.v_stride_head % E == 0 && a.kc_stride_block % E == 0 &&
                      a.kc_stride_slot % E == 0 && a.kc_stride_head % E == 0 && a.vc_stride_block % E == 0 &&
                      a.vc_stride_slot % E == 0 && a.vc_stride_head % E == 0;
  const int64_t groups = a.kv_heads * a.head_dim / (vec_ok ? E : 1);
  const int threads = groups >= 256 ? 256 : static_cast<int>((groups + 31) / 32 * 32);
  const dim3 grid(static_cast<unsigned>(a.tokens));
  if (vec_ok) {
    write_kv_cache_kernel<T, SlotT, true><<<grid, threads, 0, stream>>>(a);
  } else {
    write_kv_cache_kernel<T, SlotT, false><<<grid, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t write_kv_cache(DType dtype, IndexType slot_type, const WriteKvCacheArgs& args, cudaStream_t stream) {
  if (args.tokens <= 0 || args.kv_heads <= 0 || args.head_dim <= 0) return cudaSuccess;
  if (args.tokens > 0x7fffffff || args.block_size <= 0 || args.kv_heads * args.head_dim > 0x7fffffff)
    return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return slot_type == IndexType::kInt64 ? launch<T, int64_t>(args, stream) : launch<T, int32_t>(args, stream);
  });
}

}  // namespace trinfer
