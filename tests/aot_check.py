"""Compile every Triton kernel ahead of time for real GPU targets, on any machine (no GPU needed).

Run as a script (the test suite does it in a subprocess, because TRITON_INTERPRET must be unset here):

    python tests/aot_check.py [--arch 90 80] [--json out.json]

Every module of `trinfer.triton_kernels` that defines `aot_specs()` contributes the launch configurations
its wrapper really picks. Each is compiled for each arch; the check fails on a compile error, on local
memory (spills) reported by cuobjdump, on shared memory over the chip's per-block limit, and on sm_90
kernels that should use wgmma but do not. It prints registers and shared memory per kernel.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Max dynamic shared memory per block (opt-in): H100/H200 227 KB, A100 163 KB.
SHARED_LIMIT = {90: 232448, 80: 166912}


def all_specs():
    import trinfer.triton_kernels as pkg

    specs = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.ispkg:
            continue
        mod = importlib.import_module(f"trinfer.triton_kernels.{info.name}")
        if hasattr(mod, "aot_specs"):
            specs.extend(mod.aot_specs())
    return specs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes, tag: str) -> dict:
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=f"-{tag}.cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"could not parse cuobjdump output: {text!r}")
    reg, stack, shared, local = map(int, m.groups())
    return dict(regs=reg, stack=stack, static_shared=shared, local=local)


def _signature_and_attrs(spec):
    """Mimic the JIT's specialization: it marks pointers (16-byte aligned, as torch allocates) and integers
    that are multiples of 16 with `tt.divisibility=16`, which enables vector loads and cp.async/TMA.

    Pointers get it by default ("*fp16"; "*fp16:1" opts out for a possibly misaligned view); integers only
    when their type says so ("i32:16": a stride or size that is a multiple of 16 at the real shapes).
    """
    arg_names = spec.fn.arg_names
    sig, attrs = {}, {}
    for name, typ in spec.signature.items():
        base, _, hint = typ.partition(":")
        sig[name] = base
        if (base.startswith("*") and hint != "1") or hint == "16":
            attrs[(arg_names.index(name),)] = [["tt.divisibility", 16]]
    # A spec may also list such integers in extra["divisible_by_16"] (e.g. head_dim-multiple strides).
    for name in spec.extra.get("divisible_by_16", ()):
        attrs[(arg_names.index(name),)] = [["tt.divisibility", 16]]
    for k in spec.constexprs:
        sig[k] = "constexpr"
    return sig, attrs


def compile_one(args):
    index, arch = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = all_specs()[index]
    row = dict(name=spec.name, arch=arch, num_warps=spec.num_warps, num_stages=spec.num_stages)
    try:
        sig, attrs = _signature_and_attrs(spec)
        src = ASTSource(fn=spec.fn, signature=sig, constexprs=dict(spec.constexprs), attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        row.update(_resource_usage(kernel.asm["cubin"], f"{index}-{arch}"))
        row["shared"] = int(kernel.metadata.shared)
        row["wgmma"] = "wgmma" in kernel.asm["ptx"]
        problems = []
        if row["local"] > 0 or row["stack"] > 0:
            problems.append(f"spills: LOCAL={row['local']} STACK={row['stack']}")
        if row["shared"] > SHARED_LIMIT[arch]:
            problems.append(f"shared memory {row['shared']} B > sm_{arch} limit {SHARED_LIMIT[arch]} B")
        if spec.expect_wgmma and arch == 90 and not row["wgmma"]:
            problems.append("expected wgmma on sm_90, PTX has none")
        row["error"] = "; ".join(problems) or None
    except Exception as exc:  # report every failure, not only the first
        row["error"] = f"compile failed: {type(exc).__name__}: {str(exc)[:400]}"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--json", default=None, help="write all rows to this file")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--filter", default="", help="only specs whose name contains this")
    args = ap.parse_args(argv)
    specs = all_specs()
    # Specs of different names that compile to the same binary (same kernel, signature with its divisibility
    # hints, constexprs, warps and stages) are compiled once: the first name stands for the others.
    seen: set[tuple] = set()
    unique = []
    for i, s in enumerate(specs):
        key = (s.fn.fn.__module__, s.fn.fn.__name__, json.dumps(s.signature, sort_keys=True),
               json.dumps(s.constexprs, sort_keys=True, default=str), s.num_warps, s.num_stages,
               tuple(s.extra.get("archs", ())), s.expect_wgmma)
        if args.filter in s.name and key not in seen:
            seen.add(key)
            unique.append(i)
    # A spec whose configuration is chosen per GPU generation names its arch(s) in extra["archs"].
    work = [(i, a) for i in unique for a in args.arch if a in specs[i].extra.get("archs", (a,))]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(compile_one, work))
    print(f"{'kernel':60s} {'sm':>3s} {'warps':>5s} {'stg':>3s} {'regs':>4s} {'shared':>7s} wgmma  status")
    for r in rows:
        print(f"{r['name']:60s} {r['arch']:3d} {r['num_warps']:5d} {r['num_stages']:3d} {r.get('regs', -1):4d} "
              f"{r.get('shared', -1):7d} {str(r.get('wgmma', '-')):5s}  {r['error'] or 'ok'}")
    failed = [r for r in rows if r["error"]]
    print(f"{len(rows) - len(failed)} compiled clean, {len(failed)} failed, over {len(unique)} distinct of "
          f"{len(specs)} specs")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
