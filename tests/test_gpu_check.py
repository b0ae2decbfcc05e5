"""The GPU check's parts that a CPU can run (bench/gpu_check.sh and its helpers), so that a scarce GPU session
spends no minute on a script error.

- `gpu_check.sh --dry-run`: every selected test file and test id exists (pytest --collect-only), the stage limits
  add up within the budget, the summary machinery writes only declared files (at most 8); a budget the limits
  cannot fit fails it.
- bench/gpu_sanitize.sh's verdicts with a stand-in compute-sanitizer: clean, errors found, the tool not working
  here ("unavailable", not a failure), absent, cut by its limit.
- bench/gpu_cache.py: the archive's cap and order of value, a finished CUDA C++ build packed as library + stamp,
  an unfinished one made resumable over the same sources and not over others, a restore that stays inside its
  folder.
- bench/gpu_cases.py: the kernel cases (a subset, interpreted) pass and a wrong kernel fails; the end-to-end
  check agrees with transformers and fails on other weights.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")
needs_bash = pytest.mark.skipif(BASH is None, reason="bash not found")


def _run(args, env=None, timeout=120):
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([BASH, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@needs_bash
def test_dry_run_passes():
    proc = _run(["bench/gpu_check.sh", "--dry-run"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "gpu_check --dry-run: ok" in out and "FAIL" not in out
    worst = int(out.split("worst case ")[1].split("s")[0])
    assert worst <= 390
    assert "collected" in out and "(<= 8)" in out


@needs_bash
def test_limits_over_the_budget_are_refused():
    proc = _run(["bench/gpu_check.sh", "--limits"], env={"T_TESTS": "400"})
    assert proc.returncode == 1 and "FAIL: the stage limits add up to 730s > 390s" in proc.stdout, proc.stdout
    # --budget scales every limit: a second run's 240 s fit
    proc = _run(["bench/gpu_check.sh", "--limits", "--budget", "240"])
    assert proc.returncode == 0 and "worst case 234s" in proc.stdout and "for a budget of 240s" in proc.stdout, \
        proc.stdout


# ---------------------------------------------------------------------------------------------------------
# bench/gpu_sanitize.sh with a stand-in compute-sanitizer


FAKE_SANITIZER = """#!/usr/bin/env bash
# called as: SANITIZER --tool TOOL --print-limit 20 PYTHON -m bench.gpu_cases ARGS..., or with --version
[ "$1" = --version ] && { echo "Compute Sanitizer: a stand-in"; exit 0; }
case $FAKE_MODE in
  clean) echo "ok   a case"; echo "gpu_cases: 3 ok, 0 failed, 0 skipped"; echo "========= ERROR SUMMARY: 0 errors" ;;
  errors) echo "========= Invalid __global__ read of size 2 bytes"; echo "=========     at paged_decode_split_kernel"
          echo "gpu_cases: 3 ok, 0 failed, 0 skipped"; echo "========= ERROR SUMMARY: 2 errors" ;;
  broken) echo "========= Error: Target application terminated before first instrumented API call" ;;
  slow) sleep 30 ;;
esac
"""


@needs_bash
@pytest.mark.parametrize("mode, rc, words", [
    ("clean", 0, ["sanitize memcheck-0: ok 0 errors", "sanitize racecheck: ok", "sanitize: ok"]),
    ("errors", 1, ["sanitize memcheck-1: FAIL 2 errors; first: ========= Invalid __global__ read", "sanitize: FAIL"]),
    ("broken", 3, ["sanitize synccheck: unavailable", "sanitize: unavailable"]),
    ("slow", 4, ["sanitize memcheck-0: TIMEOUT cut at 1s", "sanitize: incomplete"]),
])
def test_sanitizer_verdicts(tmp_path, mode, rc, words):
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(FAKE_SANITIZER)
    fake.chmod(0o755)
    proc = _run(["bench/gpu_sanitize.sh", str(tmp_path / "logs")],
                env={"SANITIZER": str(fake), "FAKE_MODE": mode, "T_SANITIZE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == rc, out
    for w in words:
        assert w in out, (w, out)


@needs_bash
def test_sanitizer_absent_is_unavailable(tmp_path):
    proc = _run(["bench/gpu_sanitize.sh", str(tmp_path)], env={"SANITIZER": str(tmp_path / "none"),
                                                                "PATH": "/usr/bin:/bin", "CUDA_HOME": str(tmp_path)})
    assert proc.returncode == 3 and "sanitize: unavailable" in proc.stdout, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------------------
# bench/gpu_cache.py


def _tree(root: Path, files: dict[str, bytes], mtime: float | None = None):
    for name, data in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if mtime is not None:
            os.utime(p, (mtime, mtime))


def test_cache_archive_cap_order_and_roundtrip(tmp_path):
    from bench import gpu_cache

    root, old = tmp_path / "root", time.time() - 1000
    _tree(root, {"cuda/trinfer_cuda_jit.so": b"lib" * 1000, "cuda/trinfer_build.stamp": b"abc\n",
                 "cuda/paged_attention.cuda.o": b"obj", "cuda/lock": b"", "cuda/build.ninja": b"rules"})
    _tree(root, {"triton/AAA/k.cubin": b"x" * 5000, "triton/AAA/k.json": b"{}"}, mtime=old)  # compiled first
    _tree(root, {"triton/BBB/k.cubin": os.urandom(500_000), "triton/BBB/k.json": b"{}"})    # incompressible
    _tree(root, {"inductor/fx/graph": b"g" * 100})
    out = tmp_path / "gpu_cache.tar.gz"
    r = gpu_cache.pack(out, root, limit_bytes=200_000)
    # the finished build: library + stamp only; Triton entries whole, oldest first, the one over the cap left out
    assert r["members"] == ["cuda/trinfer_build.stamp", "cuda/trinfer_cuda_jit.so", "triton/AAA", "inductor"]
    assert r["dropped"] == ["triton/BBB"] and out.stat().st_size <= 200_000
    assert not (tmp_path / "gpu_cache.tar.gz.tmp").exists()
    again = tmp_path / "again"
    n = gpu_cache.restore(out, again)
    assert n == 5 and (again / "triton/AAA/k.cubin").read_bytes() == b"x" * 5000
    assert (again / "cuda/trinfer_cuda_jit.so").read_bytes() == b"lib" * 1000
    assert gpu_cache.main(["pack", str(out), str(root), "--limit-mib", "1"]) == 0  # the CLI, with everything in
    with tarfile.open(out) as t:
        assert "triton/BBB/k.cubin" in t.getnames()
    # compressing less than estimated: entries go, least valuable first, until the archive fits
    (root / "triton/BBB/k.cubin").write_bytes(os.urandom(360_000))
    r = gpu_cache.pack(out, root, limit_bytes=200_000)
    assert r["members"] == ["cuda/trinfer_build.stamp", "cuda/trinfer_cuda_jit.so", "triton/AAA"]
    assert out.stat().st_size <= 200_000


def test_cache_unfinished_build_resumes_only_over_the_same_sources(tmp_path):
    from bench import gpu_cache

    csrc, root, old = tmp_path / "csrc", tmp_path / "root", time.time() - 1000
    _tree(csrc, {"a.cu": b"kernel", "b.cuh": b"header"})
    _tree(root, {"cuda/a.cuda.o": b"obj", "cuda/.ninja_log": b"log", "cuda/build.ninja": b"rules",
                 "cuda/trinfer_build.flock": b""}, mtime=old)
    out = tmp_path / "c.tar.gz"
    r = gpu_cache.pack(out, root, limit_bytes=1 << 20, csrc=csrc)
    assert sorted(r["members"]) == ["cuda/.ninja_log", "cuda/a.cuda.o", "cuda/build.ninja", "cuda/csrc.sha256"]
    same = tmp_path / "same"
    gpu_cache.restore(out, same, csrc=csrc)
    assert (same / "cuda/a.cuda.o").stat().st_mtime > (csrc / "a.cu").stat().st_mtime  # ninja keeps it
    (csrc / "a.cu").write_bytes(b"edited kernel")
    other = tmp_path / "other"
    gpu_cache.restore(out, other, csrc=csrc)
    assert not (other / "cuda/a.cuda.o").exists() and (other / "cuda/build.ninja").exists()  # rebuilt


def test_cache_restore_stays_inside_its_folder(tmp_path):
    from bench import gpu_cache

    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as t:
        for name in ("../escape.txt", "triton/ok.txt"):
            data = tmp_path / "data"
            data.write_bytes(b"x")
            t.add(data, arcname=name)
    assert gpu_cache.restore(bad, tmp_path / "root") == 1
    assert (tmp_path / "root/triton/ok.txt").exists() and not (tmp_path / "escape.txt").exists()


# ---------------------------------------------------------------------------------------------------------
# bench/gpu_cases.py


def test_kernel_cases_pass_and_a_wrong_kernel_fails(monkeypatch):
    from bench import gpu_cases

    assert gpu_cases.main(["--cpu", "--quick"]) == 0
    lines = []
    broken = type("Broken", (), {"rms_norm": staticmethod(lambda x, w, eps, out: out.zero_()),
                                 "fused_add_rms_norm": staticmethod(lambda x, r, w, eps, out: out.zero_())})
    monkeypatch.setattr(gpu_cases, "kernel_module", lambda backend: (broken, None))
    case = next(c for c in gpu_cases.cases() if c.name.startswith("rms_norm") and c.quick)
    assert gpu_cases.run_cases([case], torch.device("cpu"), log=lines.append) == (0, 1, 0)
    assert lines[0].startswith("FAIL rms_norm") and "rms_norm 1 > 0.02" in lines[0]


def test_e2e_check_agrees_with_transformers_and_fails_on_other_weights(monkeypatch):
    from bench import gpu_cases
    from trinfer.runtime import random_model as rm

    small = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=500, max_position_embeddings=1024)
    lines = []
    assert gpu_cases.e2e_check(torch.device("cpu"), log=lines.append, config=small, prompt_lens=(5, 30), new=6)
    assert lines[-1].startswith("ok   e2e: 2 prompts")
    real = rm.hf_model
    monkeypatch.setattr(rm, "hf_model", lambda loaded, raw: real(rm.random_model(raw, device="cpu",
                                                                                 dtype=torch.float32, seed=99), raw))
    lines.clear()
    assert not gpu_cases.e2e_check(torch.device("cpu"), log=lines.append, config=small, prompt_lens=(5, 30), new=6)
    assert any(line.startswith("FAIL e2e prompt") for line in lines)
