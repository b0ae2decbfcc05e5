"""Tiny random-weight Hugging Face checkpoints (with a real tokenizer) for loader and greedy-parity tests.

    path = make_hf_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)   # a directory
    hf = load_hf_model(path)                                                  # transformers' model, fp32

Families: "llama" (Llama 2 style), "llama3" (Llama-3.1 rope scaling, theta 5e5), "qwen2" (q/k/v biases),
"mistral" (no sliding window). Defaults: hidden 64, 2 layers, 4 query / 2 KV heads (head_dim 16),
intermediate 96, vocab 512, context 2048; any config key can be overridden.

Weights are random but not Hugging Face's init: every tensor (biases and norms included, which HF starts
at 0 and 1) is drawn from a seeded generator, so a dropped bias or a swapped row shows up. Projections get
std 1/sqrt(fan_in) and embeddings std 1, so greedy decoding picks tokens by clear margins.

The tokenizer (`tiny_tokenizer`) is a byte-level BPE whose vocabulary is exactly the model's: 5 special
tokens (<|endoftext|> 0, <s> 1, </s> 2, <|im_start|> 3, <|im_end|> 4), the 256 byte symbols, then merges
learned deterministically from a small built-in English/code corpus (and, if those run out, reserved
special tokens). Every string encodes; every id decodes. It needs no download and no other package, so it
works on the GPU machine too. Llama/Mistral add BOS <s>; Qwen2 adds none. EOS ids are </s> and <|im_end|>,
and the chat template is ChatML.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import torch

FAMILIES = ("llama", "llama3", "qwen2", "mistral")

SPECIAL_TOKENS = ("<|endoftext|>", "<s>", "</s>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID, IM_END_ID = 1, 2, 4
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A language model reads tokens and predicts the next one;
greedy decoding always takes the most probable token. The capital of France is Paris, the capital of
Japan is Tokyo, and the capital of Italy is Rome. In 2024 there were 366 days, and 12 months of them.
def generate(model, prompt, max_new_tokens=32):
    tokens = tokenizer.encode(prompt)
    for step in range(max_new_tokens):
        logits = model(tokens)
        next_token = int(logits[-1].argmax())
        tokens.append(next_token)
    return tokenizer.decode(tokens)
class Config:
    hidden_size: int = 4096
    num_layers: int = 32
Attention compares every query with every key, scales the scores, applies the softmax and sums values.
The key-value cache keeps the keys and values of the past tokens, so each new token costs one step.
Paged attention stores the cache in fixed-size blocks; a block table maps positions to blocks.
What is the weather like today? It is sunny and warm, with a light wind from the west.
She said: "I would like a cup of tea, please." He answered that he would rather have coffee.
for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot product
import torch; x = torch.randn(3, 4); y = x @ x.T; print(y.shape)
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -1 +1 = 42%
"""

_FAMILY_CONFIG = {
    "llama": ("LlamaForCausalLM", "llama", {"rope_theta": 10000.0}),
    "llama3": ("LlamaForCausalLM", "llama", {
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
        "max_position_embeddings": 4096,
    }),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", {"rope_theta": 1000000.0, "use_sliding_window": False}),
    "mistral": ("MistralForCausalLM", "mistral", {"rope_theta": 1000000.0, "sliding_window": None}),
}


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)


def _byte_of(symbol: str) -> int:
    code = ord(symbol)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def _learn_merges(words: Counter, budget: int) -> list[tuple[str, str]]:
    """Plain BPE on byte-level words: merge the most frequent pair (ties: smallest pair) `budget` times."""
    splits = {word: list(word) for word in words}
    merges: list[tuple[str, str]] = []
    while len(merges) < budget:
        pairs: Counter = Counter()
        for word, count in words.items():
            parts = splits[word]
            for a, b in zip(parts, parts[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        for word, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[word] = out
    return merges


def tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` ids (see the module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size: the tiny tokenizer needs at least {base} ids, got {vocab_size}")
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(_CORPUS))
    merges = _learn_merges(words, vocab_size - base)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for symbol in _byte_symbols():
        vocab[symbol] = len(vocab)
    kept = []
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
            kept.append((a, b))
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(vocab))]
    for token in reserved:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, *reserved)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                value = 0.5 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                value = torch.randn(p.shape, generator=gen)
            else:
                value = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
            p.copy_(value)


def make_hf_checkpoint(
    tmp_dir: str | os.PathLike,
    family: str,
    *,
    tie_word_embeddings: bool = False,
    rope_scaling: dict | None = None,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    name: str | None = None,
    **overrides,
) -> str:
    """Write a tiny random-weight checkpoint of `family` under tmp_dir and return its directory.

    rope_scaling: replaces the family's (e.g. {"rope_type": "linear", "factor": 2.0}); llama3 has its own.
    max_shard_size: passed to save_pretrained (e.g. "100KB") to get shards and model.safetensors.index.json.
    overrides: config keys (hidden_size=..., num_hidden_layers=..., vocab_size=..., head_dim=...).
    The directory holds config.json, model.safetensors (or shards), generation_config.json,
    tokenizer.json and tokenizer_config.json.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    arch, model_type, extra = _FAMILY_CONFIG[family]
    kwargs = dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None if family == "qwen2" else BOS_ID,
        eos_token_id=IM_END_ID if family == "qwen2" else EOS_ID,
        pad_token_id=0,
    )
    kwargs.update(extra)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    kwargs.update(overrides)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kwargs)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = getattr(transformers, arch)(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(torch_state)
    _randomize(model, seed)
    if tie_word_embeddings:
        model.tie_weights()

    path = os.path.join(os.fspath(tmp_dir), name or f"{family}-{'tied' if tie_word_embeddings else 'untied'}-{seed}")
    os.makedirs(path, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    eos_ids = [IM_END_ID, 0] if family == "qwen2" else [EOS_ID, IM_END_ID]
    generation = {"bos_token_id": kwargs["bos_token_id"], "eos_token_id": eos_ids, "do_sample": False}
    _write_json(os.path.join(path, "generation_config.json"), generation)

    tokenizer = tiny_tokenizer(config.vocab_size)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": family != "qwen2",
        "add_eos_token": False,
        "bos_token": None if family == "qwen2" else SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[IM_END_ID] if family == "qwen2" else SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[0],
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    })
    return path


def load_hf_model(path: str | os.PathLike):
    """transformers' own model for a checkpoint directory, fp32, eval mode (the parity oracle)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=torch.float32)
    return model.eval()


def hf_state_dict_from_gguf(gguf_path: str | os.PathLike, names: list[str] | None = None) -> tuple[dict, dict]:
    """(config dict, {HF tensor name: fp32 tensor}) as transformers reads a llama GGUF, without accelerate.

    Uses gguf's reader and dequantizer and transformers' GGUF config mapping and q/k un-permutation, i.e.
    no trinfer code. names: only these GGUF tensors (e.g. "blk.0.attn_q.weight"); all when None.
    transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) would do the same but needs the
    accelerate package, which this environment lacks.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor, load_gguf_checkpoint

    config = load_gguf_checkpoint(os.fspath(gguf_path), return_tensors=False)["config"]
    processor = LlamaTensorProcessor(config=config)
    reader = gguf.GGUFReader(os.fspath(gguf_path))
    top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
    per_layer = {
        "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    out = {}
    for t in reader.tensors:
        if names is not None and t.name not in names:
            continue
        if t.name in top:
            hf_name = top[t.name]
        elif t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in per_layer:
                continue
            hf_name = f"model.layers.{layer}.{per_layer[rest]}"
        else:
            continue
        weights = gguf.quants.dequantize(t.data, t.tensor_type)
        weights = processor.process(weights=weights, name=t.name).weights
        out[hf_name] = torch.from_numpy(weights.copy()).float()
    return config, out


def hf_llama_from_gguf(gguf_path: str | os.PathLike):
    """transformers' LlamaForCausalLM with a llama GGUF's weights as transformers reads them (fp32, eval)."""
    import transformers

    config, state = hf_state_dict_from_gguf(gguf_path)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"GGUF -> transformers: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()
