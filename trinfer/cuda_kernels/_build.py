"""Build settings of the CUDA C++ backend, one place for setup.py, `load_jit()` and the compile check.

Plain Python with no import of torch or of the package: setup.py loads this file by path, before torch is known
to be importable. The sources live in `csrc/` at the repository root:

- `csrc/*.cu`: the kernels and their launchers. They include only CUDA headers and `csrc/trinfer_cuda.h`,
  so plain `nvcc` compiles them anywhere (tests/test_csrc_compile.py does, for sm_90 and sm_80).
- `csrc/torch_bindings.cpp`: the torch glue (custom-op registration, tensor checks, current stream). It needs
  a CUDA build of torch, so it is compiled only where one exists (setup.py, `load_jit()`).
"""
from __future__ import annotations

import os
from pathlib import Path

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
EXTENSION_NAME = "trinfer._C"      # what setup.py builds
JIT_NAME = "trinfer_cuda_jit"      # what load_jit() builds
OP_NAMESPACE = "trinfer_cuda"      # torch.ops.trinfer_cuda.*
ARCHS = (80, 90)                   # setup.py's targets: A100 (correct) and H100/H200 (tuned)

# The kernels need no fast-math: logsumexp and softmax use accurate expf/exp2f/logf and IEEE division.
# torch's cpp_extension adds its own flags (-std, -D__CUDA_NO_HALF_OPERATORS__ and friends, which the kernels
# respect: every fp16/bf16 conversion is an explicit intrinsic).
NVCC_FLAGS = ["-O3", "-lineinfo"]
CXX_FLAGS = ["-O3"]


def kernel_sources(csrc: Path = CSRC_DIR) -> list[str]:
    """The .cu files (kernels + launchers; no torch)."""
    return sorted(str(p) for p in Path(csrc).glob("*.cu"))


def glue_sources(csrc: Path = CSRC_DIR) -> list[str]:
    """The .cpp files (torch glue; needs a CUDA torch)."""
    return sorted(str(p) for p in Path(csrc).glob("*.cpp"))


def sources(csrc: Path = CSRC_DIR) -> list[str]:
    return kernel_sources(csrc) + glue_sources(csrc)


def gencode_flags(archs=ARCHS, *, ptx: bool = True) -> list[str]:
    """`-gencode` flags for SASS of each arch, plus PTX of the newest (so newer GPUs can JIT it)."""
    archs = sorted(int(a) for a in archs)
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if ptx and archs:
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def default_jit_build_dir(tag: str) -> str:
    """`$TRINFER_CUDA_BUILD_DIR`, else `$XDG_CACHE_HOME/trinfer/cuda/<tag>` (~/.cache when unset)."""
    explicit = os.environ.get("TRINFER_CUDA_BUILD_DIR")
    if explicit:
        return explicit
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "trinfer", "cuda", tag)
