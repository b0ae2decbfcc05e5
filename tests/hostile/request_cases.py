"""Requests: chat templates, prompts and token ids, engine arguments (over the worker's base model)."""
from __future__ import annotations

import numpy as np

from . import gguf_writer as W
from .core import Ctx, case
from .gguf_cases import _meta


# ---------------------------------------------------------------------------------------------------------
# Chat templates (rendered with the base model's tokenizer)

_HUGE = 10**9
for _label, _template, _names in [
    ("nested-loops-1e5x1e5", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     ("refused: ", "more than")),  # steps or seconds, whichever comes first on this machine
    ("string-times-1e9", "{{ ('a' * 1000000000) | length }}", ("'*'",)),
    ("list-times-1e8", "{{ ([1] * 100000000) | length }}", ("'*'",)),
    ("doubling-by-tilde", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                          "{% endfor %}{{ ns.s | length }}", ("'~'",)),
    ("doubling-by-plus", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                         "{% endfor %}{{ ns.s | length }}", ("'+'",)),
    ("set-block-amplifies", "{% set s = 'a' * 4000000 %}{% set t %}{% for i in range(1000) %}{{ s }}{% endfor %}"
                            "{% endset %}{{ t | length }}", ("emits more than",)),
    ("output-too-long", "{% for i in range(100) %}{{ 'a' * 100000 }}{% endfor %}", ("longer than",)),
    ("center-1e9", "{{ 'x' | center(1000000000) }}", ("1000000000",)),
    ("str-center-1e9", "{{ 'x'.center(1000000000) }}", ("1000000000",)),
    ("percent-width", "{{ '%1000000000d' % 1 }}", ("1000000000",)),
    ("format-filter-width", "{{ '%1000000000d' | format(1) }}", ("1000000000",)),
    ("str-format-width", "{{ '{:>1000000000}'.format(1) }}", ("1000000000",)),
    ("replace-amplifies", "{{ ('a' * 1000000) | replace('a', 'aaaaaaaaaa') }}", ("replace",)),
    ("str-replace-amplifies", "{{ ('a' * 1000000).replace('a', 'aaaaaaaaaa') }}", ("replace",)),
    ("join-of-refs", "{% set s = 'a' * 1000000 %}{{ [s, s, s, s, s, s, s, s, s, s] | join }}", ("join",)),
    ("str-join-of-refs", "{% set s = 'a' * 1000000 %}{{ ''.join([s, s, s, s, s, s, s, s, s, s]) }}", ("join",)),
    ("indent-amplifies", "{{ ('\\n' * 1000000) | indent(width=100) }}", ("indent",)),
    ("wordwrap-amplifies", "{{ ('a ' * 1000000) | wordwrap(1, wrapstring='xxxxxxxxxx') }}", ("wordwrap",)),
    ("batch-fill-1e9", "{{ [1] | batch(1000000000, 'x') | list }}", ("1000000000",)),
    ("power", "{{ 10 ** 100000000 }}", ("'**'",)),
    ("int-squaring", "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
                     "{% endfor %}{{ ns.n > 0 }}", ("integer",)),
    ("tojson-indent-huge", "{{ messages | tojson(indent=1000000) }}", ("indent",)),
    ("lipsum-removed", "{{ lipsum(100000) }}", ("lipsum",)),
    ("range-1e30", "{{ range(10**30) | list }}", ("range", "10000")),
    ("macro-recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ("RecursionError",)),
    ("raise-exception", "{{ raise_exception('no system role') }}", ("no system role",)),
    ("sandbox-append", "{{ messages.append(1) }}", ("SecurityError",)),
    ("sandbox-dunder", "{{ ''.__class__.__mro__[1].__subclasses__()[0]('x') }}", ()),
    ("undefined-attribute", "{{ nothing.there.at_all }}", ("UndefinedError",)),
    ("division-by-zero", "{{ 1 / 0 }}", ("ZeroDivisionError",)),
    ("type-error", "{{ 1 + 'a' }}", ("TypeError",)),
    ("overflow", "{{ (1e308 * 10) | int }}", ("OverflowError",)),
    ("syntax-error", "{% for %}", ("invalid Jinja",)),
    ("parens-nested-10000", "{{ " + "(" * 10000 + "1" + ")" * 10000 + " }}", ("nested",)),
    ("source-1MB", "x" * (1 << 20), ("characters",)),
    ("slow-c-ops", "{% for i in range(100000) %}{{ ('a' * 400000) | length }}{% endfor %}",
     ("refused: ", "more than")),  # seconds or steps, whichever comes first on this machine
    ("big-list-sort", "{{ ('a' * 4000000) | list | sort | join }}", ("4194304",)),
]:
    case("requests", f"template-{_label}", "ChatTemplateError", "test template", *_names)(
        lambda ctx, t=_template: ctx.render(t))


@case("requests", "template-not-a-string", "ModelFileError", "test template")
def _(ctx):
    return ctx.templated(12345)


@case("requests", "template-trips-sandbox-through-the-engine", "ChatTemplateError", "tokenizer.chat_template",
      "SecurityError")
def _(ctx):
    eng = ctx.new_engine(model=ctx.load(_meta(ctx, "tokenizer.chat_template", W.STRING, "{{ messages.append(1) }}")))
    return eng.add_request("hi", chat=True)


@case("requests", "template-real-chatml-still-renders", None,
      check=lambda text: None if text.startswith("<|im_start|>user\nhi") else f"rendered {text!r}")
def _(ctx):
    from checkpoints import CHATML_TEMPLATE

    return ctx.render(CHATML_TEMPLATE)


# ---------------------------------------------------------------------------------------------------------
# Prompts and token ids (the worker's engine: context 256)

_10MB = 10 * 2**20
for _label, _make in [
    ("10MB-words", lambda: "hello world " * (_10MB // 12)),
    ("10MB-one-word", lambda: "a" * _10MB),
    ("10MB-digits", lambda: "1" * _10MB),
    ("10MB-spaces", lambda: " " * _10MB),
    ("10MB-punctuation", lambda: "!?" * (_10MB // 2)),
    ("10MB-special-tokens", lambda: "<|im_start|>" * (_10MB // 12)),
]:
    case("requests", f"prompt-{_label}", "ValueError", "prompt", "context of 256")(
        lambda ctx, m=_make: ctx.engine.add_request(m(), max_new_tokens=1))
    case("requests", f"prompt-{_label}-llm-generate", "ValueError", "prompt", "context of 256")(
        lambda ctx, m=_make: ctx.extra["llm"].generate(m(), max_new_tokens=1))


@case("requests", "prompt-10MB-chat", "ValueError", "messages[0]['content']", "4194304")
def _(ctx):
    return ctx.engine.add_request("hello world " * (_10MB // 12), chat=True, max_new_tokens=1)


def _with_normalizer(ctx, normalizer):
    """The engine's tokenizer, copied, with `normalizer` in place of its own."""
    from tokenizers import Tokenizer as Backend

    from trinfer.runtime.tokenizer import Tokenizer

    backend = Backend.from_str(ctx.loaded.tokenizer.backend.to_str())
    backend.normalizer = normalizer
    return Tokenizer(backend)


def _more_than_254(n):
    return None if isinstance(n, int) and n > 254 else f"exceeds() gave {n!r}, expected a count > 254"


@case("requests", "tokenizer-exceeds-by-words-with-a-normalizer", None, check=_more_than_254)
def _(ctx):
    from tokenizers import normalizers as N

    tok = _with_normalizer(ctx, N.Strip())  # may delete text: no characters-per-token bound, the word bound must do
    assert tok.max_chars_per_token is None
    return tok.exceeds("hello world " * (_10MB // 12), 254)


@case("requests", "tokenizer-exceeds-megaword-llama2-normalizer", None, check=_more_than_254)
def _(ctx):
    from tokenizers import normalizers as N

    # Llama 2 / Mistral tokenizer.json: never shortens text, so the text's own length bounds the tokens
    return _with_normalizer(ctx, N.Sequence([N.Prepend("\u2581"), N.Replace(" ", "\u2581")])).exceeds("a" * _10MB, 254)


@case("requests", "tokenizer-exceeds-megaword-nfc", None, check=_more_than_254)
def _(ctx):
    from tokenizers import normalizers as N

    # may compose characters: the normalized text is measured (linear)
    return _with_normalizer(ctx, N.NFC()).exceeds("a" * _10MB, 254)


@case("requests", "prompt-10M-token-ids", "ValueError", "prompt", "context of 256")
def _(ctx):
    return ctx.engine.add_request(np.ones(10_000_000, dtype=np.int64), max_new_tokens=1)


@case("requests", "prompt-lone-surrogate", "ValueError", "prompt", "surrogate")
def _(ctx):
    return ctx.engine.add_request("hi \udcff there", max_new_tokens=1)


@case("requests", "prompt-lone-surrogate-chat", "ValueError", "prompt", "surrogate")
def _(ctx):
    return ctx.engine.add_request("hi \ud800", chat=True, max_new_tokens=1)


@case("requests", "prompt-lone-surrogate-in-a-message", "ValueError", "messages[0]", "surrogate")
def _(ctx):
    return ctx.engine.add_request([{"role": "user", "content": "x\udfff"}], chat=True, max_new_tokens=1)


@case("requests", "prompt-bytes", "TypeError", "prompt")
def _(ctx):
    return ctx.engine.add_request(b"hello", max_new_tokens=1)


@case("requests", "prompt-float-ids", "TypeError", "prompt")
def _(ctx):
    return ctx.engine.add_request([1.0, 2.0], max_new_tokens=1)


@case("requests", "prompt-bool-ids", "TypeError", "prompt")
def _(ctx):
    return ctx.engine.add_request([True, False], max_new_tokens=1)


@case("requests", "prompt-2d-array", "ValueError", "prompt", "1-D")
def _(ctx):
    return ctx.engine.add_request(np.ones((2, 3), dtype=np.int64), max_new_tokens=1)


# The boundaries, worked by hand (context 256, vocabulary 512): 255 prompt ids fit and leave exactly one token to
# generate (finish "context"), 256 do not; id 511 is the last of the vocabulary, 512 is outside it.
@case("requests", "prompt-ids-filling-the-context", "ValueError", "prompt: 256 tokens do not fit the context of 256")
def _(ctx):
    return ctx.engine.add_request([5] * 256, max_new_tokens=1)


@case("requests", "prompt-ids-one-under-the-context", None,
      check=lambda out: None if (len(out.token_ids), out.finish_reason) == (1, "context")
      else f"{len(out.token_ids)} tokens, finish {out.finish_reason!r} (expected 1, 'context')")
def _(ctx):
    return ctx.extra["llm"].generate([[5] * 255], max_new_tokens=10, ignore_eos=True)[0]


@case("requests", "prompt-id-equal-to-the-vocabulary-size", "ValueError", "token id 512 at position 1",
      "outside the vocabulary")
def _(ctx):
    return ctx.engine.add_request([5, 512], max_new_tokens=1)


@case("requests", "prompt-id-last-of-the-vocabulary", None,
      check=lambda out: None if len(out.token_ids) == 2 else f"{out.token_ids} (expected 2 tokens)")
def _(ctx):
    return ctx.extra["llm"].generate([[5, 511]], max_new_tokens=2, ignore_eos=True)[0]


def _same_as_list(ctx: Ctx, prompt) -> str | None:
    want = ctx.extra["llm"].generate([[5, 6, 7]], max_new_tokens=3, ignore_eos=True)[0].token_ids
    got = ctx.extra["llm"].generate(prompt, max_new_tokens=3, ignore_eos=True)
    return [o.token_ids for o in got], want


def _all_equal(result) -> str | None:
    outs, want = result
    return None if outs and all(o == want for o in outs) else f"got {outs}, expected each {want}"


for _label, _make in [
    ("numpy-int64-list", lambda: [np.int64(5), np.int64(6), np.int64(7)]),
    ("numpy-int32-array", lambda: np.array([5, 6, 7], dtype=np.int32)),
    ("numpy-2d-array", lambda: np.array([[5, 6, 7], [5, 6, 7]])),
    ("torch-tensor", lambda: __import__("torch").tensor([5, 6, 7])),
    ("tuple", lambda: (5, 6, 7)),
    ("list-of-numpy-arrays", lambda: [np.array([5, 6, 7]), np.array([5, 6, 7])]),
]:
    case("requests", f"llm-generate-{_label}", None, check=_all_equal)(
        lambda ctx, m=_make: _same_as_list(ctx, m()))


# Engine arguments (over the loaded base model)

for _label, _kwargs, _names in [
    ("kv_cache_memory-inf", dict(kv_cache_memory=float("inf"), num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-nan", dict(kv_cache_memory=float("nan"), num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-string", dict(kv_cache_memory="1e6", num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-negative", dict(kv_cache_memory=-1, num_kv_blocks=None), ("kv_cache_memory",)),
    ("kv_cache_memory-1e18", dict(kv_cache_memory=1e18, num_kv_blocks=None), ("kv_cache_memory",)),
    ("max_model_len-string", dict(max_model_len="64"), ("max_model_len",)),
    ("max_model_len-float", dict(max_model_len=64.0), ("max_model_len",)),
    ("max_model_len-bool", dict(max_model_len=True), ("max_model_len",)),
    ("max_model_len-10**9", dict(max_model_len=10**9), ("max_model_len",)),
    ("max_num_seqs-string", dict(max_num_seqs="8"), ("max_num_seqs",)),
    ("max_num_seqs-zero", dict(max_num_seqs=0), ("max_num_seqs",)),
    ("num_kv_blocks-10**9", dict(num_kv_blocks=10**9), ("num_kv_blocks",)),
    ("num_kv_blocks-float", dict(num_kv_blocks=8.0), ("num_kv_blocks",)),
    ("max_num_batched_tokens-zero", dict(max_num_batched_tokens=0), ("max_num_batched_tokens",)),
    ("block_size-3", dict(block_size=3), ("block_size",)),
]:
    case("requests", f"engine-{_label}", "ValueError", *_names)(lambda ctx, kw=_kwargs: ctx.new_engine(**kw))


@case("requests", "engine-max_num_seqs-10**7", None,
      check=lambda n: None if n <= 64 else f"decode buffers for {n} sequences (expected at most the 64 blocks)")
def _(ctx):
    return ctx.new_engine(max_num_seqs=10**7).runner.decode_buffers.max_num_seqs
