"""Install trinfer.

The Triton kernels need no build step. The optional CUDA C++ backend in csrc/ is compiled into
`trinfer._C` only where a CUDA toolchain and a CUDA build of torch are both present; set
TRINFER_BUILD_CUDA=0 to skip it, =1 to insist (the build then fails loudly if it cannot be done).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _cuda_extensions():
    want = os.environ.get("TRINFER_BUILD_CUDA", "auto").lower()
    if want in ("0", "no", "false", "off"):
        return [], {}
    sources = sorted(glob.glob("csrc/*.cu") + glob.glob("csrc/*.cpp"))
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception as exc:  # torch is not importable in an isolated build env
        reason = f"torch not importable ({exc})"
    else:
        if torch.version.cuda is None:
            reason = "torch is a CPU build"
        elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            reason = "nvcc not found"
        elif not sources:
            reason = "no sources in csrc/"
    if reason is not None:
        if want in ("1", "yes", "true", "on"):
            raise RuntimeError(f"TRINFER_BUILD_CUDA=1 but the CUDA backend cannot be built: {reason}")
        print(f"trinfer: skipping the CUDA C++ backend: {reason}")
        return [], {}
    ext = CUDAExtension(
        name="trinfer._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo",
                     "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
        },
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extensions()

setup(
    name="trinfer",
    version="0.1.0",
    description="Lean LLM inference runtime with hand-written Triton kernels for low-latency greedy decoding",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["trinfer", "trinfer.*"]),
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy",
        "safetensors",
        "tokenizers",
        "gguf",
        "jinja2",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers>=5.17"]},
    entry_points={"console_scripts": ["trinfer=trinfer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
