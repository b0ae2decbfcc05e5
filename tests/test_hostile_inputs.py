"""Hostile inputs: every malformed file, template, prompt and argument in tests/hostile/ is refused with the
right error naming the file and key, within bounded time and memory, and the engine keeps serving.

The cases run in a few worker processes (tests/hostile/worker.py, one per group), so that peak memory is
measured per case in a process of its own and a runaway case cannot take the test process with it. Each
case is then one test here: its verdict (error type, names in the message, or the success check), its
CPU time (< 2 s; the workers run side by side, and the machine may be shared) and its peak resident memory above what the worker held before it (< 500 MB), and the good
request the worker's engine serves after it (the same tokens as before any case ran).
"""
import json
import os
import subprocess
import sys

import pytest

import hostile as H

MAX_SECONDS = 2.0
MAX_PEAK_MB = 500.0
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    pytest.importorskip("safetensors")
    path = str(tmp_path_factory.mktemp("hostile-base"))
    H.build_base(path)
    return path


@pytest.fixture(scope="module")
def workers(base, tmp_path_factory):
    """One worker process per group, all started at once (they share the cores); {group: (process, output)}."""
    out_dir = str(tmp_path_factory.mktemp("hostile-results"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
               RUST_BACKTRACE="0", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the torch backend only
    procs = {}
    for group in H.GROUPS:
        out = os.path.join(out_dir, f"{group}.json")
        procs[group] = (subprocess.Popen([sys.executable, os.path.join(TESTS, "hostile", "worker.py"), base, group, out],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                         cwd=REPO), out)
    yield procs
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


_RESULTS: dict = {}


def _group_results(workers, group: str) -> dict:
    if group not in _RESULTS:
        proc, out = workers[group]
        try:
            _, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0 or not os.path.exists(out):
            _RESULTS[group] = {"error": f"worker for {group!r} failed (exit {proc.returncode}):\n{stderr[-4000:]}"}
        else:
            with open(out, encoding="utf-8") as f:
                _RESULTS[group] = json.load(f)
    return _RESULTS[group]


@pytest.mark.parametrize("case", H.CASES, ids=lambda c: c.name)
def test_hostile_input(case, workers):
    results = _group_results(workers, case.group)
    assert "error" not in results, results.get("error")
    r = results["cases"][case.name]
    assert not r["problems"], "\n".join(r["problems"]) + ("\n" + r["traceback"] if r["traceback"] else "")
    # CPU time, so that other processes on a shared machine cannot fail it (the wall time is in the results)
    assert r["cpu_seconds"] < MAX_SECONDS, f"took {r['cpu_seconds']:.2f} s of CPU ({r['seconds']:.2f} s wall)"
    if r["peak_mb"] is not None:
        assert r["peak_mb"] < MAX_PEAK_MB, f"peak resident memory {r['peak_mb']:.0f} MB above the worker's"


def test_every_group_runs_cases():
    assert set(H.GROUPS) == {"gguf", "hf", "requests", "cli"}
    names = [c.name for c in H.CASES]
    assert len(names) == len(set(names)), "case names must be unique"


def _normalizer(name: str):
    """The normalizers the bound must stay sound under: none, composing ones (measured), Llama 2's
    Prepend + Replace (never shorter: the text's own length counts), and others."""
    from tokenizers import normalizers as N

    return {"no-normalizer": None, "nfc": N.NFC(), "nfkc-lowercase": N.Sequence([N.NFKC(), N.Lowercase()]),
            "llama2": N.Sequence([N.Prepend("\u2581"), N.Replace(" ", "\u2581")]),
            "nfd-strip-accents": N.Sequence([N.NFD(), N.StripAccents()]), "strip": N.Strip()}[name]


@pytest.mark.parametrize("text", [
    "hello world " * 3000, "a" * 40_000, "1234567890" * 3000, " \n\t " * 4000, "<|im_start|>user\n" * 2000,
    "\u00e9t\u00e9 " * 5000, "x" * 30_000 + " y" * 3000, "e\u0301" * 20_000, "\ufb01 \u0130" * 8000,
], ids=["words", "one-word", "digits", "whitespace", "specials", "accents", "long-word-then-words",
        "combining-marks", "ligature-dotted-I"])
@pytest.mark.parametrize("normalizer", ["no-normalizer", "nfc", "nfkc-lowercase", "llama2", "nfd-strip-accents",
                                        "strip"])
def test_exceeds_is_a_sound_lower_bound(text, normalizer, base):
    """Tokenizer.exceeds() may say "don't know" (None), but a number it gives is never more than the real count.
    And one word of many characters gets a bound (no full tokenization) under every normalizer that keeps text
    (Strip may delete it: no bound there)."""
    from tokenizers import Tokenizer as Backend

    from trinfer.runtime.tokenizer import Tokenizer

    with open(os.path.join(base, "vocab.json"), encoding="utf-8") as f:
        backend = Backend.from_str(json.load(f)["tokenizer_json"])
    backend.normalizer = _normalizer(normalizer)
    tok = Tokenizer(backend)
    real = len(tok.encode(text, add_special_tokens=False))
    for limit in (10, 100, 1000, real - 1, real):
        bound = tok.exceeds(text, limit)
        if bound is not None:
            assert limit < bound <= real, (limit, bound, real)
    assert tok.exceeds(text, real) is None  # never claims a text that fits does not
    megaword = tok.exceeds("a" * 40_000, 10)
    assert (megaword is None) == (normalizer == "strip"), megaword
