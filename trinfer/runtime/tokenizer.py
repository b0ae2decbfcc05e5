"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special-token rules and chat template.

Built from a Hugging Face directory (tokenizer.json, tokenizer_config.json, chat_template.jinja) or from a
GGUF file's `tokenizer.*` metadata (byte-level BPE "gpt2" vocabularies and sentencepiece "llama" ones).
The backend always encodes without its own post-processor; BOS/EOS are added here, once, following the
model's `add_bos_token` / `add_eos_token`, so a tokenizer.json whose template also adds BOS cannot double it.

`IncrementalDetokenizer` turns a stream of token ids into text pieces that never end in half a UTF-8
character; their concatenation equals the decoded ids.
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

__all__ = ["Tokenizer", "IncrementalDetokenizer", "gguf_tokenizer_backend"]

# llama.cpp token types (tokenizer.ggml.token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns, by the GGUF's tokenizer.ggml.pre (the regexes the vocabularies were trained with).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2/Qwen2.5/Qwen3 (llama.cpp's "qwen2"): digits one by one, letters after one optional non-letter.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# pre type -> (split regex or None for GPT-2's own, split digits one by one, BPE ignore_merges)
_BYTE_LEVEL_PRE = {
    None: (None, False, False),
    "default": (None, False, False),
    "gpt2": (None, False, False),
    "smollm": (None, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "llama-v3": (_LLAMA3_SPLIT, False, True),
    "smaug-bpe": (_LLAMA3_SPLIT, False, True),
    "tekken": (_TEKKEN_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (printable latin-1 bytes stand for themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"tokenizer_config.json: expected a token string or {{'content': ...}}, got {value!r}")


class Tokenizer:
    """Text <-> token ids for one model, with its BOS/EOS rules and chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        chat_template: str | None = None,
    ) -> None:
        if not isinstance(backend, _Backend):
            raise TypeError(f"backend: expected a tokenizers.Tokenizer, got {type(backend).__name__}")
        self._backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        for name, token_id in [("bos_token_id", bos_token_id), *(("eos_token_ids", t) for t in eos_token_ids)]:
            if token_id is not None and (not isinstance(token_id, int) or backend.id_to_token(token_id) is None):
                raise ValueError(f"{name}: {token_id!r} is not a token id of this vocabulary (size {self.vocab_size})")
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token: the tokenizer adds BOS but has no bos_token_id")
        eos = tuple(dict.fromkeys(eos_token_ids))
        if add_eos_token and not eos:
            raise ValueError("add_eos_token: the tokenizer adds EOS but has no eos token")
        self.bos_token_id: int | None = bos_token_id
        self.eos_token_ids: tuple[int, ...] = eos
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.chat_template = chat_template
        self._template = None  # compiled lazily

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, *, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a model directory.

        eos_token_ids: ids that also end generation (from config.json / generation_config.json; ids the
        vocabulary lacks, as in a padded embedding, are left out); the tokenizer's own eos_token is added.
        """
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(
                f"{path}: no tokenizer.json (trinfer needs the fast-tokenizer file; tokenizer.model alone is "
                "not supported)"
            )
        try:
            backend = _Backend.from_file(tok_file)
        except Exception as exc:
            raise ValueError(f"{tok_file}: not a valid tokenizer.json ({exc})") from exc
        config: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            config = _read_json(cfg_file)

        def special_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            if content is None:
                return None
            token_id = backend.token_to_id(content)
            if token_id is None:
                raise ValueError(f"{cfg_file}: {key} {content!r} is not in tokenizer.json's vocabulary")
            return token_id

        bos = special_id("bos_token")
        eos_own = special_id("eos_token")
        eos = _known(backend, eos_token_ids) + ([eos_own] if eos_own is not None else [])
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        if add_bos is None or add_eos is None:
            # No flag: the tokenizer.json's own post-processor says what the model was trained with.
            plain = backend.encode("a", add_special_tokens=False).ids
            full = backend.encode("a", add_special_tokens=True).ids
            if add_bos is None:
                add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
            if add_eos is None:
                add_eos = eos_own is not None and len(full) > len(plain) and full[-1] == eos_own
        template = _chat_template_from_dir(path, config)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, add_bos_token=bool(add_bos),
                   add_eos_token=bool(add_eos), chat_template=template)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, eos_token_ids: Iterable[int] = ()) -> "Tokenizer":
        """Build from a GGUF's metadata as plain Python values (keys "tokenizer.ggml.tokens", ...)."""
        backend = gguf_tokenizer_backend(meta)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos_own = meta.get("tokenizer.ggml.eos_token_id")
        eos = _known(backend, eos_token_ids) + ([int(eos_own)] if eos_own is not None else [])
        if "tokenizer.ggml.add_bos_token" in meta:
            add_bos = bool(meta["tokenizer.ggml.add_bos_token"])
        else:  # llama.cpp's default: sentencepiece vocabularies add BOS, byte-level ones do not
            add_bos = meta.get("tokenizer.ggml.model") == "llama"
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        return cls(backend, bos_token_id=None if bos is None else int(bos), eos_token_ids=eos,
                   add_bos_token=add_bos and bos is not None, add_eos_token=add_eos,
                   chat_template=meta.get("tokenizer.chat_template"))

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json to a directory (readable by from_hf_dir and transformers).

        The saved tokenizer.json's post-processor adds BOS/EOS as this tokenizer does, since that is where
        transformers' generic tokenizer takes them from.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        backend = _Backend.from_str(self._backend.to_str())
        specials = []
        single = "$A"
        if self.add_bos_token:
            bos = self.id_to_token(self.bos_token_id)
            single, specials = f"{bos} {single}", [(bos, self.bos_token_id)]
        if self.add_eos_token:
            eos = self.id_to_token(self.eos_token_ids[0])
            single, specials = f"{single} {eos}", specials + [(eos, self.eos_token_ids[0])]
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)
        backend.save(os.path.join(path, "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "bos_token": None if self.bos_token_id is None else self.id_to_token(self.bos_token_id),
            "eos_token": self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)

    # ------------------------------------------------------------------ use
    @property
    def backend(self) -> _Backend:
        """The underlying tokenizers.Tokenizer (encodes without BOS/EOS)."""
        return self._backend

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, BOS/EOS as the model adds them.

        Special-token text inside `text` (e.g. "<|im_start|>") becomes the special token, as in the chat
        template's output.
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids.append(self.eos_token_ids[0])
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids outside the tokenizer's vocabulary (a padded embedding) decode to nothing."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of `token_id` (its byte-level / sentencepiece spelling), None if unknown."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's Jinja chat template.

        The prompt text comes back; encode it with add_special_tokens=False when the template writes BOS
        itself (most do). Extra keyword arguments are passed to the template (e.g. tools=None).
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template (tokenizer_config.json chat_template / "
                             "GGUF tokenizer.chat_template); pass plain text instead")
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise TypeError("messages: expected a list of dicts with 'role' and 'content'")
        for index, message in enumerate(messages):
            if "role" not in message:
                raise ValueError(f"messages[{index}]: missing 'role'")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else ""
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=bos, eos_token=eos, **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, "
                f"eos_token_ids={self.eos_token_ids}, add_bos_token={self.add_bos_token})")


class IncrementalDetokenizer:
    """Stream text out of generated token ids, a piece per pushed token.

    push(token_id) returns only the text that became final with this token (possibly ""), holding back
    output that ends in U+FFFD (a UTF-8 character whose bytes are split across tokens). flush() returns
    what is still held. The pieces concatenate to tokenizer.decode(pushed ids); with prompt_ids, to the
    text that continues the prompt (decode(prompt + pushed) minus decode(prompt)), which keeps the
    leading space that sentencepiece decoders strip from a first token.
    """

    _CONTEXT = 6  # prompt tokens kept as decoding context

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None, *,
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = list(prompt_ids[-self._CONTEXT:]) if prompt_ids else []
        self._prefix_offset = 0               # start of the window decoded as context
        self._read_offset = len(self._ids)    # ids before this are already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # nothing new, or a character still incomplete: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """The held-back text (complete or not); the stream is then fully emitted."""
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        text = self._decode(self._ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix):]


# ---------------------------------------------------------------------- helpers


def _known(backend: _Backend, ids: Iterable[int]) -> list[int]:
    return [t for t in ids if isinstance(t, int) and backend.id_to_token(t) is not None]


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _chat_template_from_dir(path: str, config: Mapping[str, Any]) -> str | None:
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):  # transformers >= 4.43 may write the template to its own file
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is None:
        json_file = os.path.join(path, "chat_template.json")
        if os.path.isfile(json_file):
            template = _read_json(json_file).get("chat_template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path}: chat_template must be a string, got {type(template).__name__}")
    return template


def _compile_template(source: str):
    """Compile a chat template in a sandbox (templates come with downloaded models: no file or code access)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(f"chat template: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template: invalid Jinja at line {exc.lineno}: {exc.message}") from exc


def gguf_tokenizer_backend(meta: Mapping[str, Any]) -> _Backend:
    """A tokenizers.Tokenizer from GGUF metadata: byte-level BPE ("gpt2") or sentencepiece BPE ("llama")."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("GGUF: no tokenizer.ggml.tokens in the metadata; the file carries no tokenizer")
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"GGUF: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        backend = _byte_level_backend(meta, tokens, types)
    elif kind == "llama":
        backend = _sentencepiece_backend(meta, tokens, types)
    else:
        raise ValueError(f"GGUF: tokenizer.ggml.model {kind!r} is not supported; supported: 'gpt2', 'llama'")
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    backend.add_special_tokens(specials)
    backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(
            f"GGUF: the tokenizer built from the metadata has {backend.get_vocab_size(with_added_tokens=True)} "
            f"tokens, the file lists {len(tokens)} (duplicate token strings?)"
        )
    return backend


def _unique_vocab(tokens: Sequence[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise ValueError(f"GGUF: token {token!r} appears twice in tokenizer.ggml.tokens (ids {vocab[token]}, {index})")
        vocab[token] = index
    return vocab


def _byte_level_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]) -> _Backend:
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _BYTE_LEVEL_PRE:
        raise ValueError(
            f"GGUF: tokenizer.ggml.pre {pre!r} (the pre-tokenizer of this byte-level vocabulary) is not supported; "
            f"supported: {sorted(k for k in _BYTE_LEVEL_PRE if k)}"
        )
    split, digits, ignore_merges = _BYTE_LEVEL_PRE[pre]
    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ValueError("GGUF: byte-level vocabulary without tokenizer.ggml.merges")
    # Normal tokens are spelled in GPT-2's byte alphabet; a few converters store raw text: respell those.
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    spelled = [t if k in (_CONTROL, _USER_DEFINED) or set(t) <= letters
               else "".join(alphabet[b] for b in t.encode("utf-8")) for t, k in zip(tokens, types)]
    vocab = _unique_vocab(spelled)
    merges = []
    for index, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF: tokenizer.ggml.merges[{index}] = {merge!r} is not two tokens")
        merges.append((parts[0], parts[1]))
    model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                       ignore_merges=ignore_merges)
    backend = _Backend(model)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    steps = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=False))
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=add_prefix, use_regex=True))
    backend.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]) -> _Backend:
    """Sentencepiece BPE (Llama 2, TinyLlama, Mistral): merges rebuilt from the token scores.

    llama.cpp merges the adjacent pair whose concatenation is the best-scored token; ranking merges by that
    score gives the same order to a BPE model. Bytes missing from the vocabulary fall back to <0xXX> tokens.
    """
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError("GGUF: sentencepiece vocabulary without one tokenizer.ggml.scores entry per token")
    vocab = _unique_vocab(tokens)
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED, _UNUSED)}
    candidates = []
    for token, index in mergeable.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in mergeable and right in mergeable:
                candidates.append((-float(scores[index]), index, mergeable[left], mergeable[right], left, right))
    candidates.sort()
    merges = [(c[4], c[5]) for c in candidates]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = _Backend(model)
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    # Spaces become U+2581; the text (not every piece between special tokens) gets one leading U+2581.
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend

