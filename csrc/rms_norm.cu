// RMSNorm and fused residual-add + RMSNorm, one row per CTA (Hugging Face LlamaRMSNorm casts):
//
//   y = weight * cast_T(x_fp32 * rsqrt(mean(x_fp32^2) + eps))     (the product rounded to T once)
//
// With a residual, x = cast_T(x + residual) is computed first, stored back to `residual`, and normalized.
// Reference: trinfer.triton_kernels.references.rms_norm_ref / fused_add_rms_norm_ref.
//
// Two kernels:
//  - rms_norm_vec_kernel: rows that are 16-byte aligned and at most 2048 16-byte vectors long (every
//    real hidden size). Each thread keeps its ITERS vectors of the row in registers, so the row is read
//    from memory once; all loads (x, residual, weight) are issued before the first use.
//  - rms_norm_stream_kernel: anything else (odd lengths, unaligned slices, longer rows); reads the row
//    twice, the second time from L1/L2, with 16-byte vectors where the row allows it.
#include "common.cuh"

namespace trinfer {
namespace {

// ITERS (1 or 2) vectors per thread, up to 1024 threads: 2 x 3 x 16 bytes live fit in the 64 registers
// that 1024 threads leave each.
template <typename T, int ITERS, bool HAS_RES>
__global__ void __launch_bounds__(1024) rms_norm_vec_kernel(RmsNormArgs a) {
  using V = Vec<T>;
  constexpr int E = V::kElems;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = static_cast<int>(a.cols / E);
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  T* res = HAS_RES ? static_cast<T*>(a.residual) + row * a.residual_row_stride : nullptr;
  const T* w = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out) + row * a.out_row_stride;

  V xv[ITERS], rv[ITERS], wv[ITERS];
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) {
      xv[k].raw = load16(x + j * E);
      if constexpr (HAS_RES) rv[k].raw = *reinterpret_cast<const uint4*>(res + j * E);
      wv[k].raw = load16(w + j * E);
    }
  }

  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) {
      float f[E];
      xv[k].to_floats(f);
      if constexpr (HAS_RES) {
        float r[E];
        rv[k].to_floats(r);
#pragma unroll
        for (int e = 0; e < E; ++e) f[e] += r[e];
        xv[k].from_floats(f);  // round the sum to T, as `residual + x` does in the model dtype
        store16(res + j * E, xv[k].raw);
        xv[k].to_floats(f);
      }
#pragma unroll
      for (int e = 0; e < E; ++e) ss = fmaf(f[e], f[e], ss);
    }
  }
  ss = block_sum(ss, scratch);
  const float rstd = rsqrtf(ss / static_cast<float>(a.cols) + a.eps);

#pragma unroll
  for (int k = 0; k < ITERS; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < nvec) {
      float f[E], g[E];
      xv[k].to_floats(f);
      wv[k].to_floats(g);
#pragma unroll
      for (int e = 0; e < E; ++e) f[e] = round_to<T>(f[e] * rstd) * g[e];
      V o;
      o.from_floats(f);
      store16(out + j * E, o.raw);
    }
  }
}

// Elementwise on groups of E elements: E = Vec<T>::kElems with 16-byte loads (VECTOR), else E = 1.
template <typename T, bool VECTOR, bool HAS_RES>
__global__ void __launch_bounds__(1024) rms_norm_stream_kernel(RmsNormArgs a) {
  using V = Vec<T>;
  constexpr int E = VECTOR ? V::kElems : 1;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int64_t ngroups = a.cols / E;
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  T* res = HAS_RES ? static_cast<T*>(a.residual) + row * a.residual_row_stride : nullptr;
  const T* w = static_cast<const T*>(a.weight);
  T* out = static_cast<T*>(a.out) + row * a.out_row_stride;

  auto load = [](const T* p, float (&f)[E]) {
    if constexpr (VECTOR) {
      V v;
      v.raw = *reinterpret_cast<const uint4*>(p);
      v.to_floats(f);
    } else {
      f[0] = to_float(*p);
    }
  };
  auto store = [](T* p, const float (&f)[E]) {
    if constexpr (VECTOR) {
      V v;
      v.from_floats(f);
      store16(p, v.raw);
    } else {
      *p = from_float<T>(f[0]);
    }
  };

  float ss = 0.0f;
  for (int64_t j = threadIdx.x; j < ngroups; j += blockDim.x) {
    float f[E];
    load(x + j * E, f);
    if constexpr (HAS_RES) {
      float r[E];
      load(res + j * E, r);
#pragma unroll
      for (int e = 0; e < E; ++e) f[e] = round_to<T>(f[e] + r[e]);
      store(res + j * E, f);
    }
#pragma unroll
    for (int e = 0; e < E; ++e) ss = fmaf(f[e], f[e], ss);
  }
  ss = block_sum(ss, scratch);
  const float rstd = rsqrtf(ss / static_cast<float>(a.cols) + a.eps);
  // With a residual each thread rereads exactly the elements it wrote above: its own writes are visible.
  for (int64_t j = threadIdx.x; j < ngroups; j += blockDim.x) {
    float f[E], g[E];
    load(HAS_RES ? res + j * E : x + j * E, f);
    load(w + j * E, g);
#pragma unroll
    for (int e = 0; e < E; ++e) f[e] = round_to<T>(f[e] * rstd) * g[e];
    store(out + j * E, f);
  }
}

int round_up32(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

template <typename T, bool HAS_RES>
cudaError_t launch(const RmsNormArgs& a, cudaStream_t stream) {
  constexpr int E = Vec<T>::kElems;
  const bool vec_ok = a.cols % E == 0 && aligned16(a.x) && aligned16(a.weight) && aligned16(a.out) &&
                      a.x_row_stride % E == 0 && a.out_row_stride % E == 0 &&
                      (!HAS_RES || (aligned16(a.residual) && a.residual_row_stride % E == 0));
  const int64_t nvec = a.cols / E;
  const dim3 grid(static_cast<unsigned>(a.rows));
  if (vec_ok && nvec <= 2048) {
    if (nvec <= 1024) {
      rms_norm_vec_kernel<T, 1, HAS_RES><<<grid, round_up32(nvec), 0, stream>>>(a);
    } else {
      rms_norm_vec_kernel<T, 2, HAS_RES><<<grid, round_up32((nvec + 1) / 2), 0, stream>>>(a);
    }
  } else {
    const int64_t groups = vec_ok ? nvec : a.cols;
    const int threads = round_up32(groups < 128 ? groups : (groups / 4 > 1024 ? 1024 : (groups / 4 < 128 ? 128 : groups / 4)));
    if (vec_ok) {
      rms_norm_stream_kernel<T, true, HAS_RES><<<grid, threads, 0, stream>>>(a);
    } else {
      rms_norm_stream_kernel<T, false, HAS_RES><<<grid, threads, 0, stream>>>(a);
    }
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t rms_norm(DType dtype, const RmsNormArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.cols <= 0) return cudaSuccess;
  if (args.rows > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    return args.residual != nullptr ? launch<T, true>(args, stream) : launch<T, false>(args, stream);
  });
}

}  // namespace trinfer
