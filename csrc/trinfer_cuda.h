// trinfer's CUDA C++ kernels: the host-side launch API.
//
// This header is the only interface between the kernels (csrc/*.cu, which include nothing but CUDA
// headers and this file) and the torch glue (csrc/torch_bindings.cpp, which needs a CUDA build of torch).
// Keeping torch out of the kernel files lets the compile check build every kernel with plain nvcc on a
// machine whose torch is a CPU build.
//
// Every launcher enqueues its kernels on `stream`, allocates nothing, never synchronizes (so it can be
// captured in a CUDA graph) and returns cudaGetLastError(). Workspaces are allocated by the caller; their
// sizes come from the *_workspace_* helpers below. Strides are in elements; the last dim of every tensor
// is contiguous. Arguments are validated by the caller (the glue and the Python wrappers); a launcher
// returns cudaErrorInvalidValue for a configuration it has no kernel for.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace trinfer {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class IndexType : int32_t { kInt32 = 0, kInt64 = 1 };

// ---- rms_norm / fused_add_rms_norm (csrc/rms_norm.cu) -------------------------------------------
// out = weight * cast(x_fp32 * rsqrt(mean(x_fp32^2) + eps)); with residual != nullptr, first
// residual = cast(x + residual) (stored back) and the sum is normalized. Rows of `cols` elements.
struct RmsNormArgs {
  const void* x;
  int64_t x_row_stride;
  void* residual;  // nullptr: plain rms_norm
  int64_t residual_row_stride;
  const void* weight;  // [cols]
  void* out;
  int64_t out_row_stride;
  int64_t rows;
  int64_t cols;
  float eps;
};
cudaError_t rms_norm(DType dtype, const RmsNormArgs& args, cudaStream_t stream);

// ---- greedy_sample (csrc/sampling.cu) ------------------------------------------------------------
// tokens[b] = argmax(logits[b, :]) (ties and NaN as torch.argmax: the lowest index wins, the first NaN
// beats any number); logprobs[b] = logits[b, tokens[b]] - logsumexp(logits[b, :]) in fp32 when
// logprobs != nullptr. The vocab is cut into chunks of kGreedyChunk entries, one CTA each (the chunking
// depends on the vocab only, so a row's result never depends on the batch); with more than one chunk a
// second kernel reduces the per-chunk partials kept in the workspace.
constexpr int64_t kGreedyChunk = 2048;
int64_t greedy_sample_num_chunks(int64_t vocab);
int64_t greedy_sample_workspace_bytes(int64_t batch, int64_t vocab);  // 0 when one chunk covers the vocab
struct GreedySampleArgs {
  const void* logits;
  int64_t logits_row_stride;
  int64_t* tokens;      // [batch] int64 (as torch.argmax)
  int64_t tokens_stride;
  float* logprobs;      // [batch] or nullptr
  int64_t logprobs_stride;
  void* workspace;      // greedy_sample_workspace_bytes() bytes, 16-byte aligned (nullptr when that is 0)
  int64_t batch;
  int64_t vocab;        // < 2^31 - kGreedyChunk
};
cudaError_t greedy_sample(DType dtype, const GreedySampleArgs& args, cudaStream_t stream);

// ---- write_kv_cache (csrc/kv_cache.cu) -----------------------------------------------------------
// For each token t with slot = slot_mapping[t] >= 0: cache[slot // block_size, slot % block_size] = new
// (for K and V); a slot of -1 is skipped. k, v: [tokens, kv_heads, head_dim]; caches:
// [num_blocks, block_size, kv_heads, head_dim].
struct WriteKvCacheArgs {
  const void* k;
  int64_t k_stride_token, k_stride_head;
  const void* v;
  int64_t v_stride_token, v_stride_head;
  void* k_cache;
  int64_t kc_stride_block, kc_stride_slot, kc_stride_head;
  void* v_cache;
  int64_t vc_stride_block, vc_stride_slot, vc_stride_head;
  const void* slot_mapping;  // [tokens], int32 or int64
  int64_t tokens;
  int64_t kv_heads;
  int64_t head_dim;
  int64_t block_size;
};
cudaError_t write_kv_cache(DType dtype, IndexType slot_type, const WriteKvCacheArgs& args, cudaStream_t stream);

// ---- paged_decode_attention (csrc/paged_attention*.cu) ---------------------------------------------
// One query token per sequence: out[b, h] = softmax(scale * q[b, h] . K[b]^T) V[b] over the first
// min(seq_lens[b], capacity) tokens of sequence b, whose slots come from its row of block_tables. Grid: one
// CTA per (KV split, KV head, sequence), serving up to 8 query heads of that KV head's group. The KV splits
// are `split_size` tokens long whatever the batch, so results are batch-invariant. With max_splits > 1 the
// CTAs write normalized fp32 partial outputs and their log2-sum-exp to the workspace and a second kernel
// combines them in split order; with max_splits == 1 they write `out` directly (the same bits).
// A sequence of length 0 gets zeros. Head dims 64, 80, 96, 128, 256.
//
// Workspace (fp32, the Triton twin's layout): partial outputs [batch][q_heads][max_splits][head_dim], then
// log2-sum-exps [batch][q_heads][max_splits]; paged_decode_workspace_floats() elements, 0 for one split.
bool paged_decode_supports_head_dim(int64_t head_dim);
int64_t paged_decode_workspace_floats(int64_t batch, int64_t num_q_heads, int64_t head_dim, int64_t max_splits);
constexpr int64_t kMaxDecodeSplit = 4096;  // shared memory holds a split's scores for up to 8 heads
struct PagedDecodeArgs {
  const void* q;  // [batch, num_q_heads, head_dim]
  int64_t q_stride_batch, q_stride_head;
  const void* k_cache;  // [num_blocks, block_size, num_kv_heads, head_dim], rows 16-byte aligned
  int64_t k_stride_block, k_stride_slot, k_stride_head;
  const void* v_cache;
  int64_t v_stride_block, v_stride_slot, v_stride_head;
  const int32_t* block_tables;  // [batch, max_blocks]
  int64_t block_tables_stride;
  const int32_t* seq_lens;  // [batch]
  void* out;  // [batch, num_q_heads, head_dim], q's dtype
  int64_t out_stride_batch, out_stride_head;
  float* workspace;  // paged_decode_workspace_floats() fp32 (unused with one split)
  int64_t batch;
  int64_t num_q_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  int64_t block_size;  // a power of two
  int64_t max_splits;  // splits in the grid: ceil(max_seq_len / split_size) for the caller's host bound
  int64_t split_size;  // KV tokens per split, 1..kMaxDecodeSplit
  int64_t capacity;    // min(max_blocks * block_size, max_splits * split_size): lengths are clamped to it
  float scale;
};
cudaError_t paged_decode_attention(DType dtype, const PagedDecodeArgs& args, cudaStream_t stream);

}  // namespace trinfer
