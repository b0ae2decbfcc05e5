"""Tiny random-weight Hugging Face checkpoints (with a real tokenizer) for loader and greedy-parity tests.

    path = make_hf_checkpoint(tmp_path, "qwen2", tie_word_embeddings=True)   # a directory
    hf = load_hf_model(path)                                                  # transformers' model, fp32

Families: "llama" (Llama 2 style), "llama3" (Llama-3.1 rope scaling, theta 5e5), "qwen2" (q/k/v biases),
"mistral" (no sliding window), "qwen3" (per-head q/k RMSNorm, explicit head_dim 32 != hidden / heads, eps 1e-6,
and a Qwen3-style chat template: QWEN3_TEMPLATE). Defaults: hidden 64, 2 layers, 4 query / 2 KV heads (head_dim 16),
intermediate 96, vocab 512, context 2048; any config key can be overridden.

Weights are random but not Hugging Face's init: every tensor (biases and norms included, which HF starts
at 0 and 1) is drawn from a seeded generator, so a dropped bias or a swapped row shows up. Projections get
std 1/sqrt(fan_in); an untied embedding std 1, a tied one 0.4/sqrt(hidden) (with std 1 a tied model's LM head
finds the input token's own row: it only repeats its last input token, and a parity test on it proves nothing).
`assert_varied` checks that greedy outputs a parity test relies on are not degenerate that way.

The tokenizer (`tiny_tokenizer`) is a byte-level BPE whose vocabulary is exactly the model's: 5 special
tokens (<|endoftext|> 0, <s> 1, </s> 2, <|im_start|> 3, <|im_end|> 4), the 256 byte symbols, then merges
learned deterministically from a small built-in English/code corpus (and, if those run out, reserved
special tokens). Every string encodes; every id decodes. It needs no download and no other package, so it
works on the GPU machine too. Llama/Mistral add BOS <s> (tokenizer_config add_bos_token and the
tokenizer.json post-processor, as Llama 3 does); Qwen2 adds none and splits digits one by one, like its
real tokenizer. EOS ids are </s> and <|im_end|> (<|im_end|> and <|endoftext|> for Qwen2); the chat
template is ChatML. transformers' AutoTokenizer encodes these directories as trinfer does.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import torch

FAMILIES = ("llama", "llama3", "qwen2", "mistral", "qwen3")
_QWEN = ("qwen2", "qwen3")  # no BOS, digits split one by one, EOS <|im_end|>

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
    "qwen3": ("Qwen3ForCausalLM", "qwen3", {"rope_theta": 1000000.0, "use_sliding_window": False, "head_dim": 32,
                                            "rms_norm_eps": 1e-6, "max_window_layers": 2}),
}

# A chat template written in the style of Qwen3's (its features, not its text): a tools block (tojson), a
# namespace updated in a reversed loop, string tests and methods (startswith/endswith/split/strip), reasoning
# kept only after the last user query, tool calls with JSON arguments, consecutive tool results grouped
# into one user turn, and `enable_thinking=False` closing an empty think block in the generation prompt.
QWEN3_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- '# Tools\\n<tools>' }}
    {%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
    {{- '\\n</tools>\\nCall a tool as <tool_call>{"name": ..., "arguments": ...}</tool_call>.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query=-1) %}
{%- for message in messages[::-1] %}
    {%- set i = messages | length - 1 - loop.index0 %}
    {%- if ns.last_query < 0 and message.role == 'user' and message.content is string
          and not (message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.last_query = i %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if loop.index0 > ns.last_query and reasoning %}
            {{- '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content }}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function if call.function is defined else call %}
            {%- if content or not loop.first %}{{- '\\n' }}{%- endif %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""


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


_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tiny_tokenizer(vocab_size: int = 512, family: str = "llama"):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` ids (see the module docstring).

    As in the real families' tokenizer.json: Qwen2/Qwen3 normalize to NFC, split with their own regex (digits
    one by one) and add no BOS; the others use GPT-2's split and a post-processor that adds BOS <s>, so that
    transformers' AutoTokenizer (which takes BOS from the post-processor) and trinfer encode alike.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    base = len(SPECIAL_TOKENS) + 256
    if vocab_size < base:
        raise ValueError(f"vocab_size: the tiny tokenizer needs at least {base} ids, got {vocab_size}")
    if family in _QWEN:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
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
    if family in _QWEN:
        tok.normalizer = normalizers.NFC()
    else:
        bos = SPECIAL_TOKENS[BOS_ID]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, BOS_ID)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIAL_TOKENS, *reserved)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def _randomize(model: torch.nn.Module, seed: int, embed_std: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith(".bias"):
                value = 0.5 * torch.randn(p.shape, generator=gen)
            elif "embed_tokens" in name:
                value = embed_std * torch.randn(p.shape, generator=gen)
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
    embed_std: float | None = None,
    **overrides,
) -> str:
    """Write a tiny random-weight checkpoint of `family` under tmp_dir and return its directory.

    rope_scaling: replaces the family's (e.g. {"rope_type": "linear", "factor": 2.0}); llama3 has its own.
    max_shard_size: passed to save_pretrained (e.g. "100KB") to get shards and model.safetensors.index.json.
    embed_std: the embedding's std; None: 1.0 untied, 0.4 / sqrt(hidden_size) tied. A tied embedding of std 1 makes
    each token's own logit win (the model repeats its last input token); the smaller one gives varied greedy tokens.
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
        bos_token_id=None if family in _QWEN else BOS_ID,
        eos_token_id=IM_END_ID if family in _QWEN else EOS_ID,
        pad_token_id=0,
    )
    kwargs.update(extra)
    if rope_scaling is not None:
        kwargs["rope_scaling"] = rope_scaling
    kwargs.update(overrides)
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**kwargs)
    if embed_std is None:
        embed_std = 0.4 / config.hidden_size ** 0.5 if tie_word_embeddings else 1.0
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = getattr(transformers, arch)(config).to(torch.float32).eval()
    finally:
        torch.random.set_rng_state(torch_state)
    _randomize(model, seed, embed_std)
    if tie_word_embeddings:
        model.tie_weights()

    path = os.path.join(os.fspath(tmp_dir), name or f"{family}-{'tied' if tie_word_embeddings else 'untied'}-{seed}")
    os.makedirs(path, exist_ok=True)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, safe_serialization=True, **save_kwargs)
    eos_ids = [IM_END_ID, 0] if family in _QWEN else [EOS_ID, IM_END_ID]
    generation = {"bos_token_id": kwargs["bos_token_id"], "eos_token_id": eos_ids, "do_sample": False}
    _write_json(os.path.join(path, "generation_config.json"), generation)

    tokenizer = tiny_tokenizer(config.vocab_size, family)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": family not in _QWEN,
        "add_eos_token": False,
        "bos_token": None if family in _QWEN else SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[IM_END_ID] if family in _QWEN else SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[0],
        "chat_template": QWEN3_TEMPLATE if family == "qwen3" else CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.max_position_embeddings,
    })
    return path


def assert_varied(prompts: list[list[int]], outputs: list[list[int]], *, min_distinct: int = 3) -> None:
    """Fail when greedy outputs that a parity or equality test compares are degenerate, so that the comparison
    would pass for a wrong engine too: an empty output (EOS at once), an output that only repeats its prompt's last
    token (a tied random model with a large embedding), fewer than half of the outputs with `min_distinct`
    distinct tokens (a fixed point or a 2-cycle), or every prompt giving the same output. The remedy is in the
    checkpoint (its seed, `embed_std`), not in the test's tolerance."""
    assert len(prompts) == len(outputs) > 0, (len(prompts), len(outputs))
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        assert len(out) > 0, f"output {i} is empty (an end-of-sequence token at once?)"
        assert set(out) != {prompt[-1]}, f"output {i} only repeats its prompt's last token {prompt[-1]}: {out}"
    varied = sum(len(set(out)) >= min(min_distinct, len(out)) for out in outputs)
    assert 2 * varied >= len(outputs), (f"only {varied} of {len(outputs)} outputs have {min_distinct} distinct "
                                        f"tokens: {outputs}")
    assert len(outputs) == 1 or len({tuple(o) for o in outputs}) > 1, f"every prompt gives the same output {outputs[0]}"


def load_hf_model(path: str | os.PathLike):
    """transformers' own model for a checkpoint directory, fp32, eval mode (the parity oracle)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path), dtype=torch.float32)
    return model.eval()


def hf_state_dict_from_gguf(gguf_path: str | os.PathLike, names: list[str] | None = None, *,
                            reader=None) -> dict[str, torch.Tensor]:
    """{HF tensor name: fp32 tensor} as transformers reads a llama GGUF, without accelerate and without trinfer.

    gguf's reader and dequantizer, then transformers' own q/k un-permutation (LlamaTensorProcessor).
    names: only these GGUF tensors (e.g. "blk.0.attn_q.weight"); all when None. reader: a gguf.GGUFReader
    of the file, to reuse one. transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) does
    the same but needs the accelerate package, which this environment lacks.
    """
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = reader if reader is not None else gguf.GGUFReader(os.fspath(gguf_path))
    heads = reader.fields["llama.attention.head_count"].contents()
    kv_field = reader.fields.get("llama.attention.head_count_kv")
    processor = LlamaTensorProcessor(config={"num_attention_heads": heads,
                                             "num_key_value_heads": kv_field.contents() if kv_field else heads})
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
        out[hf_name] = torch.from_numpy(np.array(weights, dtype=np.float32))  # a copy: F32 data is a read-only map
    return out


def hf_llama_from_gguf(gguf_path: str | os.PathLike):
    """transformers' LlamaForCausalLM with a llama GGUF's weights as transformers reads them (fp32, eval).

    Config from transformers' load_gguf_checkpoint, weights from hf_state_dict_from_gguf. Slow for the
    default model (two full reads of the metadata: ~10 s on a 2-core machine); build it once per session.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = load_gguf_checkpoint(os.fspath(gguf_path), return_tensors=False)["config"]
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.float32)
    state = hf_state_dict_from_gguf(gguf_path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"GGUF -> transformers: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def llama_cpp_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter reordering of q/k rows: per head, [first half | second half] -> interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def make_gguf_checkpoint(
    tmp_dir: str | os.PathLike,
    *,
    qtype: str = "Q8_0",
    family: str = "llama",
    tie_word_embeddings: bool = False,
    seed: int = 0,
    **overrides,
) -> tuple[str, str]:
    """A tiny llama (or qwen3) GGUF converted the way llama.cpp does it, from a make_hf_checkpoint directory.

    qtype: the type of every matrix (F32, F16, BF16, Q8_0, Q4_0, Q4_1); norms stay F32. llama: q/k rows are
    permuted as llama.cpp's converter does; family "llama3" also writes rope_freqs.weight. The tokenizer
    metadata is the tiny byte-level BPE ("gpt2", pre "default"). Family "qwen3" writes architecture `qwen3`
    as llama.cpp's converter does: q/k rows as they are (half-split RoPE), attn_q_norm / attn_k_norm F32,
    key/value length = head_dim, pre-tokenizer "qwen2", no BOS, EOS <|im_end|>, the QWEN3_TEMPLATE.
    Returns (gguf path, the HF directory it came from). Needs the gguf package (absent on the GPU machine).
    """
    import gguf
    from safetensors.torch import load_file

    if family not in ("llama", "llama3", "qwen3"):
        raise ValueError(f"family: a GGUF is made for 'llama', 'llama3' or 'qwen3', got {family!r}")
    qwen = family == "qwen3"
    hf_dir = make_hf_checkpoint(tmp_dir, family, tie_word_embeddings=tie_word_embeddings, seed=seed, **overrides)
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(os.listdir(hf_dir)):
        if file.endswith(".safetensors"):
            state.update(load_file(os.path.join(hf_dir, file)))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))

    path = os.path.join(os.fspath(tmp_dir), f"tiny-{family}-{qtype}-{'tied' if tie_word_embeddings else 'untied'}.gguf")
    w = gguf.GGUFWriter(path, "qwen3" if qwen else "llama")
    w.add_name(f"tiny {family}")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    if qwen or head_dim * heads != cfg["hidden_size"]:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(0)
    tok = tiny_tokenizer(cfg["vocab_size"], family)
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    model = json.loads(tok.to_str())["model"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if qwen else "default")
    w.add_token_list(tokens)
    special = set(SPECIAL_TOKENS) | {t for t in tokens if t.startswith("<|reserved_")}
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(0 if qwen else BOS_ID)  # Qwen's converter writes <|endoftext|> here, and no BOS is added
    w.add_eos_token_id(IM_END_ID if qwen else EOS_ID)
    w.add_add_bos_token(not qwen)
    w.add_chat_template(QWEN3_TEMPLATE if qwen else CHATML_TEMPLATE)

    kind = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, t: torch.Tensor, matrix: bool) -> None:
        data = t.float().numpy()
        if not matrix or kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data.astype("float32"))
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype("float16"))
        else:
            packed = gguf.quants.quantize(data, kind)  # BF16 comes back as uint16: pass its bytes
            w.add_tensor(name, packed.view("uint8"), raw_dtype=kind)

    add("token_embd.weight", state["model.embed_tokens.weight"], True)
    add("output_norm.weight", state["model.norm.weight"], False)
    if not tie_word_embeddings:
        add("output.weight", state["lm_head.weight"], True)
    if family == "llama3":
        r = rope
        freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        wavelen = 2 * torch.pi / freqs
        lo, hi, orig, factor = r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"], r["factor"]
        smooth = (orig / wavelen - lo) / (hi - lo)
        factors = torch.where(wavelen < orig / hi, torch.ones_like(wavelen),
                              torch.where(wavelen > orig / lo, torch.full_like(wavelen, factor),
                                          1 / ((1 - smooth) / factor + smooth)))
        add("rope_freqs.weight", factors.float(), False)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    if qwen:
        names.update({"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"})
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, gguf_name in names.items():
            t = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q" and not qwen:
                t = llama_cpp_permute(t, heads)
            elif gguf_name == "attn_k" and not qwen:
                t = llama_cpp_permute(t, kv_heads)
            add(f"blk.{i}.{gguf_name}.weight", t, not gguf_name.endswith("norm"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf_dir


# ---------------------------------------------------------------------- AWQ / GPTQ 4-bit checkpoints

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ packs output column 8c + AWQ_ORDER[i] into bits 4i of word c
_QUANTIZED_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _words(fields: torch.Tensor) -> torch.Tensor:
    """[..., 8] integers 0..15 -> int32 [...], field i at bits 4i (two's complement for the top bit)."""
    word = sum(fields[..., i].to(torch.int64) << (4 * i) for i in range(8))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32).contiguous()


def make_quantized_hf_checkpoint(tmp_dir: str | os.PathLike, method: str, group_size: int, *, sym: bool = False,
                                 checkpoint_format: str = "gptq", seed: int = 0, **overrides
                                 ) -> tuple[str, dict[str, torch.Tensor]]:
    """A tiny llama checkpoint whose q/k/v/o/gate/up/down layers are stored as an AWQ (GEMM) or GPTQ 4-bit
    checkpoint would store them (packing written here from the formats' public descriptions, independently of
    trinfer's loader). Returns (directory, {hf module name: the float64 [N, K] matrix the packed tensors stand
    for}). GPTQ `checkpoint_format` "gptq" stores zero points minus 1, "gptq_v2" as they are; `sym` uses the
    zero point 8 everywhere (GPTQ only). Layer widths must be multiples of 8 and of `group_size` along K."""
    from safetensors.torch import load_file, save_file

    name = f"{method}-g{group_size}-{'sym' if sym else 'asym'}-{checkpoint_format}"
    path = make_hf_checkpoint(tmp_dir, "llama", name=name, seed=seed, **overrides)
    state = load_file(os.path.join(path, "model.safetensors"))
    expected = {}
    for key in list(state):
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or module.rsplit(".", 1)[-1] not in _QUANTIZED_LAYERS:
            continue
        w = state.pop(key).double()
        n, k = w.shape
        g = w.view(n, k // group_size, group_size)
        if sym:
            s = (g.abs().amax(dim=2) / 7.5).half()
            z = torch.full_like(s, 8, dtype=torch.int64)
        else:
            lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
            s = ((hi - lo) / 15).half()
            z = torch.round(-lo / s.double()).clamp(0, 15).to(torch.int64)
        q = torch.round(g / s.double()[:, :, None] + z[:, :, None]).clamp(0, 15).to(torch.int64)  # [n, groups, G]
        expected[module] = ((q - z[:, :, None]).double() * s.double()[:, :, None]).view(n, k)
        q = q.view(n, k)
        if method == "gptq":
            stored_z = (z - (1 if checkpoint_format == "gptq" else 0)) & 0xF           # [n, groups]
            state[module + ".qweight"] = _words(q.t().reshape(k // 8, 8, n).permute(0, 2, 1))  # [K/8, N]
            state[module + ".qzeros"] = _words(stored_z.t().reshape(-1, n // 8, 8))              # [groups, N/8]
            state[module + ".g_idx"] = (torch.arange(k) // group_size).to(torch.int32)
            state[module + ".bias"] = torch.zeros(n, dtype=torch.float16)  # what GPTQ writers save for no bias
        else:
            order = list(AWQ_ORDER)
            state[module + ".qweight"] = _words(q.t().reshape(k, n // 8, 8)[:, :, order])       # [K, N/8]
            state[module + ".qzeros"] = _words(z.t().reshape(-1, n // 8, 8)[:, :, order])         # [groups, N/8]
        state[module + ".scales"] = s.t().contiguous()                                          # [groups, N]
    save_file(state, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": sym,
              "checkpoint_format": checkpoint_format}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    cfg["quantization_config"] = qc
    _write_json(os.path.join(path, "config.json"), cfg)
    return path, expected
