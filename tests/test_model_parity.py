"""Greedy token ids equal Hugging Face transformers' on the same weights (fp32, CPU).

Random-weight checkpoints of each family (tests/checkpoints.py) with the torch backend at full length,
the Triton kernels (the interpreter on a CPU) on a tiny Qwen2 and a tiny Qwen3 across KV block boundaries, and
the default model (GGUF) against transformers reading the same GGUF itself.
"""
import pytest
import torch

from checkpoints import assert_varied, hf_llama_from_gguf, load_hf_model, make_hf_checkpoint
from smol import default_model, one_torch_thread  # noqa: F401  (autouse fixture)
from trinfer.runtime import LLM

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32
# Prompts as token ids (the random checkpoints' tokenizers are not what is tested here); lengths 1 to 21.
PROMPTS = [[1, 17, 99, 4, 250, 63, 8], [1], [1, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 7, 300, 42, 11, 2, 9, 81, 13, 77],
           [1, 400, 401, 402]]

FAMILIES = {
    "llama": dict(family="llama"),                                        # Llama 2 style, untied
    "llama3": dict(family="llama3", tie_word_embeddings=True),            # Llama-3.1 rope scaling, tied (embedding
                                                                          # std 0.4/sqrt(hidden): see checkpoints.py)
    "qwen2": dict(family="qwen2"),                                        # q/k/v biases
    "mistral": dict(family="mistral", num_key_value_heads=1),             # GQA group of 4
    # Qwen3: per-head q/k norm, head_dim 32 with hidden 64 / 4 heads; untied with a GQA group of 4, and tied (an
    # embedding of std 1/sqrt(hidden), 4 layers: a tied tiny model with a larger one only repeats its input).
    "qwen3": dict(family="qwen3", num_key_value_heads=1),
    "qwen3-tied": dict(family="qwen3", tie_word_embeddings=True, embed_std=0.125, num_hidden_layers=4),
    # An eps as large as the activations' mean square (0.5): a norm (or q/k norm) that takes another eps than the
    # config's (1e-5, 1e-6: both negligible next to O(1) activations) diverges here.
    "qwen3-eps": dict(family="qwen3", rms_norm_eps=0.5),
}


def hf_greedy(hf_model, prompt: list[int], n: int) -> tuple[list[int], list[float]]:
    """transformers' greedy generate (do_sample=False), never stopping early; also each chosen token's logprob."""
    ids = torch.tensor([prompt])
    out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=0,
                            do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                            return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return tokens, logprobs


def no_eos(model):
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
def test_torch_backend_matches_transformers(name, tmp_path):
    kw = dict(FAMILIES[name])
    path = make_hf_checkpoint(str(tmp_path), kw.pop("family"), **kw)
    hf = no_eos(load_hf_model(path))
    llm = LLM(path, backend="torch", dtype="float32", device="cpu", block_size=16)
    outs = llm.generate(PROMPTS, max_new_tokens=NEW_TOKENS, ignore_eos=True)  # all prompts in one batch
    refs = [hf_greedy(hf, prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert_varied(PROMPTS, [tokens for tokens, _ in refs])  # a degenerate model would pass for a wrong engine
    for prompt, out, (expected, expected_lp) in zip(PROMPTS, outs, refs):
        assert out.token_ids == expected, f"{name}: prompt of {len(prompt)} tokens diverges"
        assert out.finish_reason == "length"
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(expected_lp), atol=1e-4, rtol=1e-4)


TRITON_CASES = {
    # 2 layers, hidden 128, 2 query heads / 1 KV head of dim 64 (the attention kernels' smallest head dim); biases
    "qwen2": ("qwen2", dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1), 7),
    # the q/k norm fused into the rotary + KV write; head_dim 64 explicit (hidden 64 / 2 heads would give 32)
    "qwen3": ("qwen3", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=64), 5),
}


@pytest.mark.interpreter
@pytest.mark.parametrize("name", list(TRITON_CASES))
def test_triton_backend_matches_transformers_across_blocks(name, tmp_path):
    """The Triton kernels (interpreted on a CPU) on a tiny Qwen2 (biases) and a tiny Qwen3 (q/k norm) with 4-token
    blocks: prompts of 3 and 6 tokens and 5-7 new tokens cross block boundaries in prefill and in decode."""
    family, overrides, new = TRITON_CASES[name]
    path = make_hf_checkpoint(str(tmp_path), family, **overrides)
    hf = no_eos(load_hf_model(path))
    llm = LLM(path, backend="triton", dtype="float32", device="cpu", block_size=4, debug=True)
    prompts = [[1, 17, 99], [1, 400, 33, 2, 9, 81]]
    outs = llm.generate(prompts, max_new_tokens=new, ignore_eos=True)
    refs = [hf_greedy(hf, prompt, new) for prompt in prompts]
    assert_varied(prompts, [tokens for tokens, _ in refs])
    for out, (expected, expected_lp) in zip(outs, refs):
        assert out.token_ids == expected
        torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(expected_lp), atol=1e-4, rtol=1e-4)


def test_default_model_gguf_matches_transformers():
    """transformers' LlamaForCausalLM on the GGUF as transformers' own GGUF code reads it (tests/checkpoints.py;
    `from_pretrained(dir, gguf_file=...)` does the same but needs `accelerate`)."""
    pytest.importorskip("gguf")
    path, loaded = default_model()
    llm = LLM(loaded, backend="torch", num_kv_blocks=16)
    tok = llm.tokenizer
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                      add_special_tokens=False)
    prompts = [chat, tok.encode("def fibonacci(n):\n    ")]
    outs = llm.generate(prompts, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    hf = no_eos(hf_llama_from_gguf(path))
    for prompt, out in zip(prompts, outs):
        expected, _ = hf_greedy(hf, prompt, NEW_TOKENS)
        assert out.token_ids == expected, tok.decode(out.token_ids) + " != " + tok.decode(expected)
    assert "Paris" in tok.decode(outs[0].token_ids)
