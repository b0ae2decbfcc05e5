// Split-KV paged decode kernels for one dtype (__nv_bfloat16), every head_dim and heads-per-CTA (see paged_attention.cuh).
// One file per dtype so that the three compile in parallel.
#include "paged_attention.cuh"

namespace trinfer {
namespace decode {
template cudaError_t launch_split_kernel<__nv_bfloat16>(const PagedDecodeArgs&, int, cudaStream_t);
}  // namespace decode
}  // namespace trinfer
