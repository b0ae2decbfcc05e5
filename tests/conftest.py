"""Test harness. Without CUDA, Triton kernels run on CPU tensors under the interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel (at import of the kernel modules), so it is
set here before any trinfer module is imported. With a CUDA device the same tests run natively.
"""
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/: tests use its harness and the GPU check's helpers
    sys.path.insert(0, str(ROOT))

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402


def _patch_interpreter_bf16_dot() -> None:
    """Triton 3.6's interpreter multiplies raw bf16 bit patterns in tl.dot (triton issue 11584).

    Test-harness-only fix: upcast bf16 operand handles to fp32 before the interpreter's dot. Kernels keep
    bf16 operands, which is what the tensor cores want on a GPU.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_trinfer_bf16_dot_patched", False):
        return
    original = builder_cls.create_dot

    def _as_fp32(handle):
        data = handle.data
        if handle.dtype.name == "bf16" or str(handle.dtype) == "bf16":
            # bf16 is stored as uint16 bit patterns: shift into the high half of a float32.
            data = (data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, interpreter.tl.float32)
        return handle

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, _as_fp32(a), _as_fp32(b), d, input_precision, max_num_imprecise_acc)

    builder_cls.create_dot = create_dot
    builder_cls._trinfer_bf16_dot_patched = True


if not HAS_CUDA:
    _patch_interpreter_bf16_dot()


def pytest_collection_modifyitems(config, items):
    """Without CUDA, skip the `cuda` tests. With CUDA, skip the `interpreter` tests: they run the Triton kernels on
    CPU tensors, which needs TRITON_INTERPRET=1, and that is set only where CUDA is absent (here the kernels run
    natively, and the GPU tests cover them on CUDA tensors)."""
    if HAS_CUDA:
        marker, skip = "interpreter", pytest.mark.skip(
            reason="runs Triton kernels on CPU tensors, which needs the Triton interpreter; it is off where CUDA is "
                   "present (the native kernels are tested on CUDA tensors instead)")
    else:
        marker, skip = "cuda", pytest.mark.skip(reason="needs a CUDA GPU (too slow for the Triton interpreter or "
                                                       "GPU-only)")
    for item in items:
        # The marker only: item.keywords also holds parametrize ids, and a case with the id "cuda" is no GPU test.
        if item.get_closest_marker(marker) is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _share_the_gpu_between_xdist_workers():
    """pytest-xdist workers share one GPU: an engine built without a KV-cache size takes 85% of the free memory
    by default, which would leave the other workers' engines nothing. Under xdist on CUDA, each worker's
    default becomes 80% / workers of what is free (test engines are small; explicit sizes are unaffected)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not HAS_CUDA or workers <= 1:
        yield
        return
    from trinfer.runtime import kv_cache

    saved = kv_cache.DEFAULT_CUDA_MEMORY_FRACTION
    kv_cache.DEFAULT_CUDA_MEMORY_FRACTION = 0.8 / workers
    yield
    kv_cache.DEFAULT_CUDA_MEMORY_FRACTION = saved


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---- kernel backends ----------------------------------------------------------------------------------------
# Kernel tests take `kernel_backend` instead of importing trinfer.triton_kernels, and call
# `kernel_backend.<kernel>(...)`: each test then runs for "triton" (always) and for "cuda" (the CUDA C++
# backend, trinfer.cuda_kernels) where a GPU is visible and the backend loads, else that case is skipped with
# the reason. On a GPU without the installed extension, the first CUDA case builds it with load_jit() (bounded
# by TRINFER_CUDA_BUILD_TIMEOUT, default 600 s; a finished build of the same sources is loaded at once, so
# each pytest-xdist worker pays nothing more). When the build fails or times out, the CUDA cases are skipped
# with its error (bench/gpu_check.sh reports the failed build stage itself). TRINFER_TEST_CUDA_JIT=0: no build
# here, only a finished one is loaded (the GPU check sets it when its build stage failed).

@pytest.fixture(scope="session")
def _cuda_backend():
    """(trinfer.cuda_kernels, None) when its kernels can run here, else (None, why not)."""
    from trinfer import cuda_kernels

    if not HAS_CUDA:
        return None, "no CUDA GPU here (torch.cuda.is_available() is False)"
    if not cuda_kernels.is_available():
        from torch.utils.cpp_extension import CUDA_HOME

        build = os.environ.get("TRINFER_TEST_CUDA_JIT", "1") != "0"
        if build and CUDA_HOME is None:
            return None, f"{cuda_kernels.unavailable_reason()}, and no nvcc for a JIT build"
        try:
            cuda_kernels.load_jit(build=build)
        except RuntimeError as exc:
            why = "" if build else " (TRINFER_TEST_CUDA_JIT=0: no JIT build here)"
            return None, f"{cuda_kernels.unavailable_reason()}; load_jit: {exc}{why}"
    return cuda_kernels, None


@pytest.fixture(params=["triton", "cuda"])
def kernel_backend(request):
    """The kernel module under test: trinfer.triton_kernels, or trinfer.cuda_kernels (same signatures)."""
    if request.param == "triton":
        import trinfer.triton_kernels as triton_kernels

        return triton_kernels
    module, reason = request.getfixturevalue("_cuda_backend")
    if module is None:
        pytest.skip(f"CUDA C++ backend: {reason}")
    return module


@pytest.fixture(scope="session")
def default_gguf() -> str:
    """Path of the default model's GGUF (SmolLM2-135M-Instruct), or skip when its package is not installed."""
    from trinfer.runtime.default_model import default_model_path

    try:
        return default_model_path()
    except (FileNotFoundError, ImportError) as exc:
        pytest.skip(f"default model not installed: {exc}")
