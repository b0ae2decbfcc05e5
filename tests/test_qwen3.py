"""Qwen3 (dense): config, loading (Hugging Face and GGUF `qwen3`), refusals, and its chat template.

Greedy parity with transformers (torch and Triton backends) is in test_model_parity.py (families "qwen3",
"qwen3-tied"); the fused q/k norm + rotary + KV write kernel in test_rotary.py. Here: what the config and the
loaders read (head_dim != hidden / heads, q/k norm weights, no biases), what they refuse by name (Qwen3-MoE, yarn
rope scaling, sliding window, attention biases, missing or misshapen norm weights), a GGUF written as llama.cpp's
converter writes `qwen3` (un-permuted q/k, attn_q_norm / attn_k_norm, pre-tokenizer "qwen2") giving transformers'
greedy tokens, and a Qwen3-style chat template (tools, tool calls, reasoning, enable_thinking) rendered in the
sandbox exactly as transformers renders it, with `chat_template_kwargs` passed through the engine, LLM and CLI.
"""
import json
import os

import pytest
import torch

from checkpoints import (IM_END_ID, QWEN3_TEMPLATE, assert_varied, load_hf_model, make_gguf_checkpoint,
                         make_hf_checkpoint)
from test_model_parity import hf_greedy, no_eos
from trinfer.runtime import LLM, Engine
from trinfer.runtime.config import ModelConfig
from trinfer.runtime.loader import load_model_files

QWEN3_8B = {  # Qwen/Qwen3-8B's config.json (transformers 4.51 form)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936,
}


# ------------------------------------------------------------------------------------------------- config
def test_qwen3_8b_config():
    c = ModelConfig.from_hf(QWEN3_8B)
    assert (c.architecture, c.model_type, c.head_dim, c.q_size, c.kv_size) == (
        "Qwen3ForCausalLM", "qwen3", 128, 4096, 1024)
    assert c.qk_norm and not c.qkv_bias and not c.tie_word_embeddings
    assert (c.rms_norm_eps, c.rope_theta, c.rope_scaling, c.eos_token_ids) == (1e-6, 1e6, None, (151645,))
    # Qwen3-0.6B's shape: head_dim 128 where hidden / heads is 64.
    small = ModelConfig.from_hf({**QWEN3_8B, "hidden_size": 1024, "num_attention_heads": 16,
                                 "tie_word_embeddings": True})
    assert small.head_dim == 128 and small.q_size == 2048 != small.hidden_size
    # Other families keep no q/k norm.
    assert not ModelConfig.from_hf({**QWEN3_8B, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}).qk_norm


@pytest.mark.parametrize("change, words", [
    ({"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": 128},
     ["Qwen3MoeForCausalLM", "mixture-of-experts"]),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
     ["rope_type 'yarn'", "not supported"]),
    ({"use_sliding_window": True, "sliding_window": 4096}, ["sliding_window", "4096"]),
    ({"attention_bias": True}, ["attention_bias"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "gelu"]),
    ({"model_type": "qwen2"}, ["model_type", "'qwen3'", "'qwen2'"]),
])
def test_qwen3_unsupported_options_refused_by_name(change, words):
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf({**QWEN3_8B, **change})
    for w in words:
        assert w in str(info.value)


# ----------------------------------------------------------------------------------- Hugging Face loading
@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("qwen3")), "qwen3")


def test_load_hf_qwen3_weights(qwen3_dir):
    from safetensors.torch import load_file

    loaded = load_model_files(qwen3_dir, device="cpu", dtype=torch.float32, progress=False)
    c = loaded.config
    assert c.qk_norm and c.head_dim == 32 and c.hidden_size == 64 and c.num_heads == 4
    state = load_file(os.path.join(qwen3_dir, "model.safetensors"))
    for i in range(c.num_layers):
        for name in ("q_norm", "k_norm"):
            w = loaded.weights[f"layers.{i}.{name}"]
            assert w.shape == (32,) and torch.equal(w, state[f"model.layers.{i}.self_attn.{name}.weight"])
    qkv = loaded.weights["layers.0.qkv_proj"]
    assert qkv.shape == (4 * 32 + 2 * 2 * 32, 64) and "layers.0.qkv_bias" not in loaded.weights
    assert torch.equal(qkv[:128], state["model.layers.0.self_attn.q_proj.weight"])


def _copy_with(src: str, dst: str, edit_state=None, edit_config=None) -> str:
    """A copy of a checkpoint directory with its tensors and/or config.json edited."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if edit_state is not None:
        file = os.path.join(dst, "model.safetensors")
        state = load_file(file)
        edit_state(state)
        save_file(state, file, metadata={"format": "pt"})
    if edit_config is not None:
        file = os.path.join(dst, "config.json")
        with open(file) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(file, "w") as f:
            json.dump(cfg, f)
    return dst


def test_bad_qwen3_checkpoints_refused_by_tensor_name(qwen3_dir, tmp_path):
    missing = _copy_with(qwen3_dir, str(tmp_path / "missing"),
                         lambda s: s.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_norm\.weight'"):
        load_model_files(missing, device="cpu", dtype=torch.float32, progress=False)
    # A q_norm of hidden / heads = 16 values (what head_dim would be without the explicit one).
    short = _copy_with(qwen3_dir, str(tmp_path / "short"),
                       lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match=r"q_norm\.weight.*expected shape \[32\].*got \[16\]"):
        load_model_files(short, device="cpu", dtype=torch.float32, progress=False)
    # The same tensors under a Llama config: the norms are not part of a Llama.
    as_llama = _copy_with(qwen3_dir, str(tmp_path / "llama"), edit_config=lambda c: c.update(
        architectures=["LlamaForCausalLM"], model_type="llama"))
    with pytest.raises(ValueError, match=r"unexpected tensor .*[qk]_norm\.weight.*LlamaForCausalLM"):
        load_model_files(as_llama, device="cpu", dtype=torch.float32, progress=False)


# --------------------------------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_gguf_loads_and_matches_transformers(tied, tmp_path):
    """A `qwen3` GGUF (F32, as llama.cpp's converter writes it) of a tiny Qwen3: the same config, weights and
    tokenizer as the Hugging Face directory it came from, and transformers' greedy tokens."""
    pytest.importorskip("gguf")
    extra = {} if tied else dict(num_key_value_heads=1)  # tied: the default embedding std (0.4/sqrt(hidden))
    gguf_path, hf_dir = make_gguf_checkpoint(str(tmp_path), family="qwen3", qtype="F32", tie_word_embeddings=tied,
                                             **extra)
    from_gguf = load_model_files(gguf_path, device="cpu", dtype=torch.float32, progress=False)
    from_hf = load_model_files(hf_dir, device="cpu", dtype=torch.float32, progress=False)
    g, h = from_gguf.config, from_hf.config
    assert from_gguf.source == "gguf" and g.architecture == "Qwen3ForCausalLM" and g.qk_norm
    assert (g.head_dim, g.num_heads, g.num_kv_heads, g.tie_word_embeddings) == (
        h.head_dim, h.num_heads, h.num_kv_heads, tied)
    assert g.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)  # GGUF stores it as float32
    assert IM_END_ID in g.eos_token_ids
    assert from_gguf.weights.keys() == from_hf.weights.keys()
    for name, w in from_hf.weights.items():
        assert torch.equal(from_gguf.weights[name], w), name  # q/k rows not permuted for qwen3
    text = "Paged attention: 12 blocks of 16 tokens, 3.14159 digits!"
    assert from_gguf.tokenizer.encode(text) == from_hf.tokenizer.encode(text)
    messages = [{"role": "user", "content": "Hi"}]
    assert from_gguf.tokenizer.apply_chat_template(messages, enable_thinking=False) == \
        from_hf.tokenizer.apply_chat_template(messages, enable_thinking=False)

    hf = no_eos(load_hf_model(hf_dir))
    llm = LLM(from_gguf, backend="torch", block_size=16)
    prompts = [[17, 99, 4, 250, 63], [400, 401, 402]]
    want = [hf_greedy(hf, prompt, 12)[0] for prompt in prompts]
    assert_varied(prompts, want)
    assert [out.token_ids for out in llm.generate(prompts, max_new_tokens=12, ignore_eos=True)] == want


def test_qwen3_moe_gguf_refused_by_name(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "moe.gguf")
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_block_count(1)
    w.add_expert_count(128)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"architecture 'qwen3moe' is not supported \(Qwen3-MoE: mixture of "
                                         r"experts\); supported: 'llama', 'qwen3'"):
        load_model_files(path, device="cpu", dtype=torch.float32, progress=False)


# ---------------------------------------------------------------------------------------- chat template
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": "<think>\nTwo cities: two calls.\n</think>\n\nChecking.",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "content": "18 C, sunny"},
    {"role": "tool", "content": "24 C, clear"},
    {"role": "assistant", "content": "Paris 18 C, Rome 24 C.", "reasoning_content": "Both answered."},
    {"role": "user", "content": "Thanks!"},
]


@pytest.fixture(scope="module")
def qwen3_llm(qwen3_dir):
    return LLM(qwen3_dir, backend="torch", dtype="float32", device="cpu", block_size=16, num_kv_blocks=64)


def test_qwen3_template_by_hand(qwen3_llm):
    """One user turn, worked by hand: the generation prompt opens an empty think block only with
    enable_thinking=False."""
    tok = qwen3_llm.tokenizer
    assert tok.chat_template == QWEN3_TEMPLATE
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    plain = "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs) == plain
    assert tok.apply_chat_template(msgs, enable_thinking=True) == plain
    assert tok.apply_chat_template(msgs, enable_thinking=False) == plain + "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"tools": TOOLS},
                                    {"tools": TOOLS, "enable_thinking": False}])
def test_qwen3_template_renders_as_transformers(qwen3_llm, qwen3_dir, kwargs):
    """The sandboxed render of tools, tool calls (dict and string arguments), grouped tool results, reasoning
    (kept only after the last user query) and enable_thinking equals transformers' own render."""
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(qwen3_dir)
    for messages in (CONVERSATION, CONVERSATION[:-1], CONVERSATION[1:2]):
        ours = qwen3_llm.tokenizer.apply_chat_template(messages, **kwargs)
        assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    full = qwen3_llm.tokenizer.apply_chat_template(CONVERSATION, **kwargs)
    assert full.count('<tool_call>\n{"name": "get_weather", "arguments": {"city": ') == 2
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n24 C" in full
    assert "Two cities" not in full and "Both answered" not in full  # reasoning before the last query: dropped
    assert "Both answered" in qwen3_llm.tokenizer.apply_chat_template(CONVERSATION[:-1], **kwargs)
    assert ("# Tools" in full) == ("tools" in kwargs)


def test_chat_template_kwargs_through_engine_and_llm(qwen3_llm):
    tok, eng = qwen3_llm.tokenizer, qwen3_llm.engine
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    no_think = tok.encode(tok.apply_chat_template(msgs, enable_thinking=False), add_special_tokens=False)
    think = tok.encode(tok.apply_chat_template(msgs), add_special_tokens=False)
    assert len(no_think) > len(think)
    rid = eng.add_request(msgs, chat=True, chat_template_kwargs={"enable_thinking": False}, max_new_tokens=2,
                          ignore_eos=True)
    assert eng._requests[rid].token_ids == no_think
    eng.abort(rid)
    out = qwen3_llm.generate(msgs, chat=True, chat_template_kwargs={"enable_thinking": False}, max_new_tokens=3,
                             ignore_eos=True)
    ids = [o.token_ids for o in qwen3_llm.generate(["What is 2 + 2?"], chat=True, max_new_tokens=3, ignore_eos=True,
                                                   chat_template_kwargs={"enable_thinking": False})]
    assert len(out) == 1 and out[0].token_ids == ids[0]  # one conversation == its text as the user message
    ref = qwen3_llm.generate([no_think], max_new_tokens=3, ignore_eos=True)[0]
    assert out[0].token_ids == ref.token_ids


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(chat_template_kwargs={"enable_thinking": False}), ValueError, ["chat_template_kwargs", "chat=True"]),
    (dict(chat=True, chat_template_kwargs=[("enable_thinking", False)]), TypeError,
     ["chat_template_kwargs", "dict", "list"]),
    (dict(chat=True, chat_template_kwargs={"add_generation_prompt": False}), ValueError,
     ["chat_template_kwargs", "'add_generation_prompt'", "reserved"]),
    (dict(chat=True, chat_template_kwargs={"enable thinking": False}), ValueError,
     ["chat_template_kwargs", "'enable thinking'"]),
])
def test_bad_chat_template_kwargs_refused(qwen3_llm, kwargs, exc, words):
    eng = qwen3_llm.engine
    with pytest.raises(exc) as info:
        eng.add_request("Hi", max_new_tokens=2, **kwargs)
    for w in words:
        assert w in str(info.value)
    assert not eng.has_unfinished()
    with pytest.raises(TypeError, match="conversation; pass chat=True"):
        qwen3_llm.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2)


def test_cli_no_thinking(qwen3_dir, monkeypatch, capsys):
    from trinfer import cli

    seen = []
    original = LLM.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("chat_template_kwargs"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", spy)
    base = ["generate", "What is 2 + 2?", "--model", qwen3_dir, "--max-new-tokens", "2", "--backend", "torch",
            "--dtype", "float32", "--device", "cpu", "--quiet"]
    assert cli.main(base + ["--chat", "--no-thinking"]) == 0
    assert cli.main(base + ["--chat"]) == 0
    assert seen == [{"enable_thinking": False}, None]
    capsys.readouterr()
    assert cli.main(base + ["--no-thinking"]) == 2
    assert "--no-thinking" in capsys.readouterr().err and len(seen) == 2


def test_engine_refuses_qwen3_head_dim_the_triton_kernels_cannot_run(qwen3_dir):
    """head_dim 32 (below the Triton attention kernels' 33-256) is refused at start, naming head_dim."""
    if not torch.cuda.is_available():
        from trinfer.triton_kernels._utils import interpreting

        assert interpreting()
    with pytest.raises(ValueError, match=r"head_dim.*32"):
        Engine(qwen3_dir, backend="triton", dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
