"""trinfer's CUDA C++ kernels (csrc/): a second backend with the Triton kernels' signatures and semantics.

    from trinfer import cuda_kernels
    if cuda_kernels.is_available():            # else cuda_kernels.unavailable_reason() says why
        y = cuda_kernels.rms_norm(x, w, 1e-5)

Each public function validates its arguments with the Triton twin's own checks (so errors are identical), then
calls a torch custom op `torch.ops.trinfer_cuda.*` registered by the C++ library (csrc/torch_bindings.cpp).
The ops are out-variants that launch on the current CUDA stream without synchronizing, with fake (meta)
implementations registered here, so callers compile with `torch.compile(fullgraph=True)` and capture CUDA graphs.
References (the same as the Triton kernels'): `trinfer.triton_kernels.references`.

Loading: the library is looked up on first use, in this order:
  1. the installed extension `trinfer._C` (built by `TRINFER_BUILD_CUDA=1 pip install --no-build-isolation -e .`
     on a machine with nvcc and a CUDA build of torch);
  2. nothing else implicitly: `load_jit()` builds csrc/ with torch.utils.cpp_extension (ninja) into a cache
     directory and loads it; call it explicitly (bench/gpu_check.sh and the test fixture do).
Without either, `is_available()` is False, `unavailable_reason()` says why, and every kernel raises a
RuntimeError naming how to build.

Module state: `_loaded`, the one cached handle of the loaded library (its origin), set once by the first
successful load and never reset (a process cannot unload a torch op library). Nothing else is cached.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass

import torch

# The Triton wrappers' own checks, so that both backends raise the same errors.
from ..triton_kernels.attention import DECODE_SPLIT_TOKENS, prepare_decode_attention, validate_decode_attention
from ..triton_kernels._utils import rows_as_2d
from ..triton_kernels.kv_cache import check_write_kv_cache_args
from ..triton_kernels.rms_norm import prepare_fused_add_rms_norm, prepare_rms_norm
from ..triton_kernels.sampling import prepare_greedy_sample
from . import _build

__all__ = [
    "rms_norm",
    "fused_add_rms_norm",
    "greedy_sample",
    "write_kv_cache",
    "paged_decode_attention",
    "is_available",
    "unavailable_reason",
    "load_jit",
    "loaded_from",
    "HEAD_DIMS",
    "MAX_SPLIT_TOKENS",
]

HEAD_DIMS = (64, 80, 96, 128, 256)  # head dims the decode kernel is instantiated for
MAX_SPLIT_TOKENS = 4096             # decode split size limit (a split's scores live in shared memory)
_OPS = ("rms_norm", "fused_add_rms_norm", "greedy_sample", "greedy_sample_logprobs", "write_kv_cache",
        "paged_decode_attention")
BUILD_HINT = ("build with TRINFER_BUILD_CUDA=1 pip install --no-build-isolation -e . on a machine with nvcc and a "
              "CUDA torch, or call trinfer.cuda_kernels.load_jit()")


@dataclass(frozen=True)
class _Library:
    origin: str  # "installed extension trinfer._C" or "JIT build in <dir>"


_loaded: _Library | None = None


# ----------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------

def _register_fakes() -> None:
    """Fake (meta) kernels: every op only mutates tensors it is given and returns nothing."""
    def fake(*args, **kwargs):
        return None

    for name in _OPS:
        torch.library.register_fake(f"{_build.OP_NAMESPACE}::{name}", fake)


def _set_loaded(origin: str) -> None:
    global _loaded
    _register_fakes()
    _loaded = _Library(origin)


def _load_installed() -> str | None:
    """Load `trinfer._C` unless a library is loaded already. Returns None on success, else why not."""
    if _loaded is not None:
        return None
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    try:
        importlib.import_module(_build.EXTENSION_NAME)
    except ModuleNotFoundError as exc:
        if exc.name != _build.EXTENSION_NAME:
            return f"{_build.EXTENSION_NAME} failed to import ({exc})"
        return f"the extension {_build.EXTENSION_NAME} is not installed"
    except (ImportError, OSError) as exc:  # e.g. built against another torch: undefined symbols
        return f"{_build.EXTENSION_NAME} failed to load ({exc})"
    _set_loaded(f"installed extension {_build.EXTENSION_NAME}")
    return None


def unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run in this process, or None when they can (library loaded, GPU visible)."""
    reason = _load_installed()
    if reason is not None:
        return f"not built: {reason}"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def is_available() -> bool:
    """True when the library is loaded (installed or JIT-built) and a CUDA device is visible."""
    return unavailable_reason() is None


def loaded_from() -> str | None:
    """Where the loaded library came from ("installed extension trinfer._C" / "JIT build in ..."), or None."""
    return _loaded.origin if _loaded is not None else None


def _jit_archs() -> tuple[int, ...]:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return (major * 10 + minor,)
    return _build.ARCHS


def load_jit(*, build_directory: str | None = None, verbose: bool = False, timeout_s: float | None = None,
             build: bool = True) -> str:
    """Build csrc/ just in time with torch.utils.cpp_extension (ninja) and load it; return the library's origin.

    For machines where nothing can be installed (the GPU check). Needs a CUDA build of torch, nvcc and a source
    checkout (csrc/ next to the package). Compiles for the visible GPU's arch (or sm_80 + sm_90 without one;
    TORCH_CUDA_ARCH_LIST overrides) into `build_directory`, default `$TRINFER_CUDA_BUILD_DIR` or
    `~/.cache/trinfer/cuda/<torch>-<cuda>-<arch>`. The build runs in a child process with `MAX_JOBS` set, under
    `timeout_s` (default `$TRINFER_CUDA_BUILD_TIMEOUT` or 600 s), its compiler output on stderr when `verbose`;
    a stale torch `lock` left by a killed build is removed; a finished build is stamped with the hash of its
    sources, flags and versions and later loaded directly (`_jit.py`). `build=False` only loads such a finished
    build. Raises RuntimeError (`_jit.BuildError`) when there is none to load, the build fails or times out, or
    an earlier build of the same sources failed. A no-op when a library is loaded already (the installed one
    included): a process holds one.
    """
    if _loaded is not None:
        return _loaded.origin
    if torch.version.cuda is None:
        raise RuntimeError(f"load_jit: torch {torch.__version__} is a CPU build; the CUDA backend needs a CUDA torch")
    from torch.utils import cpp_extension

    from . import _jit

    if build and cpp_extension.CUDA_HOME is None:
        raise RuntimeError("load_jit: no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    if not _build.kernel_sources():
        raise RuntimeError(f"load_jit: no CUDA sources in {_build.CSRC_DIR} (load_jit builds from a source checkout)")
    archs = _jit_archs()
    arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else _build.gencode_flags(archs, ptx=False)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "_", f"torch{torch.__version__}-cu{torch.version.cuda}-sm"
                                          + "_".join(map(str, archs)))
    build_directory = build_directory or _build.default_jit_build_dir(tag)
    cuda_cflags, cflags = list(_build.NVCC_FLAGS) + arch_flags, list(_build.CXX_FLAGS)
    if build:
        import io

        path = _jit.build(build_directory, archs=archs, cuda_cflags=cuda_cflags, cflags=cflags,
                          timeout_s=timeout_s, log=None if verbose else io.StringIO())
    else:
        path = _jit.cached_library(build_directory, _jit.stamp(archs, cuda_cflags, cflags))
        if path is None:
            raise _jit.BuildError(f"load_jit(build=False): no finished build of these csrc/ sources in "
                                  f"{build_directory}")
    torch.ops.load_library(path)
    _set_loaded(f"JIT build in {build_directory}")
    return _loaded.origin


def _ops():
    """`torch.ops.trinfer_cuda`, loading the installed library on first use; RuntimeError when there is none."""
    if _loaded is None:
        reason = _load_installed()
        if reason is not None:
            raise RuntimeError(f"CUDA backend not built: {reason}; {BUILD_HINT}")
    return getattr(torch.ops, _build.OP_NAMESPACE)


def _require_cuda(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor for the CUDA backend, got device {t.device}")


# ----------------------------------------------------------------------------------------------------------
# Kernels (signatures, checks and results as in trinfer.triton_kernels)
# ----------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dim, as `trinfer.triton_kernels.rms_norm` (Hugging Face casts).

    `weight * (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype)`: x `[..., hidden]` fp32/fp16/bf16 with a
    contiguous last dim, weight `[hidden]`, optional `out`. Reference: `references.rms_norm_ref`.
    """
    eps, out = prepare_rms_norm(x, weight, eps, out)
    ops = _ops()
    if x.numel() == 0:
        return out
    _require_cuda("x", x)
    ops.rms_norm(rows_as_2d("x", x), weight, rows_as_2d("out", out), eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`residual += x` in place (rounded to its dtype), then return `rms_norm(residual, weight, eps)`.

    As `trinfer.triton_kernels.fused_add_rms_norm`. Reference: `references.fused_add_rms_norm_ref`.
    """
    eps, out = prepare_fused_add_rms_norm(x, residual, weight, eps, out)
    ops = _ops()
    if x.numel() == 0:
        return out
    _require_cuda("x", x)
    ops.fused_add_rms_norm(rows_as_2d("x", x), rows_as_2d("residual", residual), weight, rows_as_2d("out", out), eps)
    return out


def greedy_sample(
    logits: torch.Tensor,
    *,
    return_logprobs: bool = False,
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Greedy next tokens (int64 argmax per row, ties -> lowest index, first NaN wins), optionally with fp32
    log-probabilities `logit - logsumexp(row)`; as `trinfer.triton_kernels.greedy_sample`.

    The vocab is split into fixed chunks of 2048 logits (one CTA each, then a per-row merge), so a row's result
    never depends on the batch. Reference: `references.greedy_sample_ref`.
    """
    out_ids, out_lp = prepare_greedy_sample(logits, return_logprobs, out)
    ops = _ops()
    if logits.shape[0]:
        _require_cuda("logits", logits)
        if return_logprobs:
            ops.greedy_sample_logprobs(logits, out_ids, out_lp)
        else:
            ops.greedy_sample(logits, out_ids)
    return (out_ids, out_lp) if return_logprobs else out_ids


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, *, validate: bool = False) -> None:
    """Scatter new keys/values into their cache slots (-1 skips a token); as `trinfer.triton_kernels.write_kv_cache`.

    Layout: `trinfer.triton_kernels.kv_cache_layout`. `validate=True` runs the device-memory slot checks (sync).
    """
    check_write_kv_cache_args(k, v, k_cache, v_cache, slot_mapping, validate)
    ops = _ops()
    if k.shape[0] == 0:
        return
    _require_cuda("k_cache", k_cache)
    ops.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)


def _check_cuda_decode_limits(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, head_dim: int,
                              split_tokens: int) -> None:
    """What the CUDA decode kernel needs beyond the Triton checks: an instantiated head_dim, a split whose scores
    fit in shared memory, and K/V rows it can read with 16-byte loads."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"q: expected head_dim in {HEAD_DIMS} for the CUDA backend, got {head_dim}")
    if split_tokens > MAX_SPLIT_TOKENS:
        raise ValueError(f"split_tokens: expected at most {MAX_SPLIT_TOKENS} for the CUDA backend, got {split_tokens}")
    elems = 16 // q.element_size()
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        # Allocations are 256-byte aligned, so a view is aligned when its offset is. torch.compile cannot trace
        # storage_offset(); there the C++ op checks the address itself (a RuntimeError).
        misaligned = not torch.compiler.is_compiling() and c.storage_offset() % elems
        if misaligned or any(s % elems for s in c.stride()[:3]):
            raise ValueError(f"{name}: expected 16-byte aligned storage and strides that are multiples of {elems} "
                             f"elements (16-byte rows) for the CUDA backend, got strides {tuple(c.stride())}")


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
    validate: bool = False,
    max_seq_len: int | None = None,
    split_tokens: int = DECODE_SPLIT_TOKENS,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query token per sequence over its paged K/V; as `trinfer.triton_kernels.paged_decode_attention`.

    GQA-grouped (one CTA per split, KV head and sequence serves up to 8 query heads of the group), split-KV with
    a fixed `split_tokens` (batch-invariant), workspace layout and size as the Triton twin
    (`decode_workspace_numel`). CUDA-only limits: head_dim in HEAD_DIMS, split_tokens <= MAX_SPLIT_TOKENS,
    16-byte aligned cache rows. Reference: `references.paged_decode_attention_ref`.
    """
    a = prepare_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out,
                                 max_seq_len=max_seq_len, split_tokens=split_tokens, workspace=workspace)
    _check_cuda_decode_limits(q, k_cache, v_cache, a.head_dim, a.split_tokens)
    if validate:
        validate_decode_attention(a, block_tables, seq_lens)
    ops = _ops()
    if a.batch == 0:
        return a.out
    _require_cuda("q", q)
    ops.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, a.out, a.workspace, a.scale,
                               a.num_splits, a.split_tokens)
    return a.out
