"""Test harness. Without CUDA, Triton kernels run on CPU tensors under the interpreter.

TRITON_INTERPRET is read when @triton.jit decorates a kernel (at import of the kernel modules), so it is
set here before any trinfer module is imported. With a CUDA device the same tests run natively.
"""
import os

import torch

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
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (too slow for the Triton interpreter or GPU-only)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
