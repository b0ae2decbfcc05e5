// torch glue for the CUDA C++ kernels: registers the `trinfer_cuda` custom ops and their CUDA implementations.
//
// Each op is an out-variant (outputs are passed in, annotated as mutated in its schema (taken here as const
// Tensor&: the handle is const, the data is written), and it returns nothing), launches on the current CUDA stream of the tensors' device, and never synchronizes, so callers
// compile with torch.compile(fullgraph=True) and capture CUDA graphs. Workspaces come from torch's caching
// allocator on the current stream (graph-safe). Fake (meta) implementations are registered from Python
// (trinfer/cuda_kernels/__init__.py) once this library is loaded.
//
// The Python wrappers validate every argument with the Triton backend's helpers; the TORCH_CHECKs here only
// guard the launch contract (CUDA device, dtypes, 16-byte row alignment) against direct torch.ops calls.
// Built only where torch has CUDA: see setup.py and trinfer.cuda_kernels.load_jit().
#include <Python.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "trinfer_cuda.h"

namespace {

using at::Tensor;

trinfer::DType kernel_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return trinfer::DType::kFloat32;
    case at::kHalf: return trinfer::DType::kFloat16;
    case at::kBFloat16: return trinfer::DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": expected dtype float32/float16/bfloat16, got ", t.scalar_type());
  }
}

trinfer::IndexType index_type(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kInt: return trinfer::IndexType::kInt32;
    case at::kLong: return trinfer::IndexType::kInt64;
    default: TORCH_CHECK(false, name, ": expected dtype int32/int64, got ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, ": expected device ", like.device(), ", got ", t.device());
}

void check_last_dim(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name, ": expected the last dim to be contiguous");
}

Tensor workspace(int64_t bytes, const Tensor& like) {
  return at::empty({bytes > 0 ? bytes : 0}, like.options().dtype(at::kByte));
}

void launch_rms_norm(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight, const Tensor& out,
                     double eps) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && weight.dim() == 1, "rms_norm: expected 2-d x/out and 1-d weight");
  TORCH_CHECK(out.sizes() == x.sizes() && weight.size(0) == x.size(1), "rms_norm: shape mismatch");
  check_cuda(x, x, "x");
  check_cuda(weight, x, "weight");
  check_cuda(out, x, "out");
  for (const Tensor* t : {&x, &weight, &out}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "rms_norm: x, weight and out must share a dtype");
    check_last_dim(*t, "rms_norm operand");
  }
  if (residual) {
    check_cuda(*residual, x, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type(),
                "residual: expected x's shape and dtype");
    check_last_dim(*residual, "residual");
  }
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  trinfer::RmsNormArgs a{};
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.residual = residual ? residual->data_ptr() : nullptr;
  a.residual_row_stride = residual ? residual->stride(0) : 0;
  a.weight = weight.data_ptr();
  a.out = out.data_ptr();
  a.out_row_stride = out.stride(0);
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.eps = static_cast<float>(eps);
  C10_CUDA_CHECK(trinfer::rms_norm(kernel_dtype(x, "x"), a, c10::cuda::getCurrentCUDAStream()));
}

void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& out, double eps) {
  launch_rms_norm(x, std::nullopt, weight, out, eps);
}

void fused_add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, const Tensor& out, double eps) {
  launch_rms_norm(x, residual, weight, out, eps);
}

void launch_greedy_sample(const Tensor& logits, const Tensor& out_ids, const std::optional<Tensor>& out_logprobs) {
  TORCH_CHECK(logits.dim() == 2, "logits: expected [batch, vocab], got ", logits.dim(), " dims");
  check_cuda(logits, logits, "logits");
  check_last_dim(logits, "logits");
  kernel_dtype(logits, "logits");
  check_cuda(out_ids, logits, "out_ids");
  TORCH_CHECK(out_ids.scalar_type() == at::kLong && out_ids.dim() == 1 && out_ids.size(0) == logits.size(0),
              "out_ids: expected an int64 [batch] tensor");
  if (out_logprobs) {
    check_cuda(*out_logprobs, logits, "out_logprobs");
    TORCH_CHECK(out_logprobs->scalar_type() == at::kFloat && out_logprobs->dim() == 1 &&
                    out_logprobs->size(0) == logits.size(0),
                "out_logprobs: expected a float32 [batch] tensor");
  }
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  if (batch == 0) return;
  TORCH_CHECK(vocab > 0 && vocab < (int64_t(1) << 30), "logits: expected a vocab in [1, 2^30), got ", vocab);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor ws = workspace(trinfer::greedy_sample_workspace_bytes(batch, vocab), logits);
  trinfer::GreedySampleArgs a{};
  a.logits = logits.data_ptr();
  a.logits_row_stride = logits.stride(0);
  a.tokens = out_ids.data_ptr<int64_t>();
  a.tokens_stride = out_ids.stride(0);
  a.logprobs = out_logprobs ? out_logprobs->data_ptr<float>() : nullptr;
  a.logprobs_stride = out_logprobs ? out_logprobs->stride(0) : 0;
  a.workspace = ws.numel() > 0 ? ws.data_ptr() : nullptr;
  a.batch = batch;
  a.vocab = vocab;
  C10_CUDA_CHECK(trinfer::greedy_sample(kernel_dtype(logits, "logits"), a, c10::cuda::getCurrentCUDAStream()));
}

void greedy_sample(const Tensor& logits, const Tensor& out_ids) { launch_greedy_sample(logits, out_ids, std::nullopt); }

void greedy_sample_logprobs(const Tensor& logits, const Tensor& out_ids, const Tensor& out_logprobs) {
  launch_greedy_sample(logits, out_ids, out_logprobs);
}

void write_kv_cache(const Tensor& k, const Tensor& v, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k, v: expected equal [tokens, kv_heads, head_dim] shapes");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "k_cache, v_cache: expected equal [num_blocks, block_size, kv_heads, head_dim] shapes");
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "k_cache: heads/head_dim differ from k");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), "slot_mapping: expected [tokens]");
  for (const Tensor* t : {&k, &v, &k_cache, &v_cache}) {
    check_cuda(*t, k, "write_kv_cache operand");
    TORCH_CHECK(t->scalar_type() == k.scalar_type(), "write_kv_cache: k, v and the caches must share a dtype");
    check_last_dim(*t, "write_kv_cache operand");
  }
  check_cuda(slot_mapping, k, "slot_mapping");
  if (k.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(k.device());
  trinfer::WriteKvCacheArgs a{};
  a.k = k.data_ptr();
  a.k_stride_token = k.stride(0);
  a.k_stride_head = k.stride(1);
  a.v = v.data_ptr();
  a.v_stride_token = v.stride(0);
  a.v_stride_head = v.stride(1);
  a.k_cache = k_cache.data_ptr();
  a.kc_stride_block = k_cache.stride(0);
  a.kc_stride_slot = k_cache.stride(1);
  a.kc_stride_head = k_cache.stride(2);
  a.v_cache = v_cache.data_ptr();
  a.vc_stride_block = v_cache.stride(0);
  a.vc_stride_slot = v_cache.stride(1);
  a.vc_stride_head = v_cache.stride(2);
  a.slot_mapping = slot_mapping.data_ptr();
  a.tokens = k.size(0);
  a.kv_heads = k.size(1);
  a.head_dim = k.size(2);
  a.block_size = k_cache.size(1);
  C10_CUDA_CHECK(trinfer::write_kv_cache(kernel_dtype(k, "k"), index_type(slot_mapping, "slot_mapping"), a,
                                         c10::cuda::getCurrentCUDAStream()));
}

void paged_decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& block_tables,
                            const Tensor& seq_lens, const Tensor& out, const Tensor& workspace, double scale,
                            int64_t max_splits, int64_t split_tokens) {
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q, out: expected equal [batch, q_heads, head_dim] shapes");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "k_cache, v_cache: expected equal [num_blocks, block_size, kv_heads, head_dim] shapes");
  const int64_t batch = q.size(0), q_heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(2);
  const int64_t block_size = k_cache.size(1);
  TORCH_CHECK(k_cache.size(3) == head_dim, "k_cache: head_dim ", k_cache.size(3), " differs from q's ", head_dim);
  TORCH_CHECK(kv_heads > 0 && q_heads % kv_heads == 0, "q: heads (", q_heads, ") not a multiple of kv heads (", kv_heads, ")");
  TORCH_CHECK(trinfer::paged_decode_supports_head_dim(head_dim), "q: head_dim ", head_dim,
              " is not supported by the CUDA kernel (64, 80, 96, 128, 256)");
  TORCH_CHECK(block_size > 0 && (block_size & (block_size - 1)) == 0, "k_cache: block_size must be a power of two");
  TORCH_CHECK(split_tokens > 0 && split_tokens <= trinfer::kMaxDecodeSplit, "split_tokens: expected 1..",
              trinfer::kMaxDecodeSplit, ", got ", split_tokens);
  TORCH_CHECK(max_splits >= 1 && max_splits <= 0x7fffffff, "max_splits: expected >= 1, got ", max_splits);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch && block_tables.scalar_type() == at::kInt &&
                  block_tables.stride(-1) == 1,
              "block_tables: expected int32 [batch, max_blocks] with a contiguous last dim");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == batch && seq_lens.scalar_type() == at::kInt &&
                  seq_lens.is_contiguous(),
              "seq_lens: expected a contiguous int32 [batch] tensor");
  for (const Tensor* t : {&q, &k_cache, &v_cache, &out}) {
    check_cuda(*t, q, "paged_decode_attention operand");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "paged_decode_attention: q, caches and out must share a dtype");
    check_last_dim(*t, "paged_decode_attention operand");
  }
  kernel_dtype(q, "q");
  check_cuda(block_tables, q, "block_tables");
  check_cuda(seq_lens, q, "seq_lens");
  const int64_t elems = 16 / q.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(k_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(v_cache.data_ptr()) % 16 == 0 && k_cache.stride(0) % elems == 0 &&
                  k_cache.stride(1) % elems == 0 && k_cache.stride(2) % elems == 0 && v_cache.stride(0) % elems == 0 &&
                  v_cache.stride(1) % elems == 0 && v_cache.stride(2) % elems == 0,
              "k_cache, v_cache: the CUDA kernel reads rows with 16-byte loads: expected 16-byte aligned storage "
              "and strides");
  const int64_t need = trinfer::paged_decode_workspace_floats(batch, q_heads, head_dim, max_splits);
  if (need > 0) {
    check_cuda(workspace, q, "workspace");
    TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous() && workspace.numel() >= need,
                "workspace: expected a contiguous float32 tensor of at least ", need, " elements");
  }
  if (batch == 0) return;
  const c10::cuda::CUDAGuard guard(q.device());
  trinfer::PagedDecodeArgs a{};
  a.q = q.data_ptr();
  a.q_stride_batch = q.stride(0);
  a.q_stride_head = q.stride(1);
  a.k_cache = k_cache.data_ptr();
  a.k_stride_block = k_cache.stride(0);
  a.k_stride_slot = k_cache.stride(1);
  a.k_stride_head = k_cache.stride(2);
  a.v_cache = v_cache.data_ptr();
  a.v_stride_block = v_cache.stride(0);
  a.v_stride_slot = v_cache.stride(1);
  a.v_stride_head = v_cache.stride(2);
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.block_tables_stride = block_tables.stride(0);
  a.seq_lens = seq_lens.data_ptr<int32_t>();
  a.out = out.data_ptr();
  a.out_stride_batch = out.stride(0);
  a.out_stride_head = out.stride(1);
  a.workspace = need > 0 ? workspace.data_ptr<float>() : nullptr;
  a.batch = batch;
  a.num_q_heads = q_heads;
  a.num_kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.block_size = block_size;
  a.max_splits = max_splits;
  a.split_size = split_tokens;
  a.capacity = std::min(block_tables.size(1) * block_size, max_splits * split_tokens);
  a.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(trinfer::paged_decode_attention(kernel_dtype(q, "q"), a, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY(trinfer_cuda, m) {
  m.def("rms_norm(Tensor x, Tensor weight, Tensor(a!) out, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor x, Tensor(a!) residual, Tensor weight, Tensor(b!) out, float eps) -> ()");
  m.def("greedy_sample(Tensor logits, Tensor(a!) out_ids) -> ()");
  m.def("greedy_sample_logprobs(Tensor logits, Tensor(a!) out_ids, Tensor(b!) out_logprobs) -> ()");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor seq_lens, "
      "Tensor(a!) out, Tensor(b!) workspace, float scale, int max_splits, int split_tokens) -> ()");
}

TORCH_LIBRARY_IMPL(trinfer_cuda, CUDA, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("greedy_sample", &greedy_sample);
  m.impl("greedy_sample_logprobs", &greedy_sample_logprobs);
  m.impl("write_kv_cache", &write_kv_cache);
  m.impl("paged_decode_attention", &paged_decode_attention);
}

// Importable as a Python module (`trinfer._C` from setup.py; the JIT build loads it as a plain library).
// Importing it runs the registrations above; the module itself is empty.
#define TRINFER_CAT_(a, b) a##b
#define TRINFER_CAT(a, b) TRINFER_CAT_(a, b)
#define TRINFER_STR_(a) #a
#define TRINFER_STR(a) TRINFER_STR_(a)
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
PyMODINIT_FUNC TRINFER_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, TRINFER_STR(TORCH_EXTENSION_NAME),
                            "trinfer's CUDA C++ kernels; importing registers torch.ops.trinfer_cuda", -1, nullptr,
                            nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
