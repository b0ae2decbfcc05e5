"""The CUDA C++ backend compiles, without a GPU: every csrc/*.cu for sm_90 and sm_80, and the torch glue.

- Kernels: `nvcc -c -arch=sm_90 -Xptxas -v` (device and host code) and `nvcc -cubin -arch=sm_80 -Xptxas -v`
  (device code) over every .cu file (they include only CUDA headers and csrc/trinfer_cuda.h), with the defines
  torch's extension build adds, all in parallel. Fails on any compile error or warning
  of ptxas, and on any local memory: a stack frame or spill stores/loads above 0. Prints registers per kernel.
- Glue: csrc/torch_bindings.cpp against this torch's headers with `g++ -fsyntax-only`. A CPU build of torch
  ships the c10/cuda headers but not the one CMake generates (c10/cuda/impl/cuda_cmake_macros.h), so the test
  writes that one-line stub; anything else missing is a real error.
Skipped where nvcc (resp. g++ or the CUDA headers) is absent. Nothing here runs a kernel.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trinfer.cuda_kernels import _build

ARCHS = (90, 80)
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS: the extension build compiles the kernels with these.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                      "--expt-relaxed-constexpr"]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else None


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"\btrinfer::(\(anonymous namespace\)::|decode::)?", "", o) for o in out]
    short = [re.sub(r"\((trinfer::)?\w+Args(, int)*\)$", "", s) for s in short]
    return dict(zip(names, short)) if len(short) == len(names) else {n: n for n in names}


def _compile(nvcc: str, src: str, arch: int, out_dir: Path) -> tuple[str, int, int, str]:
    # The host code (launchers) does not depend on the arch: compile it once, with the first arch (`-c`); the
    # other arch compiles the device code only (`-cubin`), which skips a host compiler pass.
    mode, ext = ("-c", "o") if arch == ARCHS[0] else ("-cubin", "cubin")
    obj = out_dir / f"{Path(src).stem}.sm{arch}.{ext}"
    cmd = [nvcc, mode, f"-arch=sm_{arch}", "-O3", "-std=c++17", *TORCH_NVCC_DEFINES, *_build.NVCC_FLAGS,
           "-Xptxas", "-v", "-I", str(_build.CSRC_DIR), src, "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return src, arch, proc.returncode, proc.stdout + proc.stderr


def _parse_ptxas(log: str) -> list[dict]:
    """One record per kernel: registers, stack frame, spill stores/loads, as ptxas -v reports them."""
    kernels, current = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$]+)'?", line)
        if m:
            current = kernels.setdefault(m.group(1), {"name": m.group(1)})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes lmem", line)
        if m:
            current["lmem"] = int(m.group(1))
    return list(kernels.values())


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (CUDA toolkit absent)")
def test_kernels_compile_for_sm90_and_sm80_without_local_memory(tmp_path):
    nvcc = _nvcc()
    sources = _build.kernel_sources()
    assert sources, f"no .cu files in {_build.CSRC_DIR}"
    # Biggest files first so the two archs' long poles start at once.
    jobs = sorted(((s, a) for s in sources for a in ARCHS), key=lambda j: -os.path.getsize(j[0]))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda j: _compile(nvcc, j[0], j[1], tmp_path), jobs))

    failures, rows = [], []
    for src, arch, rc, log in results:
        name = Path(src).name
        if rc != 0:
            failures.append(f"{name} sm_{arch}: nvcc exit {rc}\n{log[-4000:]}")
            continue
        if re.search(r"\bwarning\b", log, re.IGNORECASE):
            failures.append(f"{name} sm_{arch}: warnings\n" + "\n".join(
                line for line in log.splitlines() if "warning" in line.lower())[:4000])
        kernels = _parse_ptxas(log)
        if not kernels:
            failures.append(f"{name} sm_{arch}: no kernel reported by ptxas -v")
        for k in kernels:
            local = k.get("stack", 0) + k.get("spill_stores", 0) + k.get("spill_loads", 0) + k.get("lmem", 0)
            if "regs" not in k or "stack" not in k:
                failures.append(f"{name} sm_{arch}: could not parse ptxas -v for {k['name']}")
            elif local:
                failures.append(f"{name} sm_{arch}: {k['name']} uses local memory: stack {k['stack']} B, spill "
                                f"stores {k['spill_stores']} B, spill loads {k['spill_loads']} B")
            rows.append((arch, name, k["name"], k.get("regs", -1), local))

    names = _demangle(sorted({r[2] for r in rows}))
    print(f"\n{'arch':>5} {'regs':>4} {'local':>5}  kernel ({len(rows)} kernel builds, {len(jobs)} nvcc runs)")
    for arch, name, kernel, regs, local in sorted(rows, key=lambda r: (r[1], names[r[2]], -r[0])):
        print(f"sm_{arch} {regs:>4} {local:>5}  {name}: {names[kernel]}")
    assert not failures, "\n\n".join(failures)


def _glue_include_dirs(stub_dir: Path) -> list[str] | None:
    """Include dirs for the glue, or None when a prerequisite is missing here."""
    from torch.utils.cpp_extension import include_paths

    torch_dirs = include_paths()
    cuda_home = os.path.dirname(os.path.dirname(os.path.realpath(_nvcc() or ""))) if _nvcc() else None
    candidates = [d for d in (cuda_home and os.path.join(cuda_home, "include"), "/usr/local/cuda/include") if d]
    cuda_inc = next((d for d in candidates if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))), None)
    py_inc = sysconfig.get_paths()["include"]
    if cuda_inc is None or not os.path.exists(os.path.join(py_inc, "Python.h")):
        return None
    if not any(os.path.exists(os.path.join(d, "c10", "cuda", "CUDAStream.h")) for d in torch_dirs):
        return None
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(d, generated)) for d in torch_dirs):
        (stub_dir / generated).parent.mkdir(parents=True)
        (stub_dir / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return [*torch_dirs, str(stub_dir), cuda_inc, py_inc, str(_build.CSRC_DIR)]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_torch_glue_compiles(tmp_path):
    includes = _glue_include_dirs(tmp_path)
    if includes is None:
        pytest.skip("CUDA runtime headers, Python.h or torch's c10/cuda headers missing here")
    sources = _build.glue_sources()
    assert sources, f"no .cpp files in {_build.CSRC_DIR}"
    for src in sources:
        cmd = ["g++", "-fsyntax-only", "-std=c++20", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               *[f"-I{d}" for d in includes], src]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{Path(src).name} does not compile against torch's headers:\n{proc.stderr[-6000:]}"


def test_build_settings_list_the_sources():
    kernels, glue = _build.kernel_sources(), _build.glue_sources()
    assert {Path(p).name for p in glue} == {"torch_bindings.cpp"}
    assert {"rms_norm.cu", "sampling.cu", "kv_cache.cu", "paged_attention.cu"} <= {Path(p).name for p in kernels}
    # Kernel files stay free of torch so that plain nvcc compiles them anywhere.
    for path in kernels + [str(_build.CSRC_DIR / "common.cuh"), str(_build.CSRC_DIR / "paged_attention.cuh"),
                           str(_build.CSRC_DIR / "trinfer_cuda.h")]:
        text = Path(path).read_text()
        assert not re.search(r"#include\s*[<\"](torch|ATen|c10)/", text), f"{path} includes torch headers"
    assert _build.gencode_flags((80, 90)) == ["-gencode=arch=compute_80,code=sm_80",
                                              "-gencode=arch=compute_90,code=sm_90",
                                              "-gencode=arch=compute_90,code=compute_90"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-s", "-q"]))
