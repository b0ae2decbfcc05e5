"""Tokenizer: a `tokenizers.Tokenizer` plus the model's special-token rules and chat template.

Built from a Hugging Face directory (tokenizer.json, tokenizer_config.json, chat_template.jinja) or from a
GGUF file's `tokenizer.*` metadata (byte-level BPE "gpt2" vocabularies and sentencepiece "llama" ones).
The backend always encodes without its own post-processor; BOS/EOS are added here, once, following the
model's `add_bos_token` / `add_eos_token`, so a tokenizer.json whose template also adds BOS cannot double it.

`IncrementalDetokenizer` turns a stream of token ids into text pieces that never end in half a UTF-8
character; their concatenation equals the decoded ids.

Untrusted input: every field of the tokenizer files is read with its type checked (`fields`), errors name
the file and key (ModelFileError); chat templates render within limits (`chat_template`); text that is not
valid Unicode (lone surrogates, as undecodable bytes on a command line become) is refused with a ValueError;
`exceeds()` tells, cheaply, when a long text certainly has more tokens than a limit.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from .chat_template import ChatTemplate, ChatTemplateError, TemplateLimits
from .fields import (ModelFileError, get_bool, get_int, get_list, get_str, is_int, is_number, read_json_object,
                     short_repr)

__all__ = ["Tokenizer", "IncrementalDetokenizer", "gguf_tokenizer_backend", "validate_text", "ChatTemplateError",
           "TemplateLimits"]

# A tokenizer.json larger than this is refused before the tokenizers library parses it (it holds the whole file
# and its vocabulary in memory): real ones are tens of MiB at most (Gemma 3's: 33 MiB).
MAX_TOKENIZER_JSON_BYTES = 256 << 20

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


def _token_content(value: Any, source: str, key: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ModelFileError(source, key, f"expected a token string or {{'content': ...}}, got {short_repr(value)}")


def validate_text(text: Any, name: str = "text") -> str:
    """`text` if it is a str of valid Unicode; TypeError for another type, ValueError naming `name` for a
    lone surrogate (what undecodable bytes become on a command line, or a broken UTF-16 string)."""
    if not isinstance(text, str):
        raise TypeError(f"{name}: expected str, got {type(text).__name__}")
    if text.isascii():
        return text
    try:
        text.encode("utf-8")  # C speed; only surrogates fail (a regex search is ~20x slower on megabytes)
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name}: not valid Unicode text: a lone surrogate U+{ord(text[exc.start]):04X} at "
                         f"character {exc.start} (undecodable bytes, e.g. invalid UTF-8 on the command line?)") \
            from None
    return text


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
        chat_template_origin: str = "chat_template",
        template_limits: TemplateLimits | None = None,
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
        if chat_template is not None and not isinstance(chat_template, str):
            raise ModelFileError(chat_template_origin, None, f"expected the chat template as a string, got "
                                 f"{type(chat_template).__name__}")
        self.chat_template = chat_template
        self.chat_template_origin = chat_template_origin  # where it came from (file and key), for errors
        self.template_limits = template_limits or TemplateLimits()
        self._template: ChatTemplate | None = None  # compiled lazily
        self._chars_bound: tuple[int, bool] | None | bool = False  # _chars_per_token_bound; False: not computed

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
        size = os.path.getsize(tok_file)
        if size > MAX_TOKENIZER_JSON_BYTES:
            raise ModelFileError(tok_file, None, f"{size} bytes, more than the {MAX_TOKENIZER_JSON_BYTES >> 20} MiB "
                                 "a tokenizer.json may have (the largest real ones are tens of MiB)")
        try:
            backend = _Backend.from_file(tok_file)
        except BaseException as exc:  # tokenizers raises Exception, or (a Rust panic) a BaseException
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            raise ModelFileError(tok_file, None, f"not a valid tokenizer.json ({_one_line(exc)})") from None
        config: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            config = read_json_object(cfg_file)

        def special_id(key: str) -> int | None:
            content = _token_content(config.get(key), cfg_file, key)
            if content is None:
                return None
            token_id = backend.token_to_id(content)
            if token_id is None:
                raise ModelFileError(cfg_file, key, f"{content!r} is not in tokenizer.json's vocabulary")
            return token_id

        bos = special_id("bos_token")
        eos_own = special_id("eos_token")
        eos = _known(backend, eos_token_ids) + ([eos_own] if eos_own is not None else [])
        add_bos = get_bool(config, "add_bos_token", source=cfg_file, default=None)
        add_eos = get_bool(config, "add_eos_token", source=cfg_file, default=None)
        if add_bos is None or add_eos is None:
            # No flag: the tokenizer.json's own post-processor says what the model was trained with.
            plain = backend.encode("a", add_special_tokens=False).ids
            full = backend.encode("a", add_special_tokens=True).ids
            if add_bos is None:
                add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
            if add_eos is None:
                add_eos = eos_own is not None and len(full) > len(plain) and full[-1] == eos_own
        template, origin = _chat_template_from_dir(path, config, cfg_file)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, add_bos_token=bool(add_bos),
                   add_eos_token=bool(add_eos), chat_template=template, chat_template_origin=origin)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, eos_token_ids: Iterable[int] = (),
                           source: str = "GGUF") -> "Tokenizer":
        """Build from a GGUF's metadata as plain Python values (keys "tokenizer.ggml.tokens", ...).

        source: the file, for error messages (ModelFileError naming it and the key).
        """
        backend = gguf_tokenizer_backend(meta, source=source)
        vocab = len(meta["tokenizer.ggml.tokens"])
        bos = get_int(meta, "tokenizer.ggml.bos_token_id", source=source, default=None, minimum=0,
                      maximum=vocab - 1)
        eos_own = get_int(meta, "tokenizer.ggml.eos_token_id", source=source, default=None, minimum=0,
                          maximum=vocab - 1)
        eos = _known(backend, eos_token_ids) + ([eos_own] if eos_own is not None else [])
        add_bos = get_bool(meta, "tokenizer.ggml.add_bos_token", source=source, default=None)
        if add_bos is None:  # llama.cpp's default: sentencepiece vocabularies add BOS, byte-level ones do not
            add_bos = meta.get("tokenizer.ggml.model") == "llama"
        add_eos = get_bool(meta, "tokenizer.ggml.add_eos_token", source=source, default=False)
        template = get_str(meta, "tokenizer.chat_template", source=source, default=None)
        return cls(backend, bos_token_id=bos, eos_token_ids=eos, add_bos_token=add_bos and bos is not None,
                   add_eos_token=add_eos, chat_template=template,
                   chat_template_origin=f"{source}: tokenizer.chat_template")

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
        template's output. TypeError for a non-str, ValueError for text that is not valid Unicode.
        """
        ids = self._backend.encode(validate_text(text), add_special_tokens=False).ids
        if add_special_tokens:
            if self.add_bos_token:
                ids = [self.bos_token_id, *ids]
            if self.add_eos_token:
                ids.append(self.eos_token_ids[0])
        return ids

    @property
    def num_special_tokens_added(self) -> int:
        """Tokens encode(add_special_tokens=True) adds around the text (BOS and/or EOS)."""
        return int(self.add_bos_token) + int(self.add_eos_token)

    # Texts up to this many characters per allowed token (plus a constant) are simply tokenized.
    _EXCEEDS_START_CHARS_PER_TOKEN = 4
    _EXCEEDS_START_CHARS = 4096

    def exceeds(self, text: str, limit: int) -> int | None:
        """A number of tokens that `text` (without BOS/EOS) certainly has beyond `limit`, or None when not sure.

        Cheap for long texts: it never tokenizes more than a prefix of about 4x the length at which the
        answer is known. The bounds used are sound:
        - when every token stands for at most L characters (`max_chars_per_token`, known for BPE vocabularies
          that cover every byte, with no pre-tokenizer or added token that drops or absorbs text, and no
          normalizer or only ones that keep every character), a text whose normalized form has n characters
          has at least ceil(n / L) tokens. n is the text's own length when the normalizers never shorten text
          (Llama 2's Prepend + Replace, Lowercase, NFD/NFKD); with NFC/NFKC/StripAccents the text is normalized
          (linear time) and measured;
        - the pre-tokenizer splits text into words that are tokenized one by one, so the words of a prefix
          that end before its last two words get the same tokens in the whole text: their count is a lower
          bound. Prefixes of 4x, 16x, ... the limit are tried, so the cost stays proportional to the limit.
        None means: tokenize in full to know (the text has no word boundaries the bound can use, or fits).
        """
        n = len(validate_text(text))
        if n <= self._EXCEEDS_START_CHARS_PER_TOKEN * limit + self._EXCEEDS_START_CHARS:
            return None
        bound = self._chars_per_token()
        if bound is not None and n > limit * bound[0]:
            per_token, measure = bound
            if measure:  # a normalizer that may shorten text: count what the model will see
                n = len(self._backend.normalizer.normalize_str(text))
            if n > limit * per_token:
                return -(-n // per_token)
        cut = self._EXCEEDS_START_CHARS_PER_TOKEN * limit + self._EXCEEDS_START_CHARS
        while cut < n:
            words = self._backend.encode(text[:cut], add_special_tokens=False).word_ids
            last = max((w for w in words if w is not None), default=None)
            if last is not None:
                sure = sum(1 for w in words if w is not None and w < last - 1)
                if sure > limit:
                    return sure
            cut *= 4
        return None

    @property
    def max_chars_per_token(self) -> int | None:
        """The most characters of text one token can stand for, when that bound is sound (see `exceeds`);
        None when this tokenizer can map text of any length to one token or drop text."""
        bound = self._chars_per_token()
        return None if bound is None else bound[0]

    def _chars_per_token(self) -> tuple[int, bool] | None:
        if self._chars_bound is False:
            self._chars_bound = _chars_per_token_bound(self._backend)
        return self._chars_bound

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
            for key, value in message.items():
                if isinstance(value, str):
                    validate_text(value, f"messages[{index}][{key!r}]")
                    if len(value) > self.template_limits.max_chars:
                        raise ValueError(f"messages[{index}][{key!r}]: {len(value)} characters, more than the chat "
                                         f"template's limit of {self.template_limits.max_chars} (a prompt that "
                                         "long cannot fit a context anyway)")
        if self._template is None:
            self._template = ChatTemplate(self.chat_template, origin=self.chat_template_origin,
                                          limits=self.template_limits)
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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def _chat_template_from_dir(path: str, config: Mapping[str, Any], cfg_file: str) -> tuple[str | None, str]:
    """(template source or None, where it came from) for a Hugging Face directory."""
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):  # transformers >= 4.43 may write the template to its own file
        try:
            with open(jinja_file, encoding="utf-8") as f:
                return f.read(), jinja_file
        except UnicodeDecodeError as exc:
            raise ModelFileError(jinja_file, None, f"not valid UTF-8 ({exc})") from None
    template, origin = config.get("chat_template"), f"{cfg_file}: chat_template"
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        get_list(config, "chat_template", source=cfg_file, item_name='objects {"name": str, "template": str}',
                 item=lambda t: isinstance(t, Mapping) and isinstance(t.get("name"), str)
                 and isinstance(t.get("template"), str))
        named = {t["name"]: t["template"] for t in template}
        template, origin = named.get("default"), f"{cfg_file}: chat_template['default']"
    if template is None:
        json_file = os.path.join(path, "chat_template.json")
        if os.path.isfile(json_file):
            template, origin = read_json_object(json_file).get("chat_template"), f"{json_file}: chat_template"
    if template is not None and not isinstance(template, str):
        raise ModelFileError(origin, None, f"expected the chat template as a string, got {type(template).__name__}")
    return template, origin


def gguf_tokenizer_backend(meta: Mapping[str, Any], *, source: str = "GGUF") -> _Backend:
    """A tokenizers.Tokenizer from GGUF metadata: byte-level BPE ("gpt2") or sentencepiece BPE ("llama").

    source: the file, named with the key in every ModelFileError.
    """
    kind = get_str(meta, "tokenizer.ggml.model", source=source, default=None)
    if meta.get("tokenizer.ggml.tokens") is None:
        raise ModelFileError(source, "tokenizer.ggml.tokens", "no tokenizer.ggml.tokens in the metadata; the file "
                             "carries no tokenizer")
    tokens = get_list(meta, "tokenizer.ggml.tokens", source=source, item=lambda t: isinstance(t, str) and t != "",
                      item_name="non-empty strings")
    if not tokens:
        raise ModelFileError(source, "tokenizer.ggml.tokens", "the vocabulary is empty")
    types = get_list(meta, "tokenizer.ggml.token_type", source=source, default=None, item=is_int,
                     item_name="ints") or [_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFileError(source, "tokenizer.ggml.token_type", f"has {len(types)} entries for {len(tokens)} tokens")
    if kind == "gpt2":
        backend = _byte_level_backend(meta, tokens, types, source)
    elif kind == "llama":
        backend = _sentencepiece_backend(meta, tokens, types, source)
    else:
        raise ModelFileError(source, None, f"tokenizer.ggml.model {short_repr(kind)} is not supported; supported: "
                             "'gpt2', 'llama'")
    specials = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    backend.add_special_tokens(specials)
    backend.add_tokens(user)
    if backend.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelFileError(
            source, "tokenizer.ggml.tokens", f"the tokenizer built from the metadata has "
            f"{backend.get_vocab_size(with_added_tokens=True)} tokens, the file lists {len(tokens)} (duplicate token "
            "strings?)"
        )
    return backend


def _unique_vocab(tokens: Sequence[str], source: str) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        if token in vocab:
            raise ModelFileError(source, "tokenizer.ggml.tokens", f"token {short_repr(token)} appears twice (ids "
                                 f"{vocab[token]}, {index})")
        vocab[token] = index
    return vocab


def _bpe(source: str, key: str, **kwargs) -> models.BPE:
    """models.BPE(**kwargs); a refusal (or a Rust panic, which is a BaseException) names the file and key."""
    try:
        return models.BPE(**kwargs)
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ModelFileError(source, key, f"the vocabulary and merges do not make a BPE model ({_one_line(exc)})") \
            from None


def _byte_level_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int],
                        source: str) -> _Backend:
    pre = get_str(meta, "tokenizer.ggml.pre", source=source, default=None)
    if pre not in _BYTE_LEVEL_PRE:
        raise ModelFileError(
            source, None, f"tokenizer.ggml.pre {short_repr(pre)} (the pre-tokenizer of this byte-level "
            f"vocabulary) is not supported; supported: {sorted(k for k in _BYTE_LEVEL_PRE if k)}"
        )
    split, digits, ignore_merges = _BYTE_LEVEL_PRE[pre]
    if meta.get("tokenizer.ggml.merges") is None:
        raise ModelFileError(source, "tokenizer.ggml.merges", "byte-level vocabulary without tokenizer.ggml.merges")
    merges_raw = get_list(meta, "tokenizer.ggml.merges", source=source, item=lambda m: isinstance(m, str),
                          item_name="strings")
    # Normal tokens are spelled in GPT-2's byte alphabet; a few converters store raw text: respell those.
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    spelled = [t if k in (_CONTROL, _USER_DEFINED) or set(t) <= letters
               else "".join(alphabet[b] for b in t.encode("utf-8")) for t, k in zip(tokens, types)]
    vocab = _unique_vocab(spelled, source)
    merges = []
    for index, merge in enumerate(merges_raw):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelFileError(source, f"tokenizer.ggml.merges[{index}]", f"{short_repr(merge)} is not two tokens")
        left, right = parts
        for token in (left, right, left + right):
            if token not in vocab:  # tokenizers would panic on a merge whose result it cannot look up
                raise ModelFileError(source, f"tokenizer.ggml.merges[{index}]", f"{short_repr(merge)}: "
                                     f"{short_repr(token)} is not in tokenizer.ggml.tokens")
        merges.append((left, right))
    model = _bpe(source, "tokenizer.ggml.merges", vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                 ignore_merges=ignore_merges)
    backend = _Backend(model)
    add_prefix = get_bool(meta, "tokenizer.ggml.add_space_prefix", source=source, default=False)
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


# Merge candidates a sentencepiece vocabulary may imply, in characters (the merges' two strings, summed):
# real vocabularies imply a few million; a vocabulary implying more is refused rather than built.
MAX_SENTENCEPIECE_MERGE_CHARS = 1 << 25


_HASH_MOD = (1 << 61) - 1  # a Mersenne prime: polynomial hashes of strings, for prefix/suffix lookups
_HASH_BASE = 1_000_003


def _sentencepiece_merges(tokens: Sequence[str], mergeable: dict[str, int], scores: Sequence[float],
                          source: str) -> list[tuple[str, str]]:
    """Every (left, right) pair of mergeable tokens whose concatenation is a mergeable token, best score first.

    Linear in the vocabulary's characters plus the merges found. Each token's prefixes and suffixes are
    looked up by polynomial hash (built one character at a time, so a cut costs O(1), not a slice of the
    token), only at lengths some mergeable token has; only cuts whose prefix and suffix both hit are sliced,
    and those slices are checked for real (a hash collision costs a slice, never a wrong merge). So a
    200,000-character token costs 400,000 hash steps, not 200,000 slices of it. Refuses a vocabulary that
    implies more than MAX_SENTENCEPIECE_MERGE_CHARS characters of merges.
    """
    mod, base = _HASH_MOD, _HASH_BASE
    hashes: set[tuple[int, int]] = set()
    lengths: set[int] = set()
    for token in mergeable:
        h = 0
        for ch in token:
            h = (h * base + ord(ch)) % mod
        hashes.add((len(token), h))
        lengths.add(len(token))
    longest = max(lengths, default=0)
    candidates = []
    budget = MAX_SENTENCEPIECE_MERGE_CHARS
    for token, index in mergeable.items():
        n = len(token)
        reach = min(n - 1, longest)
        prefix_cuts = set()
        h = 0
        for i in range(reach):  # prefix token[:i+1]
            h = (h * base + ord(token[i])) % mod
            if i + 1 in lengths and (i + 1, h) in hashes:
                prefix_cuts.add(i + 1)
        if not prefix_cuts:
            continue
        h, power = 0, 1
        for i in range(reach):  # suffix token[n-1-i:], of length i+1
            h = (ord(token[n - 1 - i]) * power + h) % mod
            power = power * base % mod
            cut = n - 1 - i
            if cut in prefix_cuts and i + 1 in lengths and (i + 1, h) in hashes:
                left, right = token[:cut], token[cut:]
                if left not in mergeable or right not in mergeable:
                    continue  # a hash collision
                budget -= n
                if budget < 0:
                    raise ModelFileError(source, "tokenizer.ggml.tokens", "the sentencepiece vocabulary implies more "
                                         f"than {MAX_SENTENCEPIECE_MERGE_CHARS} characters of merges (at token "
                                         f"{index}, {n} characters long); refused")
                candidates.append((-scores[index], index, mergeable[left], mergeable[right], left, right))
    candidates.sort()
    return [(c[4], c[5]) for c in candidates]


def _sentencepiece_backend(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int],
                           source: str) -> _Backend:
    """Sentencepiece BPE (Llama 2, TinyLlama, Mistral): merges rebuilt from the token scores.

    llama.cpp merges the adjacent pair whose concatenation is the best-scored token; ranking merges by that
    score gives the same order to a BPE model. Bytes missing from the vocabulary fall back to <0xXX> tokens.
    """
    scores = get_list(meta, "tokenizer.ggml.scores", source=source, default=None, item=is_number,
                      item_name="finite numbers")
    if scores is None or len(scores) != len(tokens):
        raise ModelFileError(source, "tokenizer.ggml.scores", "sentencepiece vocabulary without one "
                             "tokenizer.ggml.scores entry per token")
    vocab = _unique_vocab(tokens, source)
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (_NORMAL, _USER_DEFINED, _UNUSED)}
    merges = _sentencepiece_merges(tokens, mergeable, [float(x) for x in scores], source)
    unk_id = get_int(meta, "tokenizer.ggml.unknown_token_id", source=source, default=None, minimum=0,
                     maximum=len(tokens) - 1)
    unk = tokens[unk_id] if unk_id is not None else None
    model = _bpe(source, "tokenizer.ggml.tokens", vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                 byte_fallback=True)
    backend = _Backend(model)
    add_prefix = get_bool(meta, "tokenizer.ggml.add_space_prefix", source=source, default=True)
    # Spaces become U+2581; the text (not every piece between special tokens) gets one leading U+2581.
    backend.normalizer = None
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


# Pre-tokenizers that never drop text: with them (and normalizers that keep text), every character of the text
# ends up in some token. Split and Punctuation qualify unless their behavior removes what they match.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Split", "Punctuation", "UnicodeScripts"}


# Normalizers (tokenizers' names) that never make text shorter, character by character (Replace only with a
# one-character pattern and content of at least one character): with only these, the text's length is a lower
# bound on the normalized length. And those that may shorten it but only within what they see, never across a
# special token (composition, accent stripping): with them the text is normalized and measured.
_GROWING_NORMALIZERS = {"Prepend", "Lowercase", "NFD", "NFKD"}
_MEASURED_NORMALIZERS = {"NFC", "NFKC", "StripAccents"}


def _component_steps(component, sequence_key: str) -> list[dict]:
    """The steps of a tokenizers normalizer or pre-tokenizer as their JSON states: a Sequence's parts (under
    `sequence_key`), else the component itself."""
    state = json.loads(component.__getstate__())
    return state.get(sequence_key, []) if state.get("type") == "Sequence" else [state]


def _normalizer_measure(backend: _Backend) -> bool | None:
    """How `exceeds` counts characters under `backend`'s normalizer: False: the text's own length is a lower bound
    (no normalizer, or only growing ones); True: normalize the text and count; None: no sound count (a normalizer
    that can delete text across what it sees, e.g. Strip, a regex Replace, BertNormalizer, Precompiled; or an
    added token the normalizer would change, so whole-text normalization would not be what the model sees)."""
    if backend.normalizer is None:
        return False
    steps = _component_steps(backend.normalizer, "normalizers")
    measure = False
    for step in steps:
        kind = step.get("type")
        if kind == "Replace":
            pattern = step.get("pattern", {}).get("String")
            if not isinstance(pattern, str) or len(pattern) != 1 or not step.get("content"):
                return None
        elif kind in _MEASURED_NORMALIZERS:
            measure = True
        elif kind not in _GROWING_NORMALIZERS:
            return None
    if not measure:  # the text's own length counts: an added token is one token for its own characters anyway
        return False
    prepends = [step["prepend"] for step in steps if step.get("type") == "Prepend"]

    def changes(content: str) -> bool:  # the normalizer changes an added token's content (beyond a Prepend)
        out = backend.normalizer.normalize_str(content)
        for p in prepends:
            out = out.removeprefix(p)
        return out != content

    if any(changes(t.content) for t in backend.get_added_tokens_decoder().values()):
        return None
    return True


def _chars_per_token_bound(backend: _Backend) -> tuple[int, bool] | None:
    """(L, measure): every token of `backend` stands for at most L characters of normalized text, and `measure`
    says whether the text must be normalized to count them (`_normalizer_measure`); None when no bound is sound.

    Sound when: normalizers that keep every character (`_normalizer_measure`), a BPE model, pre-tokenizers that
    keep all text, every byte covered (byte-level: the 256 byte symbols are tokens; otherwise byte fallback with
    the 256 <0xXX> tokens), so nothing is dropped or fused into an unknown token, and no added token that absorbs
    the whitespace around it (lstrip/rstrip). Then each token is one vocabulary entry standing for at most
    len(entry) characters of normalized text (an added token: its own characters).
    """
    measure = _normalizer_measure(backend)
    if measure is None or type(backend.model).__name__ != "BPE":
        return None
    steps = [] if backend.pre_tokenizer is None else _component_steps(backend.pre_tokenizer, "pretokenizers")
    for step in steps:
        if step.get("type") not in _KEEPING_PRE_TOKENIZERS or step.get("behavior") == "Removed":
            return None
    if any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values()):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    if any(step.get("type") == "ByteLevel" for step in steps):
        if not all(symbol in vocab for symbol in _byte_alphabet().values()):
            return None
    elif not (backend.model.byte_fallback and all(f"<0x{b:02X}>" in vocab for b in range(256))):
        return None
    return max(len(token) for token in vocab), measure
