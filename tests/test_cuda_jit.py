"""The CUDA C++ JIT build's machinery (trinfer/cuda_kernels/_jit.py), on the CPU: the compiler is replaced by a
small Python child that plays a build that succeeds, fails or hangs.

What a GPU machine needs from it: a build cut by its limit kills its whole process group and raises instead of
hanging; a torch cpp_extension `lock` left by a killed build is removed (it made every later build wait forever);
a finished build is loaded again without compiling (what the GPU check's cache archive relies on) and a failed one
is not compiled again by every process; edited sources build again.
"""
import fcntl
import io
import os
import time

import pytest

from trinfer.cuda_kernels import _jit

FLAGS = dict(archs=(90,), cuda_cflags=["-O3"], cflags=["-O3"])

# The child gets the build's arguments as JSON in argv[1], as the real one does.
OK = """
import json, sys
a = json.loads(sys.argv[1])
open(a["build_dir"] + "/runs", "a").write("x")
print("compiling", len(a["sources"]), "sources", flush=True)
open(a["build_dir"] + "/{lib}", "w").write("not really a library")
""".replace("{lib}", _jit.LIBRARY)
FAIL = """
import json, sys
a = json.loads(sys.argv[1])
open(a["build_dir"] + "/runs", "a").write("x")
print("paged_attention.cu(12): error: boom", flush=True)
sys.exit(1)
"""
HANG = """
import json, subprocess, sys, time
a = json.loads(sys.argv[1])
p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # nvcc, say
open(a["build_dir"] + "/grandchild", "w").write(str(p.pid))
open(a["build_dir"] + "/lock", "w").write("")  # torch's FileBaton, held
print("ninja: building", flush=True)
time.sleep(60)
"""


def _build(tmp_path, monkeypatch, child, **kw):
    monkeypatch.setattr(_jit, "_CHILD", child)
    log = io.StringIO()
    return _jit.build(tmp_path, log=log, **FLAGS, **kw), log.getvalue()


def _runs(tmp_path):
    return len((tmp_path / "runs").read_text()) if (tmp_path / "runs").exists() else 0


def test_a_finished_build_is_stamped_and_loaded_again_without_compiling(tmp_path, monkeypatch):
    (tmp_path / _jit.TORCH_LOCK).write_text("")  # left by a build that was killed
    lib, log = _build(tmp_path, monkeypatch, OK, max_jobs=3)
    assert lib == str(tmp_path / _jit.LIBRARY) and _runs(tmp_path) == 1
    assert "removing a stale torch cpp_extension lock" in log and not (tmp_path / _jit.TORCH_LOCK).exists()
    assert "MAX_JOBS=3" in log and "compiling" in log  # the compiler's output is streamed
    assert _build(tmp_path, monkeypatch, OK)[0] == lib and _runs(tmp_path) == 1  # stamp matches: no build
    assert _jit.cached_library(tmp_path, _jit.stamp(**FLAGS)) == lib
    # Other flags (or edited sources, or another torch) make another stamp: built again.
    monkeypatch.setattr(_jit, "_CHILD", OK)
    _jit.build(tmp_path, log=io.StringIO(), archs=(80,), cuda_cflags=["-O3"], cflags=["-O3"])
    assert _runs(tmp_path) == 2 and _jit.cached_library(tmp_path, _jit.stamp(**FLAGS)) is None


def test_a_failed_build_raises_with_its_output_and_is_not_retried(tmp_path, monkeypatch):
    with pytest.raises(_jit.BuildError, match=r"(?s)failed \(exit 1\).*error: boom"):
        _build(tmp_path, monkeypatch, FAIL)
    with pytest.raises(_jit.BuildError, match=r"(?s)an earlier build of these csrc/ sources .* failed.*error: boom"):
        _build(tmp_path, monkeypatch, FAIL)
    assert _runs(tmp_path) == 1
    (tmp_path / _jit.FAILED).unlink()  # as the message says: delete it to try again
    assert _build(tmp_path, monkeypatch, OK)[0] and _runs(tmp_path) == 2


def test_a_build_past_its_limit_is_killed_with_its_children(tmp_path, monkeypatch):
    start = time.monotonic()
    with pytest.raises(_jit.BuildError, match="took longer than"):
        _build(tmp_path, monkeypatch, HANG, timeout_s=3)
    assert time.monotonic() - start < 20
    pid = int((tmp_path / "grandchild").read_text())
    for _ in range(50):  # killed with the group (a zombie until its parent, also killed, is reaped by init)
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the build's child process {pid} outlived the timeout")
    assert not (tmp_path / _jit.TORCH_LOCK).exists()  # the killed build's lock does not block the next one
    assert not (tmp_path / _jit.FAILED).exists()  # a timeout is not a compile error: the next call builds again
    assert _build(tmp_path, monkeypatch, OK)[0] and _runs(tmp_path) == 1


def test_waiting_for_another_builder_is_bounded(tmp_path, monkeypatch):
    with open(tmp_path / _jit.FLOCK, "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is building
        with pytest.raises(_jit.BuildError, match="gave up waiting"):
            _build(tmp_path, monkeypatch, OK, timeout_s=1)
    assert _build(tmp_path, monkeypatch, OK)[0] and _runs(tmp_path) == 1
