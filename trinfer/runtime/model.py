"""The Llama-family decoder (Llama 2/3/3.x, Qwen2, Qwen3, Mistral, SmolLM2, TinyLlama), readable top to bottom.

Matrix products run on fused weights (one q/k/v matrix, plus bias for Qwen2, and one gate/up matrix per layer)
through the backend's `linear`: torch's matmul, or, in decode steps, the batch-invariant Triton `linear` kernel
when the weights are quantized (`QuantizedWeight`: int8, int4, GGUF blocks) or `batch_invariant` is on
(`quantization.make_linear`). Everything else goes through a `Backend`: the Triton kernels of
`trinfer.triton_kernels`, or their PyTorch references (the CPU default and the oracle for the kernels; run
through `torch_backend.py`, which takes leaner equal paths in fp32 and stores the CPU's fp32 matrices in the
layout its BLAS runs fastest), or the Triton kernels with some kernel families on the CUDA C++ kernels of
`trinfer.cuda_kernels` (`get_backend` / `parse_backend` give the choices).

A forward pass takes a flat batch of T tokens (a prefill batch: a run of each sequence's uncomputed tokens one
after another; or a decode batch: one token per sequence) with its `AttentionMetadata`, writes their K/V into
the paged cache and returns the final hidden state of the last token of each sequence that gets a next token.

Per layer:  h -> norm -> qkv -> rotary(q, k) + write k, v to cache -> paged attention -> o_proj
            -> (+ residual, norm) -> gate_up -> silu(gate) * up -> down -> (+ residual)
Qwen3 also RMS-normalizes each q and k head before the rotation (q_norm / k_norm), in the same fused kernel.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import quantization as Q
from .attention_metadata import AttentionMetadata

BACKENDS = ("triton", "torch", "cuda")  # base names; "cuda:FAMILY[+FAMILY...]" picks families (parse_backend)
# Kernel families the CUDA C++ backend can take over in the model, in canonical order. "rms_norm" is rms_norm and
# fused_add_rms_norm; "decode_attention" is paged_decode_attention.
CUDA_FAMILIES = ("rms_norm", "decode_attention")
# CUDA C++ kernels the model never calls: it runs their work fused into one Triton kernel.
_FUSED_ON_TRITON = {
    "write_kv_cache": "rotary_write_kv_cache (rotary and the K/V cache write in one kernel)",
    "greedy_sample": "lm_head_greedy (LM head and argmax in one kernel; the logits never go to memory)",
}


@dataclass(frozen=True)
class Backend:
    """The operations of the model, with the signatures of `trinfer.triton_kernels` (matrix products and
    embedding rows through `linear` / `embedding`, which take dense or quantized weights).

    Keyword arguments (`validate=`, `max_q_len=`, `plan=`, `max_seq_len=`: checks and launch sizes) are passed on
    to the kernels; the references do not need them and ignore them.
    """

    name: str
    rms_norm: Callable
    fused_add_rms_norm: Callable
    rotary_write_kv_cache: Callable  # (per-head q/k norm,) rotate q, k in place, store k, v at their cache slots
    silu_and_mul: Callable
    paged_prefill_attention: Callable
    paged_decode_attention: Callable
    lm_head_greedy: Callable  # (hidden, weight, return_logprobs=True[, out=(ids, logprobs)]): LM head + argmax
    build_rope_cache: Callable
    cuda_families: tuple[str, ...] = ()  # the families run by trinfer.cuda_kernels (the rest: name's kernels)
    check_head_dim: Callable[[int], None] = lambda head_dim: None  # ValueError if the kernels cannot run it
    # A weight matrix in the layout this backend's matrix products run fastest (same values and shape), or in two
    # layouts (`torch_backend.TwoLayouts`), which only this backend's `linear` takes.
    prepare_matrix: Callable[[torch.Tensor], Any] = lambda w: w
    # Matrix products `linear(x, weight, bias=None, *, decode=False)` and embedding rows `embedding(ids, table,
    # dtype)`, for dense and quantized weights (quantization.py); `batch_invariant`: dense decode products on
    # the batch-invariant kernel too.
    linear: Callable = Q.torch_linear
    embedding: Callable = Q.torch_embedding
    batch_invariant: bool = False
    # Attention of a verify pass (speculative decoding: a decode batch whose sequences take several rows, each a
    # decode row of its own length; `AttentionMetadata.seq_starts`): `(q, k_cache, v_cache, block_tables,
    # seq_lens, scale, seq_starts=...)`, the same result as `paged_decode_attention` row by row. None: the
    # decode attention itself, row by row (the Triton/CUDA kernels: each row's bits are then a decode step's).
    paged_verify_attention: Callable | None = None


def parse_backend(spec: str) -> tuple[str, tuple[str, ...]]:
    """A backend choice -> (its canonical name, the kernel families it runs on the CUDA C++ kernels).

        "torch"                       the PyTorch references of the kernels: any device, any head_dim
        "triton"                      the Triton kernels
        "cuda"                        the Triton kernels, with every family in CUDA_FAMILIES on the CUDA C++
                                      kernels (trinfer.cuda_kernels): "rms_norm" and "decode_attention"
        "cuda:FAMILY[+FAMILY...]"     the Triton kernels with only those families on CUDA C++,
                                      e.g. "cuda:decode_attention" or "cuda:rms_norm"

    Rotary + K/V cache write, SiLU-and-mul, prefill attention and the LM head + argmax always run on Triton: the
    model calls fused kernels there (rotary_write_kv_cache, lm_head_greedy) that have no CUDA C++ twin. The
    canonical name lists families in CUDA_FAMILIES order, and is "cuda" when it names them all. Parsing checks
    the syntax only; `get_backend` checks that the CUDA C++ kernels can run. ValueError names what is wrong.
    """
    if not isinstance(spec, str):
        raise TypeError(f"backend: expected a str such as {', '.join(map(repr, BACKENDS))} or 'cuda:rms_norm', "
                         f"got {type(spec).__name__}")
    kind, sep, rest = spec.strip().partition(":")
    if kind in ("triton", "torch") and not sep:
        return kind, ()
    if kind != "cuda":
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or 'cuda:FAMILY[+FAMILY...]' "
                         f"(families: {', '.join(CUDA_FAMILIES)}), got {spec!r}")
    if not sep:
        return "cuda", CUDA_FAMILIES
    chosen = set()
    for family in rest.split("+"):
        family = family.strip()
        if family in _FUSED_ON_TRITON:
            raise ValueError(f"backend: {spec!r} names {family!r}, which the model never calls on its own: it runs "
                             f"{_FUSED_ON_TRITON[family]} on Triton; CUDA C++ families: {', '.join(CUDA_FAMILIES)}")
        if family not in CUDA_FAMILIES:
            raise ValueError(f"backend: unknown CUDA C++ kernel family {family!r} in {spec!r}; expected "
                             f"'cuda:FAMILY[+FAMILY...]' with families from {', '.join(CUDA_FAMILIES)}")
        chosen.add(family)
    families = tuple(f for f in CUDA_FAMILIES if f in chosen)
    return ("cuda" if families == CUDA_FAMILIES else "cuda:" + "+".join(families)), families


def check_cuda_kernels_available(name: str) -> None:
    """ValueError naming why, when backend `name` needs the CUDA C++ kernels and they cannot run here."""
    from trinfer import cuda_kernels

    reason = cuda_kernels.unavailable_reason()
    if reason is not None:
        raise ValueError(f"backend: {name!r} needs the CUDA C++ kernels, which cannot run here: {reason}; "
                         f"{cuda_kernels.BUILD_HINT} (or use backend='triton')")


def _triton_head_dims(head_dim: int) -> None:
    from trinfer.triton_kernels.attention import check_head_dim

    check_head_dim(head_dim, "head_dim")  # the attention kernels' tile tables


def _cuda_decode_head_dims(head_dim: int) -> None:
    from trinfer.cuda_kernels import HEAD_DIMS

    _triton_head_dims(head_dim)  # prefill attention stays on Triton
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim: expected one of {HEAD_DIMS} for the CUDA C++ decode attention kernel "
                         f"(instantiated head dims), got {head_dim}")


def get_backend(name: str, *, batch_invariant: bool = False, few_rows: bool = False) -> Backend:
    """The Backend of a choice (syntax: `parse_backend`): `"triton"`, the Triton kernels; `"torch"`, their PyTorch
    references, which run anywhere; `"cuda"` / `"cuda:FAMILY[+FAMILY...]"`, the Triton kernels with those families
    on the CUDA C++ kernels (ValueError naming the reason when those cannot run here).

    batch_invariant: decode steps run every matrix product on the batch-invariant Triton `linear` kernel (not
    only those on quantized weights), so a sequence's tokens do not depend on the batch it is decoded in. The
    `torch` backend (torch's matmul) refuses it.

    few_rows: decode-type passes of a few rows per sequence will run (speculative decoding's verify passes): the
    `torch` backend then keeps a row-major copy of each matrix it stores column-major (`torch_backend.TwoLayouts`:
    twice those matrices' memory, for 1.5-2.6x faster products of 2-5 rows on the CPU)."""
    from trinfer import triton_kernels as K

    name, cuda_families = parse_backend(name)
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant: expected a bool, got {type(batch_invariant).__name__}")
    if name == "torch" and batch_invariant:
        raise ValueError("batch_invariant: needs the Triton linear kernel (backend 'triton' or 'cuda'); the 'torch' "
                         "backend runs torch's matmul, which promises no batch invariance")
    if name == "torch":
        from trinfer.triton_kernels import references as R

        from . import torch_backend as T  # the references, leaner on the hot path (see that module)

        def lm_head_greedy(hidden, weight, return_logprobs=False, out=None):  # torch's matmul, then the argmax
            res = R.greedy_sample_ref(T.linear(hidden, weight), return_logprobs)
            if out is None:
                return res
            for o, r in zip(out if return_logprobs else (out,), res if return_logprobs else (res,)):
                o.copy_(r)
            return out

        return Backend("torch", T.rms_norm, T.fused_add_rms_norm, T.rotary_write_kv_cache, T.silu_and_mul,
                       T.paged_prefill_attention, T.paged_decode_attention, lm_head_greedy, K.build_rope_cache,
                       prepare_matrix=T.prepare_matrix_two_layouts if few_rows else T.prepare_matrix,
                       linear=T.linear, paged_verify_attention=T.paged_verify_attention)
    # The fused LM head + argmax (dense or quantized weight): the logits never go to memory.
    triton = Backend("triton", K.rms_norm, K.fused_add_rms_norm, K.rotary_write_kv_cache, K.silu_and_mul,
                     K.paged_prefill_attention, K.paged_decode_attention, K.lm_head_greedy, K.build_rope_cache,
                     check_head_dim=_triton_head_dims,
                     linear=Q.make_linear(K.linear, K.dequantize, batch_invariant=batch_invariant),
                     embedding=Q.make_embedding(K.dequantize), batch_invariant=batch_invariant)
    if not cuda_families:
        return triton
    check_cuda_kernels_available(name)
    from trinfer import cuda_kernels as C

    ops = {}
    if "rms_norm" in cuda_families:
        ops.update(rms_norm=C.rms_norm, fused_add_rms_norm=C.fused_add_rms_norm)
    if "decode_attention" in cuda_families:
        ops.update(paged_decode_attention=C.paged_decode_attention, check_head_dim=_cuda_decode_head_dims)
    return dataclasses.replace(triton, name=name, cuda_families=cuda_families, **ops)


def _set_weight(module: nn.Module, name: str, w) -> None:
    """A dense weight as a buffer of `module`; a QuantizedWeight (several tensors) or a matrix the backend keeps in
    two layouts (`torch_backend.TwoLayouts`) as a plain attribute."""
    if isinstance(w, torch.Tensor):
        module.register_buffer(name, w)
    else:
        setattr(module, name, w)


def _matrix(backend: Backend, w):
    """`backend.prepare_matrix(w)` for a dense matrix (the same values in the layout its products run fastest, or
    two layouts); a QuantizedWeight as it is (the kernels read its layout)."""
    return w if isinstance(w, Q.QuantizedWeight) else backend.prepare_matrix(w)


def _weight(weights: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in weights:
        raise ValueError(f"weights: missing tensor {name!r}")
    w = weights[name]
    if tuple(w.shape) != shape:
        raise ValueError(f"weights: {name!r} expected shape {shape}, got {tuple(w.shape)}")
    return w


class DecoderLayer(nn.Module):
    def __init__(self, config, weights: dict, i: int, backend: Backend, tp=None):
        super().__init__()
        c, p = config, f"layers.{i}."
        self.ops = backend
        self.tp = tp  # tensor parallel (distributed.ShardOps): o_proj and down hold this rank's columns
        self.eps = c.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.scale = c.head_dim ** -0.5
        qkv_rows = self.q_size + 2 * self.kv_size
        def mat(name: str, shape: tuple[int, int]) -> None:
            _set_weight(self, name, _matrix(backend, _weight(weights, p + name, shape)))

        self.register_buffer("input_norm", _weight(weights, p + "input_norm", (c.hidden_size,)))
        mat("qkv_proj", (qkv_rows, c.hidden_size))
        self.register_buffer("qkv_bias", _weight(weights, p + "qkv_bias", (qkv_rows,)) if c.qkv_bias else None)
        # Qwen3: per-head RMSNorm weights of q and k, applied by the rotary kernel before it rotates.
        self.register_buffer("q_norm", _weight(weights, p + "q_norm", (c.head_dim,)) if c.qk_norm else None)
        self.register_buffer("k_norm", _weight(weights, p + "k_norm", (c.head_dim,)) if c.qk_norm else None)
        self.qk_norm_eps = c.rms_norm_eps if c.qk_norm else None
        mat("o_proj", (c.hidden_size, self.q_size))
        self.register_buffer("post_attn_norm", _weight(weights, p + "post_attn_norm", (c.hidden_size,)))
        mat("gate_up_proj", (2 * c.intermediate_size, c.hidden_size))
        mat("down_proj", (c.hidden_size, c.intermediate_size))

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor, rope: torch.Tensor, validate: bool):
        ops = self.ops
        # Pre-attention norm; from the second layer on, the previous MLP output joins the residual here.
        if residual is None:
            residual, x = h, ops.rms_norm(h, self.input_norm, self.eps)
        else:
            x = ops.fused_add_rms_norm(h, residual, self.input_norm, self.eps)
        h = self.attention(x, meta, k_cache, v_cache, rope, validate)
        if self.tp is not None:  # row-parallel o_proj: add the ranks' partial products
            h = self.tp.all_reduce(h)
        x = ops.fused_add_rms_norm(h, residual, self.post_attn_norm, self.eps)
        decode = not meta.is_prefill
        h = ops.linear(ops.silu_and_mul(ops.linear(x, self.gate_up_proj, decode=decode)), self.down_proj,
                       decode=decode)
        if self.tp is not None:  # row-parallel down_proj
            h = self.tp.all_reduce(h)
        return h, residual

    def attention(self, x, meta: AttentionMetadata, k_cache, v_cache, rope, validate: bool) -> torch.Tensor:
        ops, T = self.ops, x.shape[0]
        decode = not meta.is_prefill
        qkv = ops.linear(x, self.qkv_proj, self.qkv_bias, decode=decode)
        # Strided views into the fused output: no copies.
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        # (Normalize each q/k head,) rotate q and k in place and store this step's K/V; attention then reads
        # all K/V from the cache.
        ops.rotary_write_kv_cache(q, k, v, meta.positions, rope, k_cache, v_cache, meta.slot_mapping,
                                  q_norm_weight=self.q_norm, k_norm_weight=self.k_norm, norm_eps=self.qk_norm_eps,
                                  validate=validate)
        if meta.is_prefill:
            o = ops.paged_prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                            self.scale, max_q_len=meta.max_q_len, plan=meta.prefill_plan,
                                            validate=validate)
        elif meta.seq_starts is not None and ops.paged_verify_attention is not None:  # a verify pass (torch)
            o = ops.paged_verify_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                           seq_starts=meta.seq_starts)
        else:  # one decode row per query token (a verify pass's rows too: each with its own length)
            o = ops.paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                           max_seq_len=meta.max_seq_len, workspace=meta.decode_workspace,
                                           validate=validate)
        return ops.linear(o.reshape(T, self.q_size), self.o_proj, decode=decode)


class LlamaModel(nn.Module):
    """Weights come from `trinfer.runtime.loader.load_model_files` (fused names, already on the device in the
    compute dtype); the rotary table is built once here, with Llama-3 scaling when the config has it.

    Tensor parallelism: `tp` (distributed.ShardOps) with `config` and `weights` of this rank's shard
    (ShardSpec.local_config): the all-reduces after o_proj and down, and the vocab-parallel embedding and LM
    head go through it. None (one device) adds no work."""

    def __init__(self, config, weights: dict, backend: Backend, *, max_positions: int | None = None,
                 validate: bool = False, tp=None):
        super().__init__()
        c = config
        try:  # refuse here, not at the first forward pass
            backend.check_head_dim(c.head_dim)
        except ValueError as e:
            raise ValueError(f"backend: {backend.name!r} cannot run this model: {e}; the 'torch' backend runs "
                             f"any head_dim") from None
        self.config = c
        self.ops = backend
        self.validate = validate  # device-reading input checks in the kernels (debug mode)
        self.tp = tp
        _set_weight(self, "embed_tokens", _weight(weights, "embed_tokens", (c.vocab_size, c.hidden_size)))
        self.layers = nn.ModuleList(DecoderLayer(c, weights, i, backend, tp) for i in range(c.num_layers))
        self.register_buffer("norm", _weight(weights, "norm", (c.hidden_size,)))
        if c.tie_word_embeddings:  # the embedding itself, or its copy in the backend's matrix layout
            self.lm_head = _matrix(backend, self.embed_tokens)
        else:
            _set_weight(self, "lm_head", _matrix(backend, _weight(weights, "lm_head", (c.vocab_size, c.hidden_size))))
        self.register_buffer("rope", backend.build_rope_cache(
            c.head_dim, max_positions or c.max_position_embeddings, c.rope_theta, c.rope_scaling,
            device=self.embed_tokens.device))

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_cache) -> torch.Tensor:
        """Run T tokens through all layers; return the final-norm hidden state `[B, hidden]` of each
        sequence's last token (prefill) or of each token (decode)."""
        if self.tp is None:
            h, residual = self.ops.embedding(input_ids, self.embed_tokens, self.norm.dtype), None
        else:  # vocab-parallel: this rank's rows, summed over the ranks
            h, residual = self.tp.embedding(input_ids, self.embed_tokens, self.norm.dtype), None
        for layer, k_cache, v_cache in zip(self.layers, kv_cache.k, kv_cache.v):
            h, residual = layer(h, residual, meta, k_cache, v_cache, self.rope, self.validate)
        if meta.logits_indices is not None:  # norm and LM head only where a next token is needed
            h, residual = h[meta.logits_indices], residual[meta.logits_indices]
        return self.ops.fused_add_rms_norm(h, residual, self.norm, self.config.rms_norm_eps)

    def sample(self, hidden: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy next token of each row of `hidden` (int64, on the device) and its fp32 log-probability;
        written into `out` = (ids, logprobs) when given (static buffers of a captured decode step)."""
        if self.tp is not None:  # vocab-parallel LM head: the distributed argmax, the same token on every rank
            return self.tp.lm_head_greedy(hidden, self.lm_head, out)
        if out is None:
            return self.ops.lm_head_greedy(hidden, self.lm_head, return_logprobs=True)
        return self.ops.lm_head_greedy(hidden, self.lm_head, return_logprobs=True, out=out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits `[B, vocab]` (not used for decoding: `sample` never writes them); with tensor
        parallelism, this rank's vocab columns only."""
        return self.ops.linear(hidden, self.lm_head)
