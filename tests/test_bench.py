"""The benchmark harness and every kernel benchmark script, exercised at tiny sizes so they cannot rot.

On a CPU machine the scripts run in --cpu-smoke mode (Triton under the interpreter, wall clock); with a CUDA
GPU they run --tiny on it (CUDA events, L2 flush, the GPU-only library providers). No test asserts a time.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import harness as H  # noqa: E402
from bench import shapes as S  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
MODE = "gpu-tiny" if HAS_CUDA else "cpu-smoke"

# (script module, kernels it benchmarks). torch.compile costs seconds per shape on a CPU, so only the first
# script runs it; the others run every other provider.
SCRIPTS = [
    ("bench_rms_norm", ("rms_norm", "fused_add_rms_norm"), True),
    ("bench_sampling", ("greedy_sample", "greedy_sample+logprobs", "lm_head_greedy"), False),
    ("bench_rotary", ("apply_rotary", "rotary_write_kv_cache", "qk_norm_rotary_write_kv_cache"), False),
    ("bench_silu_and_mul", ("silu_and_mul",), False),
    ("bench_kv_cache", ("write_kv_cache",), False),
    ("bench_prefill_attention", ("paged_prefill_attention",), False),
    ("bench_decode_attention", ("paged_decode_attention",), False),
    ("bench_linear", ("linear[dense]", "linear[int8]", "linear[int4]", "linear[q8_0]", "linear[q4_0]",
                      "linear[q4_1]"), False),
]

NOT_LANDED = ("ImportError: trinfer.triton_kernels has no", "ImportError: trinfer.triton_kernels.references has no")


def _strict_json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"{path.name}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _smoke_args(tmp_path: Path, providers: list[str] | None) -> list[str]:
    args = ["--out", str(tmp_path)]
    args += ["--tiny", "--rep-ms", "5", "--warmup-ms", "2"] if HAS_CUDA else ["--cpu-smoke"]
    if providers is not None:
        args += ["--providers", ",".join(providers)]
    return args


@pytest.mark.parametrize("module_name,kernels,with_compile", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_script_smoke(module_name, kernels, with_compile, tmp_path):
    import importlib

    module = importlib.import_module(f"bench.{module_name}")
    names = {p.name for b in module.benchmarks() for p in b.providers}
    providers = None if with_compile else sorted(names - {"torch_compile", "flex_attention"})
    data = module.main(_smoke_args(tmp_path, providers))

    assert data["schema"] == H.SCHEMA and data["mode"] == MODE
    stem = module_name.removeprefix("bench_")
    files = {p.name for p in tmp_path.iterdir()}
    assert {f"{stem}.{MODE}.json", f"{stem}.{MODE}.md", f"{stem}.{MODE}.png"} <= files, files

    on_disk = _strict_json(tmp_path / f"{stem}.{MODE}.json")
    rows = on_disk["rows"]
    assert {r["kernel"] for r in rows} == set(kernels)
    assert on_disk["ceilings"]["copy_gbps"] > 0 and on_disk["ceilings"]["matmul_tflops"] > 0
    for r in rows:
        assert set(H.ROW_KEYS) <= set(r), f"row lacks {set(H.ROW_KEYS) - set(r)}"
        assert r["status"] in ("ok", "error", "skipped"), r
        assert r["torch"] == torch.__version__ and r["date"] and r["mode"] == MODE
        assert r["bytes"] > 0
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
            assert r["gbps"] > 0 and r["pct_copy"] > 0
            assert r["check"] != "MISMATCH", f"{r['kernel']} {r['shape']} {r['provider']}: error {r['check_err']}"
            assert r["check"] in ("ok", "reference", "oracle"), r
        elif r["status"] == "error":
            # Only ops that have not landed yet may fail; anything else is a bug in the script or the op.
            assert r["error"].startswith(NOT_LANDED), f"{r['kernel']} {r['shape']} {r['provider']}: {r['error']}"
        if r["provider"] == "cuda" and not HAS_CUDA:
            assert r["status"] == "skipped" and "CUDA" in r["error"]
    if with_compile:
        assert any(r["provider"] == "torch_compile" and r["status"] == "ok" for r in rows)
    # Every case has exactly one row per provider that ran for it.
    seen = [(r["kernel"], r["shape"], r["provider"]) for r in rows]
    assert len(seen) == len(set(seen))

    md = (tmp_path / f"{stem}.{MODE}.md").read_text()
    for k in kernels:
        assert f"## {k}" in md
    assert "| shape | dtype | provider | median us |" in md
    if MODE == "cpu-smoke":
        assert "NOT GPU measurements" in md and "NOT GPU measurements" in on_disk["banner"]
    assert (tmp_path / f"{stem}.{MODE}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_all_only_and_summary(tmp_path, capsys):
    from bench import run_all, summarize

    data = run_all.main(["--only", "silu_and_mul,greedy_sample", "--no-plot"]
                        + _smoke_args(tmp_path, ["torch_ref", "triton", "torch.argmax", "F.silu(gate)*up"]))
    assert {r["kernel"] for r in data["rows"]} == {"silu_and_mul", "greedy_sample"}
    path = tmp_path / f"kernels.{MODE}.json"
    assert path.exists() and not (tmp_path / f"kernels.{MODE}.png").exists()
    assert summarize.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "silu_and_mul" in out and "best other" in out and "rows:" in out
    with pytest.raises(SystemExit, match="unknown names"):
        run_all.main(["--only", "no_such_kernel"])


# ---------------------------------------------------------------------------------------------------------
# Harness units
# ---------------------------------------------------------------------------------------------------------

def test_quantiles_and_timing():
    vals = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert H.quantile(vals, 0.5) == 3.0
    assert H.quantile(vals, 0.1) == pytest.approx(1.4)
    assert H.quantile(vals, 0.9) == pytest.approx(4.6)
    assert H.quantile([7.0], 0.2) == 7.0 and math.isnan(H.quantile([], 0.5))
    t = H.Timing.from_samples([5.0, 1.0, 3.0, 2.0, 4.0], "test")
    assert (t.median_ms, t.min_ms, t.mean_ms, t.n_reps) == (3.0, 1.0, 3.0, 5)
    assert t.p10_ms <= t.p20_ms <= t.median_ms <= t.p80_ms <= t.p90_ms
    with pytest.raises(ValueError, match="samples_ms"):
        H.Timing.from_samples([], "test")


def test_byte_and_flop_counts():
    from bench.bench_decode_attention import decode_attention_bytes, decode_attention_flops
    from bench.bench_linear import linear_bytes, weight_bytes
    from bench.bench_kv_cache import write_kv_cache_bytes
    from bench.bench_prefill_attention import causal_pairs, prefill_attention_bytes, prefill_attention_flops
    from bench.bench_rms_norm import fused_add_rms_norm_bytes, rms_norm_bytes
    from bench.bench_rotary import apply_rotary_bytes, rotary_write_kv_cache_bytes
    from bench.bench_sampling import greedy_sample_bytes, lm_head_greedy_bytes
    from bench.bench_silu_and_mul import silu_and_mul_bytes

    assert H.copy_bytes_moved(100) == 200 and H.matmul_flops(2, 3, 4) == 48
    assert rms_norm_bytes(rows=2, hidden=4, elem=2) == 2 * 2 * 4 * 2 + 4 * 2
    assert fused_add_rms_norm_bytes(rows=2, hidden=4, elem=2) == 4 * 2 * 4 * 2 + 4 * 2
    assert silu_and_mul_bytes(rows=3, intermediate=5, elem=2) == 3 * 10 * 2 + 3 * 5 * 2
    assert greedy_sample_bytes(batch=2, vocab=10, elem=4, logprobs=False) == 80 + 16
    assert greedy_sample_bytes(batch=2, vocab=10, elem=4, logprobs=True) == 80 + 16 + 8
    assert lm_head_greedy_bytes(batch=2, hidden=8, vocab=10, elem=2) == 160 + 32 + 16
    assert write_kv_cache_bytes(tokens=3, kv_heads=2, head_dim=4, elem=2) == 4 * 3 * 2 * 4 * 2 + 24
    assert apply_rotary_bytes(2, 4, 2, 8, 2) == 2 * 2 * 6 * 8 * 2 + 2 * 8 * 4 + 16
    assert rotary_write_kv_cache_bytes(2, 4, 2, 8, 2) == apply_rotary_bytes(2, 4, 2, 8, 2) + 3 * 2 * 2 * 8 * 2 + 16
    # Decode: K and V of every sequence once, q and out, 4-byte block-table entries and lengths.
    assert decode_attention_bytes(2, 32, 4, 2, 8, 2, 16) == 2 * 2 * 32 * 2 * 8 * 2 + 2 * 2 * 4 * 8 * 2 + 2 * 2 * 4 + 8
    assert decode_attention_flops(2, 32, 4, 8) == 4 * 2 * 4 * 32 * 8
    # Causal pairs: a fresh prompt is a triangle; a chunk adds the whole cached prefix for each query.
    assert causal_pairs(4, 4) == 10 and causal_pairs(2, 5) == 2 * 3 + 3
    with pytest.raises(ValueError, match="q_len"):
        causal_pairs(5, 4)
    assert prefill_attention_flops(4, 4, 2, 8) == 4 * 2 * 8 * 10
    assert prefill_attention_bytes(4, 4, 2, 1, 8, 2, 16) == 2 * 4 * 2 * 8 * 2 + 2 * 4 * 1 * 8 * 2 + 4 + 12
    # linear: the weight in its format (int4 [8, 64], groups of 32: 8 words, 2 fp16 scales, 2 uint8 zeros per
    # row), then x read and y written; each count equals the bytes of a weight made in that format.
    assert linear_bytes("int4", 3, 8, 64, 2, 32) == 8 * 8 * 4 + 8 * 2 * 3 + 3 * 64 * 2 + 3 * 8 * 2
    assert weight_bytes("q4_1", 8, 64, 2) == 8 * 2 * 20 and weight_bytes("dense", 8, 64, 2) == 8 * 64 * 2
    from trinfer.runtime.quantization import random_weight

    for fmt in ("int8", "int4", "q8_0", "q4_0", "q4_1"):
        assert weight_bytes(fmt, 8, 200 if fmt.startswith("int") else 96, 2) == random_weight(
            fmt, (8, 200 if fmt.startswith("int") else 96), device="cpu").nbytes, fmt


def test_rel_l2_error():
    a = torch.randn(16, dtype=torch.float64)
    assert H.rel_l2_error(a, a.clone()) == 0.0
    assert H.rel_l2_error((a, a), (a, a * 1.01)) == pytest.approx(0.01 / 1.01, rel=1e-6)
    ids = torch.tensor([1, 2, 3, 4])
    assert H.rel_l2_error(ids, torch.tensor([1, 2, 0, 4])) == 0.25
    assert H.rel_l2_error(torch.tensor([float("nan"), 1.0]), torch.tensor([1.0, 1.0])) == math.inf
    with pytest.raises(ValueError, match="shape"):
        H.rel_l2_error(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="tensors"):
        H.rel_l2_error((a,), (a, a))


def test_ceilings_on_cpu_wall_clock():
    c = H.measure_ceilings(torch.device("cpu"), H.WallTimer(reps=1), copy_mib=1, matmul_n=32)
    assert c.copy_bytes == 2 * (1 << 20) and c.copy_gbps > 0
    assert c.matmul_shape == (32, 32, 32) and c.matmul_tflops > 0 and c.matmul_dtype == "fp32"
    assert "wall-clock" in c.timer


def test_cuda_timer():
    if not HAS_CUDA:
        pytest.skip("CudaTimer needs a CUDA GPU (CUDA events); the CPU smoke runs use WallTimer")
    timer = H.CudaTimer(torch.device("cuda"), warmup_ms=1, rep_ms=5)
    x = torch.randn(1 << 20, device="cuda")
    t = timer(lambda: x.mul_(1.0001))
    assert t.n_reps >= 10 and 0 < t.p10_ms <= t.median_ms <= t.p90_ms and "cuda-event" in t.timer
    assert timer.flush_bytes >= 256 << 20


def test_paged_block_tables_are_disjoint_and_shuffled():
    torch.manual_seed(0)
    lens = [33, 1, 16, 17]
    tables, num_blocks = H.paged_block_tables(lens, 16, "cpu", spare_blocks=3)
    need = [3, 1, 1, 2]
    assert num_blocks == sum(need) + 3 and tables.dtype == torch.int32 and tables.shape == (4, 3)
    used = [b for s, n in enumerate(need) for b in tables[s, :n].tolist()]
    assert len(used) == len(set(used)) and all(0 <= b < num_blocks for b in used)
    assert tables[1, 1:].eq(-1).all()
    slots = H.slots_of(tables, 0, [0, 15, 16, 32], 16)
    row = tables[0].tolist()
    assert slots == [row[0] * 16, row[0] * 16 + 15, row[1] * 16, row[2] * 16]


def _toy_benchmark(providers, output=lambda i, r: r):
    def cases(size, dtype):
        return [H.Case(label="toy n=8", group="toy", x=8, x_name="n", params={"n": 8},
                       make_inputs=lambda device: {"x": H.randn((8,), torch.float32, device)},
                       bytes_moved=64, dtype=torch.float32)]

    return H.Benchmark("toy", "toy", cases, providers, output=output)


def _toy_config():
    cfg = H.RunConfig(mode="cpu-smoke", size="tiny", device=torch.device("cpu"), dtype=torch.float32,
                      timer=H.WallTimer(reps=1))
    cfg.env = H.environment(cfg.device, cfg.mode)
    cfg.ceilings = H.measure_ceilings(cfg.device, cfg.timer, copy_mib=1, matmul_n=16)
    return cfg


def test_failing_providers_are_recorded_not_fatal():
    def boom(i):
        raise RuntimeError("kernel exploded\nsecond line")

    def skipper(i):
        raise H.Skip("not here")

    bench = _toy_benchmark([
        H.Provider("torch_ref", lambda i: lambda: i["x"] * 2, "reference"),
        H.Provider("good", lambda i: lambda: i["x"] + i["x"], "ours"),
        H.Provider("wrong", lambda i: lambda: i["x"] * 3, "library"),
        H.Provider("boom", boom, "ours"),
        H.Provider("skipper", skipper, "library"),
        H.Provider("gpu_only", lambda i: lambda: i["x"], "library", requires_cuda=True),
        H.Provider("too_big", lambda i: lambda: i["x"], "library", skip=lambda case: "too big for this test"),
    ])
    rows = {r["provider"]: r for r in H.run_benchmark(bench, _toy_config(), log=lambda s: None)}
    assert rows["torch_ref"]["check"] == "reference" and rows["torch_ref"]["speedup_vs_ref"] == 1.0
    assert rows["good"]["status"] == "ok" and rows["good"]["check"] == "ok" and rows["good"]["check_vs"] == "torch_ref"
    assert rows["wrong"]["status"] == "ok" and rows["wrong"]["check"] == "MISMATCH"
    assert rows["boom"]["status"] == "error" and rows["boom"]["error"] == "RuntimeError: kernel exploded"
    assert rows["skipper"]["status"] == "skipped" and rows["skipper"]["error"] == "not here"
    assert rows["gpu_only"]["status"] == "skipped" and rows["gpu_only"]["error"] == "needs CUDA"
    assert rows["too_big"]["error"] == "too big for this test"
    assert rows["good"]["gbps"] == pytest.approx(64 / (rows["good"]["median_ms"] * 1e-3) / 1e9)


def test_library_oracle_when_reference_cannot_run():
    bench = _toy_benchmark([
        H.Provider("torch_ref", lambda i: lambda: i["x"], "reference", skip=lambda case: "too big"),
        H.Provider("triton", lambda i: lambda: i["x"] * 1.0, "ours"),
        H.Provider("lib", lambda i: lambda: i["x"].clone(), "library"),
    ])
    rows = {r["provider"]: r for r in H.run_benchmark(bench, _toy_config(), log=lambda s: None)}
    assert rows["lib"]["check"] == "oracle" and rows["triton"]["check"] == "ok" and rows["triton"]["check_vs"] == "lib"
    assert rows["triton"]["speedup_vs_ref"] is None


def test_budget_skips_rows(tmp_path):
    import time

    bench = _toy_benchmark([H.Provider("torch_ref", lambda i: lambda: i["x"], "reference"),
                            H.Provider("compiled", lambda i: lambda: i["x"], "compiled", costly=True)])
    cfg = _toy_config()
    cfg.soft_deadline = time.monotonic() - 1
    rows = H.run_benchmark(bench, cfg, log=lambda s: None)
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "compiling" in rows[1]["error"]
    cfg.deadline = time.monotonic() - 1
    rows = H.run_benchmark(bench, cfg, log=lambda s: None)
    assert all(r["status"] == "skipped" and "budget" in r["error"] for r in rows)
    # Written files stay strict JSON and readable markdown with skipped and infinite values.
    rows[0]["check_err"] = math.inf
    data = H.payload(cfg, rows, "toy")
    paths = H.write_outputs(tmp_path, "toy", data)
    assert [p.name for p in paths] == ["toy.json", "toy.md", "toy.png"]
    assert _strict_json(tmp_path / "toy.json")["rows"][0]["check_err"] == "inf"
    assert "budget" in (tmp_path / "toy.md").read_text()


def test_output_names_never_pass_smoke_for_gpu(tmp_path):
    assert H.output_stem("kernels", "cpu-smoke") == "kernels.cpu-smoke"
    assert H.output_stem("kernels", "gpu-tiny") == "kernels.gpu-tiny"
    assert H.output_stem("kernels", "gpu-quick") == "kernels"
    assert "tmp" in H.default_out_dir("cpu-smoke").parts  # bench/results/tmp/ is git-ignored


def test_shapes_table():
    assert S.model("Llama-3-8B").head_dim == 128 and S.LLAMA_3_8B.q_size == 4096
    assert S.LLAMA_3_2_1B.kv_size == 512 and S.SMOLLM2_135M.n_heads % S.SMOLLM2_135M.n_kv_heads == 0
    for m in S.MODELS:
        assert m.n_heads * m.head_dim == m.hidden and m.n_heads % m.n_kv_heads == 0
    with pytest.raises(ValueError, match="model"):
        S.model("GPT-5")
    assert S.DECODE_BATCHES == (1, 8, 64) and S.CONTEXTS[0] == 512 and S.CONTEXTS[-1] == 32768


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not found")
    script = ROOT / "bench" / "gpu_check.sh"
    subprocess.run([bash, "-n", str(script)], check=True)
    text = script.read_text()
    assert "bench.run_all --quick" in text and "bench.bench_e2e --quick" in text and '${OUT:-' in text
    # (tests/test_gpu_check.py runs its --dry-run: test selections, stage limits, output files)


# ---------------------------------------------------------------------------------------------------------
# End-to-end decode benchmark and the host-overhead suite
# ---------------------------------------------------------------------------------------------------------

def test_e2e_smoke(tmp_path):
    from bench import bench_e2e

    args = ["--out", str(tmp_path), "--no-plot" if HAS_CUDA else "--cpu-smoke"]
    if HAS_CUDA:  # the GPU path at toy size: Triton backend, CUDA timing of the ceilings, transformers on CUDA
        args += ["--shapes", "tiny", "--batches", "1,2", "--prompts", "8", "--new-tokens", "4", "--dtype", "fp32",
                 "--systems", "trinfer,hf_eager"]
    data = bench_e2e.main(args)
    name = "e2e" if HAS_CUDA else "e2e.cpu-smoke"
    on_disk = _strict_json(tmp_path / f"{name}.json")
    assert (tmp_path / f"{name}.md").exists()
    rows = {(r["system"], r["batch"]): r for r in on_disk["rows"]}
    for batch in (1, 2):
        for system in ("trinfer", "hf_eager"):
            r = rows[(system, batch)]
            assert r["status"] == "ok", r
            assert r["ttft_ms"] > 0 and r["tpot_median_ms"] > 0 and r["tokens_per_s"] > 0
            assert r["step_bytes"] > 0 and r["floor_ms"] > 0
        trinfer = rows[("trinfer", batch)]
        assert trinfer["match_vs"] == "hf_eager" and trinfer["match_tokens"] is not None
        if not HAS_CUDA:  # fp32 on the CPU, same weights: the greedy tokens must agree throughout
            assert trinfer["match_tokens"] == trinfer["new_tokens"]
    if not HAS_CUDA:
        assert rows[("hf_compile", 1)]["status"] == "skipped"
        assert data["banner"] and "NOT GPU" in (tmp_path / f"{name}.md").read_text()


def test_cpu_bench_smoke(tmp_path):
    """bench_cpu end to end on a tiny random checkpoint (the default model takes minutes): both systems run
    on the same weights, give the same greedy tokens, and the JSON/markdown say it is a CPU measurement."""
    pytest.importorskip("transformers")
    from bench import bench_cpu
    from checkpoints import make_hf_checkpoint

    path = make_hf_checkpoint(str(tmp_path), "llama", tie_word_embeddings=True)
    threads = torch.get_num_threads()
    data = bench_cpu.main(["--model", path, "--reps", "2", "--new-tokens", "5", "--threads", "1",
                           "--prompts", "chat,40", "--out", str(tmp_path / "out")])
    assert torch.get_num_threads() == threads  # restored
    on_disk = _strict_json(tmp_path / "out" / "cpu_decode.json")
    assert on_disk["env"]["cpu_cores"] and on_disk["env"]["torch"] and on_disk["reps"] == 2
    assert "CPU measurement" in (tmp_path / "out" / "cpu_decode.md").read_text()
    rows = {(r["prompt"], r["system"]): r for r in data["rows"]}
    assert set(rows) == {(p, s) for p in ("chat", "40") for s in ("trinfer", "transformers")}
    for r in rows.values():
        assert r["threads"] == 1 and r["ttft_ms"] > 0 and r["decode_tok_s"] > 0 and len(r["ttft_ms_all"]) == 2
        assert r["tokens_equal"], r  # fp32, same weights: the same greedy tokens
    assert rows[("chat", "trinfer")]["tok_s_ratio_median"] > 0 and rows[("chat", "trinfer")]["cold_ttft_ms"] > 0


def test_e2e_counts():
    from bench.bench_e2e import common_prefix, step_bytes, tpot_stats
    from trinfer.runtime.config import ModelConfig
    from trinfer.runtime.random_model import MODEL_SHAPES, weight_bytes

    cfg = ModelConfig.from_hf(MODEL_SHAPES["Llama-3-8B"])
    w = weight_bytes(cfg, torch.bfloat16)
    assert w == 8_030_261_248 * 2  # Llama-3-8B's parameter count
    # Untied: the input embedding is read only for the batch's rows; K/V of 32 layers x 8 heads x 128.
    embed = 128256 * 4096 * 2
    assert step_bytes(cfg, w, batch=1, context=0, elem=2) == w - embed + 4096 * 2
    assert step_bytes(cfg, w, 2, 10, 2) - step_bytes(cfg, w, 2, 0, 2) == 2 * 32 * 10 * 8 * 128 * 2 * 2 + 0
    qwen3 = ModelConfig.from_hf(MODEL_SHAPES["Qwen3-8B"])  # 36 layers x 8 KV heads x 128
    wq = weight_bytes(qwen3, torch.bfloat16)
    assert step_bytes(qwen3, wq, 1, 10, 2) - step_bytes(qwen3, wq, 1, 0, 2) == 2 * 36 * 10 * 8 * 128 * 2
    tied = ModelConfig.from_hf(MODEL_SHAPES["Llama-3.2-1B"])
    assert step_bytes(tied, 100, 1, 0, 2) == 100
    assert tpot_stats([0.0, 1.0, 3.0, 6.0]) == (2.0, pytest.approx(2.8))
    assert tpot_stats([1.0]) == (None, None)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_host_overhead_suite_runs():
    """The pytest-benchmark suite, each benchmark once (--benchmark-disable), so it cannot rot."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "bench" / "bench_host_overhead.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "15 passed" in proc.stdout


def test_bench_defaults_smoke(tmp_path):
    """bench_defaults on a tiny random checkpoint (tokenizer included): the four engines differ exactly in the two
    options, every request is cold (no cache hit anywhere), the same tokens everywhere, ratios to `off` of 1 for
    `off` itself, and a long prompt longer than the CPU budget, so that chunking is really exercised."""
    from bench import bench_defaults
    from checkpoints import make_hf_checkpoint

    path = make_hf_checkpoint(str(tmp_path), "llama", max_position_embeddings=512)
    threads = torch.get_num_threads()
    data = bench_defaults.main(["--device", "cpu", "--model", path, "--reps", "2", "--new-tokens", "4",
                                "--long", "200", "--out", str(tmp_path / "out")])
    assert torch.get_num_threads() == threads  # restored
    on_disk = _strict_json(tmp_path / "out" / "defaults.json")
    assert on_disk["budgets"]["defaults"] == on_disk["budgets"]["no-cache"] == 128  # the CPU default
    assert on_disk["budgets"]["off"] == on_disk["budgets"]["no-chunk"] > 300
    assert on_disk["cache_hit_tokens"] == {c: 0 for c in bench_defaults.CONFIGS}
    rows = {(r["prompt"], r["config"]): r for r in data["rows"]}
    assert {p for p, _ in rows} == {"chat", "300", "long"} and rows[("long", "off")]["prompt_tokens"] == 200 and rows[("300", "off")]["prompt_tokens"] == 300
    for (prompt, config), r in rows.items():
        assert r["tokens_equal"] and r["decode_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["prefix_caching"] == (config in ("defaults", "no-chunk"))
        if config == "off":
            assert r["tok_s_vs_off"] == r["ttft_vs_off"] == 1.0
    assert "CPU measurement" in (tmp_path / "out" / "defaults.md").read_text()


def test_bench_serve_end_to_end(tmp_path):
    """bench_serve on a tiny random checkpoint: a real `trinfer serve` subprocess, two concurrency levels and the
    interleaved HTTP-vs-direct part; both paths give the same text and the server exits 0 on SIGTERM."""
    for module in ("httpx", "starlette", "uvicorn"):
        pytest.importorskip(module)
    from bench import bench_serve
    from checkpoints import make_hf_checkpoint

    path = make_hf_checkpoint(str(tmp_path), "llama")
    threads = torch.get_num_threads()
    data = bench_serve.main(["--model", path, "--concurrency", "1,3", "--reps", "1", "--overhead-reps", "1",
                             "--max-tokens", "4", "--out", str(tmp_path / "out")])
    assert torch.get_num_threads() == threads  # restored
    on_disk = _strict_json(tmp_path / "out" / "serve.json")
    assert on_disk["server_exit_status"] == 0 and on_disk["env"]["cpu_cores"]
    assert "CPU measurement" in (tmp_path / "out" / "serve.md").read_text()
    assert [r["concurrency"] for r in data["sweep"]] == [1, 3]
    assert [r["requests"] for r in data["sweep"]] == [2, 6]
    for r in data["sweep"]:
        assert r["tok_s"] > 0 and r["ttft"]["p50"] > 0 and r["tokens_all"][0] >= r["requests"]
    over = data["overhead"]
    assert over["texts_equal"] and over["http"]["ttft_ms"] > 0 and over["direct"]["ttft_ms"] > 0
    assert over["direct_cache_hit_tokens"] == 0  # every prompt is its own: no cached prefix shortens a prefill
    assert bench_serve.unique("a b", 7) != bench_serve.unique("a b", 71)


def test_bench_tp_smoke(tmp_path):
    """bench_tp at the tiny shape, N = 1 and 2 (two processes over gloo on the CPU; on a GPU machine N = 2 needs
    two GPUs, else its row says it was skipped): both decode the same tokens, and rank 0's profile sees exactly
    the collectives of a decode step: 2 per layer + the embedding's all-reduce, the LM head's all-gather, the
    step header and its one payload broadcast."""
    from bench import bench_tp

    args = ["--out", str(tmp_path)] + (["--shapes", "tiny", "--tp", "1,2", "--new", "4", "--profile-steps", "2"]
                                       if HAS_CUDA else ["--cpu-smoke"])
    data = bench_tp.main(args)
    name = "tp" if HAS_CUDA else "tp.cpu-smoke"
    rows = {r["tp"]: r for r in _strict_json(tmp_path / f"{name}.json")["rows"]}
    assert (tmp_path / f"{name}.md").exists()
    assert rows[1]["status"] == "ok" and rows[1]["tpot_median_ms"] > 0 and rows[1]["comm_bytes_per_step"] == 0
    if HAS_CUDA and torch.cuda.device_count() < 2:
        assert rows[2]["status"] == "skipped"
        return
    two = rows[2]
    assert two["status"] == "ok", two
    assert two["match_vs"] == "tp1" and two["match_tokens"] == two["new_tokens"]
    assert two["comm_bytes_per_step"] == 5 * 256 * 4 + 24  # tiny fp32: 5 ring all-reduces of 1 KB (half each way)
    if not HAS_CUDA:
        assert two["comm_calls_per_step"] == 2 * 2 + 1 + 1 + 2 and two["comm_ms_per_step"] > 0
        assert data["banner"] and "NOT GPU" in (tmp_path / f"{name}.md").read_text()


def test_bench_tp_communication_formula():
    """Hand-worked: Llama-3-70B (80 layers, hidden 8192, bf16) over 8 ranks sends, per rank and decode step of one
    sequence, 161 ring all-reduces of 16 KiB (2 * 7/8 of it each) and 7 blocks of 24 bytes of the LM head's
    all-gather."""
    from bench.bench_tp import comm_bytes_per_step
    from trinfer.runtime.config import ModelConfig
    from trinfer.runtime.random_model import MODEL_SHAPES, weight_bytes

    cfg = ModelConfig.from_hf(MODEL_SHAPES["Llama-3-70B"])
    assert weight_bytes(cfg, torch.bfloat16) == 70_553_706_496 * 2  # its published parameter count
    assert comm_bytes_per_step(cfg, 8, 1, 2) == 161 * 28672 + 7 * 24 == 4_616_360
    assert comm_bytes_per_step(cfg, 1, 4, 2) == 0
    assert comm_bytes_per_step(cfg, 2, 4, 2) == 161 * 65536 + 4 * 24


def test_prefix_chunk_bench_smoke(tmp_path):
    """bench_prefix_chunk end to end on tiny random weights (the default model takes minutes): the prefix part reuses
    the whole prefix and gives the uncached engine's tokens; the ITL part chunks the long prompt (budget 8: more
    steps than without chunking) and classes every stream gap."""
    from bench import bench_prefix_chunk

    data = bench_prefix_chunk.main(["--device", "cpu", "--shape", "tiny", "--reps", "2", "--prefix-tokens", "64",
                               "--long-tokens", "40", "--budgets", "none,8", "--lead", "2", "--tail", "2",
                               "--out", str(tmp_path)])
    on_disk = _strict_json(tmp_path / "prefix_chunk.json")
    assert on_disk["mode"] == "cpu" and "CPU measurement" in (tmp_path / "prefix_chunk.md").read_text()
    p = data["prefix"]
    assert p["reused_tokens"] == [64, 64] and p["tokens_equal"] and p["ttft_ms_cached"] > 0
    rows = {r["budget"]: r for r in data["itl"]}
    assert rows[None]["steps_to_long_first_token"] == 1 and rows[8]["steps_to_long_first_token"] > 5
    for r in rows.values():
        for run in r["runs"]:
            n = run["itl_all_ms"]["n"]
            assert n == sum(run[f"itl_{c}_ms"]["n"] for c in ("before", "during", "after")) and n >= 4 * 5
            assert run["itl_during_ms"]["n"] >= 4 and run["long_alone_ttft_ms"] > 0


def test_spec_bench_smoke(tmp_path):
    """bench_spec end to end on tiny random weights: every configuration gives plain decoding's tokens, the oracle
    (plain's own tokens proposed, sharing the n-gram engine of the same k) has every proposal accepted and needs
    fewer steps, and the results are on disk."""
    from bench import bench_spec

    data = bench_spec.main(["--device", "cpu", "--shapes", "tiny", "--quick", "--configs", "ngram:3,oracle:3",
                            "--new-tokens", "16", "--out", str(tmp_path)])
    on_disk = _strict_json(tmp_path / "spec.json")
    assert on_disk["mode"] == "cpu" and "CPU measurement" in (tmp_path / "spec.md").read_text()
    rows = data["rows"]
    assert {r["config"] for r in rows} == {"plain", "ngram:3", "oracle:3"} and all(r["match"] for r in rows)
    for prompt in {r["prompt"] for r in rows}:
        by = {r["config"]: r for r in rows if r["prompt"] == prompt}
        oracle = by["oracle:3"]
        assert oracle["accepted"] == oracle["proposed"] > 0 and oracle["steps"] < by["plain"]["steps"]
    assert {s["kind"] for s in data["summary"]} == {"grounded", "chat"}
