"""The command line, in-process: one line and exit status 2 for each user mistake (`trinfer.cli.main`)."""
from __future__ import annotations

import os

from . import gguf_writer as W
from .core import CASES, Case, Ctx, case
from .gguf_cases import _meta, _tensor
from .request_cases import _10MB


def _cli(ctx: Ctx, argv: list[str], stdin: bytes | None = None) -> dict:
    """Run `trinfer` in this process: {"rc", "err", "out"}."""
    import contextlib
    import io
    import sys

    from trinfer.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        sys.stdin = saved
    return {"rc": rc, "err": err.getvalue(), "out": out.getvalue()}


def cli_refused(*names: str):
    """check for a CLI case: exit 2, one line "trinfer: error: ..." naming `names`, no traceback."""
    def check(result: dict) -> str | None:
        err = result["err"]
        lines = err.strip("\n").split("\n")
        if result["rc"] != 2:
            return f"exit status {result['rc']}, expected 2; stderr: {err[-500:]!r}"
        if len(lines) != 1 or not lines[0].startswith("trinfer: error: ") or "Traceback" in err:
            return f"expected one line 'trinfer: error: ...', got {err[-500:]!r}"
        missing = [n for n in names if n not in err]
        return f"stderr does not name {missing}: {err!r}" if missing else None
    return check


def _good_cli_args(ctx: Ctx, model: str) -> list[str]:
    return ["--model", model, "--max-new-tokens", "2", "--backend", "torch", "--dtype", "float32", "--device", "cpu",
            "--quiet", "--num-kv-blocks", "16"]


def _cli_case(name: str, *names: str):
    def register(fn):
        CASES.append(Case(name, "cli", fn, None, (), cli_refused(*names)))
        return fn
    return register


@_cli_case("cli-template-trips-sandbox", "tokenizer.chat_template", "SecurityError")
def _(ctx):
    model = _meta(ctx, "tokenizer.chat_template", W.STRING, "{{ messages.append(1) }}")
    return _cli(ctx, ["generate", "--chat", "hi", *_good_cli_args(ctx, model)])


for _label, _template, _what in [("undefined", "{{ a.b.c }}", "UndefinedError"),
                                 ("overflow", "{{ (1e308 * 10) | int }}", "OverflowError"),
                                 ("recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
                                 ("type-error", "{{ 1 + 'a' }}", "TypeError")]:
    _cli_case(f"cli-template-{_label}", "tokenizer.chat_template", _what)(
        lambda ctx, t=_template: _cli(ctx, ["generate", "--chat", "hi", *_good_cli_args(
            ctx, _meta(ctx, "tokenizer.chat_template", W.STRING, t))]))


@_cli_case("cli-template-not-a-string", "tokenizer.chat_template")
def _(ctx):
    model = _meta(ctx, "tokenizer.chat_template", W.U32, 7)
    return _cli(ctx, ["generate", "--chat", "hi", *_good_cli_args(ctx, model)])


@_cli_case("cli-prompt-invalid-utf8-argv", "prompt", "surrogate")
def _(ctx):
    # Python decodes argv with surrogateescape: the bytes b"\xff\xfe" arrive as "\udcff\udcfe".
    return _cli(ctx, ["generate", os.fsdecode(b"hi \xff\xfe"), *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))])


@_cli_case("cli-prompt-invalid-utf8-stdin", "stdin", "UTF-8")
def _(ctx):
    return _cli(ctx, ["generate", "-", *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))],
                stdin=b"hello \xff\xfe")


@_cli_case("cli-num-kv-blocks-10**9", "num_kv_blocks")
def _(ctx):
    args = _good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))
    args[args.index("--num-kv-blocks") + 1] = str(10**9)
    return _cli(ctx, ["generate", "hi", *args])


@_cli_case("cli-gguf-5000-nested-arrays", "x.nested")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, _meta(ctx, "x.nested", W.ARRAY, W.nested_array(5000)))])


@_cli_case("cli-config-100k-nested", "config.json")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, ctx.hf({"config.json": "[" * 100_000}))])


@_cli_case("cli-model-dev-zero", "/dev/zero")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, "/dev/zero")])


@_cli_case("cli-model-directory-named-gguf", "x.gguf")
def _(ctx):
    path = os.path.join(ctx.tmp, "cli", "x.gguf")
    os.makedirs(path, exist_ok=True)
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, path)])


@_cli_case("cli-gguf-tensor-zero-dims", "output_norm.weight")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, _tensor(ctx, "output_norm.weight", dims=()))])


@_cli_case("cli-gguf-dims-with-zero", "token_embd.weight")
def _(ctx):
    return _cli(ctx, ["generate", "hi", *_good_cli_args(ctx, _tensor(ctx, "token_embd.weight", dims=(32, 0)))])


@_cli_case("cli-prompt-10MB", "prompt", "context")
def _(ctx):
    return _cli(ctx, ["generate", "-", *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))],
                stdin=("hello world " * (_10MB // 12)).encode())


@case("cli", "cli-good-run", None,
      check=lambda r: None if r["rc"] == 0 and r["out"].strip() else f"exit {r['rc']}, stderr {r['err'][-300:]!r}")
def _(ctx):
    return _cli(ctx, ["generate", "The capital", *_good_cli_args(ctx, os.path.join(ctx.base, "base.gguf"))])
