"""Tokenizer: built from GGUF metadata (against transformers' tokenizer for the same file) and from
Hugging Face directories; chat templates in a sandbox; incremental detokenization of split characters."""
import json
import os
import pathlib

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from checkpoints import CHATML_TEMPLATE, make_hf_checkpoint, tiny_tokenizer
from trinfer.runtime.loader_gguf import read_gguf
from trinfer.runtime.tokenizer import IncrementalDetokenizer, Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "In 2024, 12345 people paid $3.14 (or 1,000,000 in total): 0.5% + 99%.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];  // dot\n}\r\n",
    "Café, naïve, résumé, Ångström, Grüße, façade, São Paulo, Łódź",
    "東京は日本の首都です。北京欢迎你！서울특별시",
    "Привет, мир! مرحبا بالعالم שלום עולם Γειά σου",
    "Emoji: 😀 👍🏽 🇫🇷 👨‍👩‍👧 🎉🎉🎉 ❤️",
    "  leading, trailing  and   multiple    spaces  ",
    "\n\nnewlines\n\n\n and tabs\t\t.",
    "don't won't I'll we've they're it's",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "a\u0301 e\u0300 combining marks, zero\u200bwidth, nbsp\u00a0here",
    "",
    " ",
    "x" * 300,
]


@pytest.fixture(scope="module")
def tok(default_gguf):
    gguf_file = read_gguf(default_gguf)
    try:
        return Tokenizer.from_gguf_metadata(gguf_file.metadata)
    finally:
        gguf_file.close()


@pytest.fixture(scope="module")
def hf_tok(default_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(default_gguf),
                                                      gguf_file=os.path.basename(default_gguf))


def _corpus() -> list[str]:
    """TEXTS plus real prose and code from this repository (paragraphs of its Markdown and Python)."""
    extra = []
    for name in ("CONTRIBUTING.md", "trinfer/runtime/tokenizer.py", "trinfer/runtime/config.py"):
        text = (REPO / name).read_text(encoding="utf-8")
        extra += [p for p in text.split("\n\n") if p.strip()][:40]
    return TEXTS + extra


def test_default_tokenizer_facts(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2,) and not tok.add_bos_token
    assert tok.id_to_token(0) == "<|endoftext|>" and tok.id_to_token(2) == "<|im_end|>"
    assert tok.token_to_id("<|im_start|>") == 1
    # 17 special tokens (ids 0-16) stay whole
    assert tok.encode("<|im_start|><jupyter_output><empty_output>") == [1, 14, 16]


def _digit_after_space(text: str) -> bool:
    return any(a.isspace() and b.isdigit() for a, b in zip(text, text[1:]))


def test_default_tokenizer_matches_transformers(tok, hf_tok):
    """Equal to transformers' tokenizer for the GGUF, except where it is wrong: it pre-tokenizes SmolLM2
    with GPT-2's regex alone, while SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer)
    first splits every digit off. That only changes whitespace right before a digit ("  1" -> "ĠĠ" "1",
    not "Ġ" "Ġ" "1"). With that one step added, transformers' tokenizer agrees everywhere."""
    from tokenizers import pre_tokenizers

    fixed = hf_tok.backend_tokenizer
    differs = []
    for text in _corpus():
        ids = tok.encode(text)
        if ids != hf_tok(text, add_special_tokens=True).input_ids:
            differs.append(text)
        assert hf_tok.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False)
    assert all(_digit_after_space(t) for t in differs), [t[:40] for t in differs if not _digit_after_space(t)]
    assert tok.encode("x  12") != hf_tok("x  12").input_ids  # the known difference, still there

    original = fixed.pre_tokenizer
    fixed.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), original])
    try:
        for text in _corpus():
            assert tok.encode(text) == fixed.encode(text, add_special_tokens=False).ids, repr(text[:60])
    finally:
        fixed.pre_tokenizer = original


def test_default_tokenizer_round_trips(tok):
    for text in _corpus():
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text, repr(text[:60])


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("2024 and 1234567")
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[:4] == ["2", "0", "2", "4"] and "".join(pieces) == "2024 and 1234567"
    assert all(len(p.strip()) <= 1 or not any(c.isdigit() for c in p) for p in pieces)


def test_decode_skips_special_tokens_by_default(tok):
    ids = tok.encode("<|im_start|>assistant\nParis<|im_end|>")
    assert tok.decode(ids) == "assistant\nParis"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>assistant\nParis<|im_end|>"


def test_default_chat_template(tok, hf_tok):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with_system = [{"role": "system", "content": "Be brief."}, *messages,
                   {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    assert tok.apply_chat_template(with_system, add_generation_prompt=False) == hf_tok.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == 1 and ids[-3:] == tok.encode("<|im_start|>assistant\n")[-3:]


def test_saved_default_tokenizer_reloads_and_transformers_agrees(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.from_hf_dir(tmp_path)
    assert (again.bos_token_id, again.eos_token_ids, again.add_bos_token, again.chat_template) == (
        tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token, tok.chat_template)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in _corpus():
        assert again.encode(text) == tok.encode(text) == hf(text).input_ids, repr(text[:40])


def test_saved_tokenizer_keeps_bos(tmp_path):
    t = Tokenizer(tiny_tokenizer(300), bos_token_id=1, eos_token_ids=(2,), add_bos_token=True)
    t.save(tmp_path)
    assert Tokenizer.from_hf_dir(tmp_path).encode("hi")[0] == 1
    transformers = pytest.importorskip("transformers")
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path))("hi").input_ids == t.encode("hi")


def test_eos_ids_outside_the_vocabulary_are_left_out(tmp_path):
    tiny_tokenizer(300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[4, 310]).eos_token_ids == (4, 2)


# ---------------------------------------------------------------------- Hugging Face directories


@pytest.mark.parametrize("family, bos", [("llama", True), ("qwen2", False)])
def test_hf_dir_tokenizer(tmp_path, family, bos):
    path = make_hf_checkpoint(tmp_path, family)
    tok = Tokenizer.from_hf_dir(path)
    assert tok.vocab_size == 512 and tok.add_bos_token == bos
    ids = tok.encode("Hello world, 2024!")
    assert (ids[0] == 1) == bos and tok.decode(ids) == "Hello world, 2024!"
    assert tok.encode("Hello", add_special_tokens=False)[0] != 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert tok.encode(text) == hf(text).input_ids, repr(text[:40])


def test_tiny_tokenizer_has_exactly_the_vocab_and_round_trips():
    for size in (261, 300, 512, 1000):
        t = tiny_tokenizer(size)
        assert t.get_vocab_size(with_added_tokens=True) == size
        assert all(t.id_to_token(i) is not None for i in range(size))
    t = Tokenizer(tiny_tokenizer(512))
    for text in TEXTS:
        assert t.decode(t.encode(text), skip_special_tokens=False) == text
    with pytest.raises(ValueError, match="at least 261"):
        tiny_tokenizer(100)


def _backend_with_bos_template() -> Backend:
    """A tokenizer.json like Llama 3's: its post-processor itself adds BOS."""
    backend = tiny_tokenizer(300)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return backend


@pytest.mark.parametrize("flag", [None, True, False])
def test_bos_is_added_once(tmp_path, flag):
    _backend_with_bos_template().save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}}
    if flag is not None:
        config["add_bos_token"] = flag
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_hf_dir(tmp_path)
    ids = tok.encode("hi")
    want_bos = flag is not False  # no flag: the post-processor's BOS is the model's convention
    assert ids.count(1) == (1 if want_bos else 0) and (ids[0] == 1) == want_bos
    assert tok.eos_token_ids == (2,) and tok.chat_template is None


def test_chat_template_jinja_file_wins(tmp_path):
    path = make_hf_checkpoint(tmp_path, "mistral")
    (pathlib.Path(path) / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_hf_dir(path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def test_named_chat_templates(tmp_path):
    tiny_tokenizer(300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default:{{ messages|length }}"}]}))
    assert Tokenizer.from_hf_dir(tmp_path).apply_chat_template([{"role": "user", "content": "a"}]) == "default:1"


def test_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    tiny_tokenizer(300).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match="eos_token '<|nope|>' is not in"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------------- chat templates


def _tok_with_template(template):
    return Tokenizer(tiny_tokenizer(300), bos_token_id=1, eos_token_ids=(2,), chat_template=template)


def test_no_chat_template_is_a_clear_error():
    with pytest.raises(ValueError, match="no chat template"):
        _tok_with_template(None).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_helpers_and_errors():
    t = _tok_with_template("{{ bos_token }}{{ messages[0] | tojson }}{{ eos_token }}")
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == '<s>{"role": "user", "content": "é"}</s>'
    t = _tok_with_template("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(ValueError, match="first must be user"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="invalid Jinja"):
        _tok_with_template("{% for %}").apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="role"):
        _tok_with_template(CHATML_TEMPLATE).apply_chat_template([{"content": "x"}])


def test_templates_run_in_a_sandbox():
    from trinfer.runtime.tokenizer import ChatTemplateError

    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="SecurityError"):  # immutable: templates cannot change their inputs
        _tok_with_template("{{ messages.append(1) }}").apply_chat_template(messages)
    for evil in ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "{{ raise_exception.__globals__ }}",
                 "{{ cycler.__init__.__globals__.os }}"):
        try:
            out = _tok_with_template(evil).apply_chat_template(messages)
        except ChatTemplateError as exc:
            assert "SecurityError" in str(exc) or "UndefinedError" in str(exc), exc
            continue
        assert out == "", evil  # unsafe attributes are undefined: nothing leaks


# ---------------------------------------------------------------------- GGUF metadata variants


def _meta(backend: Backend, **extra) -> dict:
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(backend.to_str())["model"]["merges"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if t.startswith("<") and t.endswith(">") and len(t) > 2 else 1
                                          for t in tokens],
            "tokenizer.ggml.merges": [" ".join(m) if isinstance(m, list) else m for m in merges],
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}
    meta.update(extra)
    return meta


def test_gguf_byte_level_variants_match_the_source_tokenizer():
    backend = tiny_tokenizer(512)
    source = Tokenizer(backend)
    rebuilt = Tokenizer.from_gguf_metadata(_meta(backend, **{"tokenizer.ggml.add_bos_token": True}))
    for text in TEXTS:
        assert rebuilt.encode(text) == [1, *source.encode(text)], repr(text[:40])
    assert Tokenizer.from_gguf_metadata(_meta(backend)).add_bos_token is False  # byte-level default: no BOS


def test_gguf_llama3_pre_tokenizer_groups_digits_by_three():
    tok = Tokenizer.from_gguf_metadata(_meta(tiny_tokenizer(512), **{"tokenizer.ggml.pre": "llama-bpe"}))
    pieces = [tok.decode([i]) for i in tok.encode("1234567")]
    assert "".join(pieces) == "1234567" and len(pieces) >= 3


def test_gguf_tokenizer_refusals():
    backend = tiny_tokenizer(300)
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'jais'"):
        Tokenizer.from_gguf_metadata(_meta(backend, **{"tokenizer.ggml.pre": "jais"}))
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf_metadata(_meta(backend, **{"tokenizer.ggml.model": "bert"}))
    meta = _meta(backend)
    meta["tokenizer.ggml.tokens"] = meta["tokenizer.ggml.tokens"][:-1] + ["a"]
    with pytest.raises(ValueError, match="appears twice"):
        Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2"})


def _sentencepiece_gguf(path: pathlib.Path) -> None:
    """A small sentencepiece-BPE ("llama" tokenizer) GGUF: <unk> <s> </s>, 256 <0xXX> byte tokens,
    characters and merged pieces with scores, as llama.cpp writes Llama 2 / TinyLlama / Mistral files."""
    gguf = pytest.importorskip("gguf")
    from checkpoints import _CORPUS, _learn_merges
    from collections import Counter

    words = Counter("\u2581" + w for w in _CORPUS.split())
    merges = _learn_merges(words, 150)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    for i, c in enumerate(sorted(set("".join(words)))):
        tokens.append(c), types.append(1), scores.append(-1000.0 - i)
    for i, (a, b) in enumerate(merges):
        if a + b not in tokens:
            tokens.append(a + b), types.append(1), scores.append(-float(i))
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_block_count(1), w.add_context_length(128), w.add_embedding_length(64)
    w.add_feed_forward_length(96), w.add_head_count(4), w.add_layer_norm_rms_eps(1e-5)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_gguf_sentencepiece_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    _sentencepiece_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_gguf_metadata(read_gguf(str(tmp_path / "spm.gguf")).metadata)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    assert tok.add_bos_token and tok.bos_token_id == 1  # llama.cpp's default for sentencepiece vocabularies
    for text in TEXTS[:12] + ["</s>the<s>x"]:
        ids = tok.encode(text)
        assert ids == hf(text).input_ids, repr(text[:40])
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text[:40])
    assert tok.decode(tok.encode("naïve café 東京 😀")) == "naïve café 東京 😀"  # unknown chars: byte fallback


# ---------------------------------------------------------------------- incremental detokenization


def _stream(tok, ids, prompt_ids=None, **kw):
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt_ids, **kw)
    pieces = [detok.push(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", [
    "😀", "Emoji: 😀 👍🏽 🇫🇷 👨‍👩‍👧 done", "東京は日本の首都です。", "Grüße aus Köln", "mixed 東京 😀 text\n",
    "The capital of France is Paris.",
])
def test_incremental_detokenizer_never_emits_half_a_character(tok, text):
    ids = tok.encode(text)
    pieces, rest = _stream(tok, ids)
    assert "".join(pieces) + rest == tok.decode(ids) == text
    assert rest == ""
    assert not any("\ufffd" in p for p in pieces)
    if any(ord(c) > 0x2FFF for c in text):  # a character split over tokens was held back at least once
        assert "" in pieces


def test_incremental_detokenizer_with_prompt_and_special_tokens(tok):
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}]), add_special_tokens=False)
    answer = tok.encode("Bonjour 😀!<|im_end|>")
    pieces, rest = _stream(tok, answer, prompt_ids=prompt)
    assert "".join(pieces) + rest == "Bonjour 😀!"
    pieces, rest = _stream(tok, answer, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(pieces) + rest == "Bonjour 😀!<|im_end|>"


def test_incremental_detokenizer_flush_releases_an_incomplete_character(tok):
    first = tok.encode("😀")[0]
    detok = IncrementalDetokenizer(tok)
    assert detok.push(tok.encode("ok ")[0]) == "ok"
    assert detok.push(tok.encode(" ")[0]) == " "
    assert detok.push(first) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_incremental_detokenizer_sentencepiece_keeps_spaces(tmp_path):
    _sentencepiece_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_gguf_metadata(read_gguf(str(tmp_path / "spm.gguf")).metadata)
    prompt = tok.encode("The capital of France is")
    answer = tok.encode("Paris, naïve 東京.", add_special_tokens=False)
    pieces, rest = _stream(tok, answer, prompt_ids=prompt)
    assert "".join(pieces) + rest == tok.decode(prompt + answer)[len(tok.decode(prompt)):]
    assert not any("\ufffd" in p for p in pieces)
    pieces, rest = _stream(tok, answer)
    assert "".join(pieces) + rest == tok.decode(answer)
