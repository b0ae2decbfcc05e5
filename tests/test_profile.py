"""`trinfer profile` and the random-weight models it (and the end-to-end benchmark) runs on."""
from __future__ import annotations

import json

import pytest
import torch

from trinfer import cli
from trinfer.runtime.config import ModelConfig
from trinfer.runtime.random_model import (MODEL_SHAPES, hf_config_dict, hf_state_dict, random_model,
                                          weight_bytes)

HAS_CUDA = torch.cuda.is_available()


def test_profile_command(tmp_path, capsys):
    device = "cuda" if HAS_CUDA else "cpu"
    rc = cli.main(["profile", "--shape", "tiny", "--batch", "2", "--context", "20", "--steps", "3",
                   "--warmup-steps", "1", "--device", device, "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "profile.json").read_text())
    for name in ("trace_prefill.json", "trace_decode.json"):
        trace = json.loads((tmp_path / name).read_text())
        assert trace["traceEvents"], name
    assert summary["batch"] == 2 and summary["steps"] == 3 and summary["ttft_ms"] > 0
    assert summary["decode_step_ms"]["median"] > 0 and summary["tokens_per_s"] > 0
    decode = summary["decode_per_step"]
    assert decode["kernels"] and decode["busy_us"] > 0
    assert abs(sum(k["pct"] for k in decode["kernels"]) - 100.0) < 1e-6
    assert "time to first token" in out and "trace_decode.json" in out
    # warm-up prompts differ from the profiled ones: the profiled prefill computes its prompts
    assert summary["prefix_caching"] and summary["prefix_cache"]["hit_tokens"] == 0
    assert summary["prefix_cache"]["prompt_tokens"] == 2 * 2 * 20 and summary["prefill_steps"] == 1
    assert "prefix cache 0/80 prompt tokens reused (0.0%) in the warm-up and profiled requests" in out
    if HAS_CUDA:
        assert decode["host_overhead_pct"] is not None and summary["backend"] == "triton"
    else:
        assert "GPU figures need a GPU" in out and summary["backend"] == "torch"
        assert any(k["name"].startswith("aten::") for k in decode["kernels"])


def test_profile_rejects_bad_arguments(capsys):
    assert cli.main(["profile", "--shape", "tiny", "--batch", "0", "--device", "cpu"]) == 2
    assert "--batch" in capsys.readouterr().err
    assert cli.main(["profile", "--shape", "GPT-9", "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["profile", "--shape", "tiny", "--model", "x"])  # one source only


def test_model_shapes_parse_and_sizes():
    sizes = {n: weight_bytes(ModelConfig.from_hf(c), torch.bfloat16) for n, c in MODEL_SHAPES.items()}
    # Published parameter counts (tied embeddings counted once).
    assert sizes["SmolLM2-135M"] == 134_515_008 * 2
    assert sizes["Llama-3.2-1B"] == 1_235_814_400 * 2
    assert sizes["Llama-3-8B"] == 8_030_261_248 * 2
    # Qwen3 (model cards: 8.2B of which 6.95B non-embedding; 0.6B of which 0.44B non-embedding): q/k norms counted.
    assert sizes["Qwen3-8B"] == (2 * 151936 * 4096 + 36 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 12288
                                                           + 2 * 4096 + 2 * 128) + 4096) * 2 == 8_190_735_360 * 2
    assert sizes["Qwen3-0.6B"] == 596_049_920 * 2  # tied; head_dim 128 with hidden 1024 and 16 heads
    cfg = hf_config_dict("Llama-3-8B", max_position_embeddings=16384)
    assert cfg["max_position_embeddings"] == 16384 and MODEL_SHAPES["Llama-3-8B"]["max_position_embeddings"] == 8192
    with pytest.raises(ValueError, match="shape"):
        hf_config_dict("nope")


def test_random_model_weights_and_hf_views():
    lm = random_model("tiny", device="cpu", dtype=torch.float32, seed=3)
    again = random_model("tiny", device="cpu", dtype=torch.float32, seed=3)
    assert lm.tokenizer is None and lm.source == "random"
    for name, w in lm.weights.items():
        assert torch.equal(w, again.weights[name]), name  # seeded
        assert bool(torch.isfinite(w).all()) and w.abs().sum() > 0
    c = lm.config
    qkv = lm.weights["layers.0.qkv_proj"]
    assert abs(float(qkv.std()) - c.hidden_size ** -0.5) < 0.2 * c.hidden_size ** -0.5
    sd = hf_state_dict(c, lm.weights)
    k = sd["model.layers.0.self_attn.k_proj.weight"]
    assert k.shape == (c.kv_size, c.hidden_size) and k.data_ptr() == qkv[c.q_size:].data_ptr()  # a view
    assert sd["lm_head.weight"] is lm.weights["embed_tokens"]  # tied


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3"])  # a Llama; a Qwen3 (q/k norm, head_dim 2x hidden/heads)
def test_hf_twin_agrees_with_engine(shape):
    """The models bench_e2e and the profiler run: transformers' twin (LlamaForCausalLM / Qwen3ForCausalLM) on views
    of the same weights gives the engine's greedy tokens."""
    pytest.importorskip("transformers")
    from trinfer.runtime import Engine, SamplingParams
    from trinfer.runtime.random_model import hf_model

    lm = random_model(shape, device="cpu", dtype=torch.float32)
    hf = hf_model(lm, hf_config_dict(shape))
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if shape == "tiny-qwen3" else "LlamaForCausalLM")
    if lm.config.qk_norm:
        assert hf.model.layers[1].self_attn.k_norm.weight.data_ptr() == lm.weights["layers.1.k_norm"].data_ptr()
    assert hf.model.layers[1].mlp.up_proj.weight.data_ptr() == lm.weights["layers.1.gate_up_proj"][
        lm.config.intermediate_size:].data_ptr()
    prompt = torch.randint(3, lm.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1))
    hf.generation_config.eos_token_id = None  # plain argmax every step, as ignore_eos decodes
    with torch.inference_mode():
        ref = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 12:]
    eng = Engine(lm, device="cpu", backend="torch", max_num_seqs=1, num_kv_blocks=8, max_model_len=64)
    eng.add_request(prompt[0].tolist(), SamplingParams(max_new_tokens=8, ignore_eos=True))
    out = [o for o in eng.run_until_done()][-1]
    assert out.token_ids == ref.tolist()


def test_profile_shows_verify_steps(tmp_path, capsys):
    """`--speculative ngram`: the prompts repeat a block, so the first decode step has proposals to verify; the
    report counts verify passes among the decode steps and the tokens per step."""
    rc = cli.main(["profile", "--shape", "tiny", "--batch", "1", "--context", "32", "--steps", "4", "--warmup-steps",
                   "1", "--device", "cpu", "--out", str(tmp_path), "--speculative", "ngram"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "profile.json").read_text())
    sp = summary["speculative"]
    assert sp["config"] == "ngram k=4" and summary["verify_steps"] >= 1 and sp["profiled"]["proposed"] >= 1
    assert "decode steps were verify passes" in out and "tokens per step" in out
