"""The just-in-time build of csrc/ behind `trinfer.cuda_kernels.load_jit`: bounded, logged, cached, never stuck.

torch.utils.cpp_extension.load (ninja) runs in a child process, in its own process group, under a time limit
(`timeout_s`; a cut build kills nvcc and ninja with it), with `MAX_JOBS` set (default: every core) and its
verbose output streamed to the caller's stderr. A finished build leaves, beside the library, a stamp: the
SHA-256 of every file in csrc/, the compiler flags, the target archs and the torch/CUDA/Python versions. A later
call whose stamp matches loads that library at once with `torch.ops.load_library`, without ninja (so a build
directory restored from an archive on another machine of the same software is used as is). A compile error
leaves a failure stamp instead: later calls for the same sources raise at once with the log's tail, rather
than every process (each pytest-xdist worker) compiling again; editing csrc/ or deleting the file retries.

Concurrency: every builder holds an exclusive `fcntl.flock` on `<build dir>/trinfer_build.flock` while it builds,
and the kernel drops that lock when a process dies. So, once it holds it, a builder knows that a torch
cpp_extension `lock` file left in the directory belongs to a build that was killed (torch's own lock is a plain
file that outlives its process; left behind, it makes every later torch build of the directory wait forever),
and removes it. Processes that wait for the flock give up after `timeout_s` too.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import _build

LIBRARY = f"{_build.JIT_NAME}.so"
STAMP = "trinfer_build.stamp"          # the stamp of the library beside it
FAILED = "trinfer_build.failed"        # the stamp of sources whose build failed, then the log's tail
FLOCK = "trinfer_build.flock"
TORCH_LOCK = "lock"                    # torch.utils.cpp_extension's FileBaton
DEFAULT_TIMEOUT_S = 600.0              # a cold build on a small machine; TRINFER_CUDA_BUILD_TIMEOUT overrides


class BuildError(RuntimeError):
    """The build failed, timed out, or an earlier build of the same sources failed."""


def source_files(csrc: Path = _build.CSRC_DIR) -> list[Path]:
    """Every file the build reads from csrc/ (sources and headers)."""
    return sorted(p for p in Path(csrc).iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))


def stamp(archs, cuda_cflags: list[str], cflags: list[str], csrc: Path = _build.CSRC_DIR) -> str:
    """What a library built from csrc/ depends on, hashed: file contents, flags, archs and versions."""
    import torch

    h = hashlib.sha256()
    for p in source_files(csrc):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    meta = dict(archs=list(archs), cuda_cflags=cuda_cflags, cflags=cflags, torch=torch.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST"))
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cached_library(build_dir: str | os.PathLike, want: str) -> str | None:
    """The library in `build_dir` when its stamp is `want`, else None."""
    d = Path(build_dir)
    lib = d / LIBRARY
    if lib.is_file() and (_read(d / STAMP) or "").strip() == want:
        return str(lib)
    return None


def _earlier_failure(d: Path, want: str) -> str | None:
    text = _read(d / FAILED)
    if text and text.split("\n", 1)[0].strip() == want:
        return text.split("\n", 1)[1] if "\n" in text else ""
    return None


def _lock(path: Path, timeout_s: float):
    """An exclusive flock on `path`, waited for at most timeout_s (BuildError after)."""
    f = open(path, "a+")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                raise BuildError(f"load_jit: another process has been building in {path.parent} for over "
                                 f"{timeout_s:.0f}s; gave up waiting") from None
            time.sleep(0.5)


# The child: plain torch.utils.cpp_extension.load, its arguments as JSON (no import of trinfer there).
_CHILD = """
import json, sys
from torch.utils import cpp_extension
a = json.loads(sys.argv[1])
cpp_extension.load(name=a["name"], sources=a["sources"], extra_cflags=a["cflags"], extra_cuda_cflags=a["cuda_cflags"],
                   build_directory=a["build_dir"], verbose=True, is_python_module=False)
"""


def build(build_dir: str | os.PathLike, *, archs, cuda_cflags: list[str], cflags: list[str],
          timeout_s: float | None = None, max_jobs: int | None = None, log=None) -> str:
    """The path of a library built from csrc/ into `build_dir` (or found there with a matching stamp).

    Raises BuildError when the build fails or takes longer than `timeout_s` (default
    `$TRINFER_CUDA_BUILD_TIMEOUT` or DEFAULT_TIMEOUT_S), or when an earlier build of the same sources failed.
    `log`: a text stream for the compiler's output (default sys.stderr).
    """
    if timeout_s is None:
        timeout_s = float(os.environ.get("TRINFER_CUDA_BUILD_TIMEOUT", DEFAULT_TIMEOUT_S))
    log = log or sys.stderr
    d = Path(build_dir)
    d.mkdir(parents=True, exist_ok=True)
    want = stamp(archs, cuda_cflags, cflags)
    lib = cached_library(d, want)
    if lib is not None:
        return lib
    start = time.monotonic()
    with _lock(d / FLOCK, timeout_s):
        lib = cached_library(d, want)  # built by the process we waited for
        if lib is not None:
            return lib
        failure = _earlier_failure(d, want)
        if failure is not None:
            raise BuildError(f"load_jit: an earlier build of these csrc/ sources in {d} failed (delete {d / FAILED} "
                             f"to try again); its output ended with:\n{failure}")
        stale = d / TORCH_LOCK
        if stale.exists():  # we hold the flock, so no live build owns it
            print(f"[load_jit] removing a stale torch cpp_extension lock {stale}", file=log, flush=True)
            stale.unlink()
        for name in (LIBRARY, STAMP):
            (d / name).unlink(missing_ok=True)
        remaining = max(1.0, timeout_s - (time.monotonic() - start))
        jobs = max_jobs or int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        args = dict(name=_build.JIT_NAME, sources=_build.sources(), cflags=cflags, cuda_cflags=cuda_cflags,
                    build_dir=str(d))
        print(f"[load_jit] building {len(args['sources'])} sources in {d} for sm_{'/'.join(map(str, archs))} "
              f"(MAX_JOBS={jobs}, limit {remaining:.0f}s)", file=log, flush=True)
        rc, tail = _run_child([sys.executable, "-c", _CHILD, json.dumps(args)], dict(os.environ, MAX_JOBS=str(jobs)),
                              remaining, log)
        if rc is None:
            (d / TORCH_LOCK).unlink(missing_ok=True)  # the killed child's, if it got that far
            raise BuildError(f"load_jit: the build in {d} took longer than {remaining:.0f}s and was stopped (raise "
                             f"timeout_s or TRINFER_CUDA_BUILD_TIMEOUT; what was compiled is kept for the next try)")
        lib = d / LIBRARY
        if rc != 0 or not lib.is_file():
            (d / FAILED).write_text(want + "\n" + tail)
            raise BuildError(f"load_jit: the build in {d} failed (exit {rc}); its output ended with:\n{tail}")
        (d / STAMP).write_text(want + "\n")
        (d / FAILED).unlink(missing_ok=True)
        print(f"[load_jit] built {lib} in {time.monotonic() - start:.0f}s", file=log, flush=True)
        return str(lib)


def _run_child(cmd: list[str], env: dict, timeout_s: float, log) -> tuple[int | None, str]:
    """Run `cmd` in its own process group, its output copied to `log` as it comes; (exit code, or None when it ran
    past timeout_s and the whole group, ninja and nvcc included, was killed; the last 30 lines of its output)."""
    import selectors

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    out = bytearray()
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None, _tail(out)
            if sel.select(timeout=min(left, 1.0)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:  # EOF: the child is exiting
                    break
                log.write(chunk.decode(errors="replace"))
                log.flush()
                out += chunk
                del out[: max(0, len(out) - 16384)]
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), _tail(out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None, _tail(out)


def _tail(out: bytes, lines: int = 30) -> str:
    return "\n".join(out.decode(errors="replace").splitlines()[-lines:])
