"""Install trinfer.

The Triton kernels need no build step. The optional CUDA C++ backend in csrc/ is compiled into
`trinfer._C` only where a CUDA toolchain and a CUDA build of torch are both present; set
TRINFER_BUILD_CUDA=0 to skip it, =1 to insist (the build then fails loudly if it cannot be done).
Targets sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST is set. Sources and flags: trinfer/cuda_kernels/_build.py.
"""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_settings():
    """trinfer/cuda_kernels/_build.py, loaded by path (importing the package would need torch)."""
    path = os.path.join(HERE, "trinfer", "cuda_kernels", "_build.py")
    spec = importlib.util.spec_from_file_location("_trinfer_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cuda_extensions():
    want = os.environ.get("TRINFER_BUILD_CUDA", "auto").lower()
    if want in ("0", "no", "false", "off"):
        print("trinfer: skipping the CUDA C++ backend: TRINFER_BUILD_CUDA=0")
        return [], {}
    build = _build_settings()
    sources = [os.path.relpath(p, HERE) for p in build.sources()]
    reason = None
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch is not importable in an isolated build env
        reason = f"torch not importable ({exc})"
    else:
        if torch.version.cuda is None:
            reason = f"torch {torch.__version__} is a CPU build"
        elif CUDA_HOME is None:
            reason = "no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)"
        elif not any(s.endswith(".cu") for s in sources):
            reason = "no sources in csrc/"
    if reason is not None:
        if want in ("1", "yes", "true", "on"):
            raise RuntimeError(f"TRINFER_BUILD_CUDA=1 but the CUDA backend cannot be built: {reason}")
        print(f"trinfer: skipping the CUDA C++ backend: {reason}")
        return [], {}
    arch_flags = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else build.gencode_flags()
    ext = CUDAExtension(
        name=build.EXTENSION_NAME,
        sources=sources,
        extra_compile_args={"cxx": list(build.CXX_FLAGS), "nvcc": list(build.NVCC_FLAGS) + arch_flags},
    )
    print(f"trinfer: building the CUDA C++ backend {build.EXTENSION_NAME} from {len(sources)} sources")
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
        "starlette>=1.10,<2",
        "uvicorn>=0.54,<1",
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers>=5.17", "openai>=3.57,<4", "httpx>=0.28"]},
    entry_points={"console_scripts": ["trinfer=trinfer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
