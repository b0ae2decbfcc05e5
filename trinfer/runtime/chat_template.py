"""Chat templates: Jinja compiled in an immutable sandbox and rendered within bounds on work, time and size.

Chat templates come with downloaded models: they are code written by strangers. jinja2's
ImmutableSandboxedEnvironment already denies attribute, module and file access and changes to the inputs;
rendering here is also bounded, so that a template can neither run for ever nor allocate gigabytes:

- work: at most `max_steps` steps (lines of the compiled template executed, plus Python calls made while
  rendering: filters, macros, generators), counted by a trace function (`sys.settrace`) installed for the
  render only, and at most `max_seconds` of wall time, checked at each step;
- size: no value the template makes (with an operator, `~`, a filter, a method call, or `{{ }}` output,
  buffered output included) may exceed `max_chars` characters or items, and the total of all output,
  buffered or not, may not exceed `max_total_chars`. Where an operation could make a large value in one
  go (`*`, `**`, `%` and str.format widths, join, replace, indent, wordwrap, center...), its size is
  predicted and refused before it is made; every value an operation takes is measured first, so a value
  too large to pass is never converted, joined or printed. Integer arguments of calls and filters are at
  most `max_chars`; tojson's indent is at most 16.

Any failure (a sandbox violation, an undefined name used wrongly, a limit, raise_exception(), a Python
error inside the template) is a `ChatTemplateError` (a ValueError) naming the template's origin (the file
and key it came from) and what went wrong, in one line. A trace function set by a debugger or coverage
tool is suspended during rendering and restored afterwards.

    template = ChatTemplate(source, origin="tokenizer_config.json: chat_template")
    text = template.render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
"""
from __future__ import annotations

import functools
import inspect
import json
import re
import string
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["ChatTemplate", "ChatTemplateError", "TemplateLimits"]

_TEMPLATE_FILENAME = "<template>"  # jinja2's code filename for templates compiled from strings
_MAX_TOJSON_INDENT = 16
_MAX_INT_BITS = 1 << 16


@dataclass(frozen=True, slots=True)
class TemplateLimits:
    """Bounds on one render (see the module docstring). A real chat template stays far below all of them."""

    max_steps: int = 1_000_000           # template lines executed + Python calls made
    max_seconds: float = 1.0             # wall time of one render
    max_chars: int = 1 << 22             # characters (or items) of any one value, and of the rendered text
    max_total_chars: int = 1 << 24       # characters emitted in all, buffered output (set blocks, macros) included
    max_source_chars: int = 256 << 10    # the template's own source


class ChatTemplateError(ValueError):
    """A chat template that does not compile, breaks the sandbox or a limit, or fails while rendering.

    origin: where the template came from (file and key); str(error) is one line naming it.
    """

    def __init__(self, origin: str, message: str) -> None:
        self.origin = origin
        text = " ".join(str(message).split())
        super().__init__(f"chat template ({origin}): {text if len(text) <= 400 else text[:400] + '...'}")


class _Exceeded(BaseException):
    """A limit was hit. A BaseException, so that no `except Exception` in the rendering path swallows it."""


def _size(value: Any, limit: int) -> int:
    """Characters (strings) plus items (containers, recursively) of `value`; stops counting past `limit`."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 0
    total, stack, seen = 0, [value], set()
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += len(v)
            if id(v) not in seen:
                seen.add(id(v))
                stack.extend(v)
        elif isinstance(v, dict):
            total += len(v)
            if id(v) not in seen:
                seen.add(id(v))
                stack.extend(v.keys())
                stack.extend(v.values())
        if total > limit:
            return total
    return total


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\d*)(?:\.(\d*))?")
_DIGITS = re.compile(r"\d+")


class _Render(threading.local):
    """Per-thread state of the render in progress (steps, deadline, characters emitted)."""

    active = False
    steps = 0
    deadline = 0.0
    emitted = 0


def _make_environment(limits: TemplateLimits):
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.ext import loopcontrols
    from jinja2.runtime import markup_join, str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generator(CodeGenerator):
        """Routes `{{ }}` output and `~` through the environment's size checks."""

        def _output_child_pre(self, node, frame, finalize) -> None:
            super()._output_child_pre(node, frame, finalize)
            self.write("environment.emitted_value(")

        def _output_child_post(self, node, frame, finalize) -> None:
            self.write(")")
            super()._output_child_post(node, frame, finalize)

        def visit_Concat(self, node, frame) -> None:
            # What jinja2 writes (markup_join when autoescaping, else str_join), behind the size checks.
            markup = ("context.eval_ctx.autoescape" if frame.eval_ctx.volatile
                      else "True" if frame.eval_ctx.autoescape else "False")
            self.write("environment.bounded_concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write(f"), {markup})")

    class _Environment(ImmutableSandboxedEnvironment):
        code_generator_class = _Generator
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def __init__(self) -> None:
            super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                             undefined=jinja2.Undefined, autoescape=False)
            self.limits = limits
            self.render_state = _Render()
            self.globals.pop("lipsum", None)  # lipsum(n) makes n paragraphs: no template needs it
            self.globals["raise_exception"] = _raise_exception
            self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt))
            self.filters["tojson"] = _tojson
            self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

        # ---- size checks
        def check(self, what: str, value: Any) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                if value.bit_length() > _MAX_INT_BITS:
                    raise _Exceeded(f"{what} makes an integer of {value.bit_length()} bits (limit {_MAX_INT_BITS})")
                return value
            size = _size(value, self.limits.max_chars)
            if size > self.limits.max_chars:
                raise _Exceeded(f"{what} makes or takes a value of more than {self.limits.max_chars} characters "
                                "or items")
            return value

        def predict(self, what: str, size: int) -> None:
            if size > self.limits.max_chars:
                raise _Exceeded(f"{what} would make a value of {size} characters or items (limit "
                                f"{self.limits.max_chars})")

        def check_args(self, what: str, args, kwargs) -> None:
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and not isinstance(value, bool) and abs(value) > self.limits.max_chars:
                    raise _Exceeded(f"{what}: an integer argument of {value} is larger than the limit "
                                    f"{self.limits.max_chars}")
                self.check(what, value)

        def emitted_value(self, value: Any) -> Any:
            self.check("output", value)
            state = self.render_state
            state.emitted += _size(value, self.limits.max_chars) if not isinstance(value, (int, float)) else 24
            if state.emitted > self.limits.max_total_chars:
                raise _Exceeded(f"the template emits more than {self.limits.max_total_chars} characters")
            return value

        def bounded_concat(self, values, markup: bool) -> str:
            for v in values:
                self.check("'~'", v)
            self.predict("'~'", sum(_size(v, self.limits.max_chars) if not isinstance(v, (int, float)) else 24
                                    for v in values))
            return self.check("'~'", markup_join(values) if markup else str_join(values))

        # ---- operators, calls, str.format
        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            what = f"'{operator}'"
            self.check(what, left)
            self.check(what, right)
            limit = self.limits.max_chars
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(n, int) and not isinstance(n, bool) and isinstance(seq, (str, list, tuple)):
                        self.predict(what, max(n, 0) * max(_size(seq, limit), 1))
                if all(isinstance(v, int) for v in (left, right)):
                    if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                        raise _Exceeded(f"{what} would make an integer of more than {_MAX_INT_BITS} bits")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                    if right * left.bit_length() > _MAX_INT_BITS:
                        raise _Exceeded(f"{what} would make an integer of about {right * left.bit_length()} bits "
                                        f"(limit {_MAX_INT_BITS})")
            elif operator == "%" and isinstance(left, str):
                self._check_percent_widths(what, left)
                self.predict(what, len(left) + _size(right, limit) + (len(right) if isinstance(right, tuple) else 0))
            elif operator == "+":
                self.predict(what, _size(left, limit) + _size(right, limit))
            return self.check(what, super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            what = f"calling {getattr(__obj, '__name__', type(__obj).__name__)}"
            __self.check_args(what, args, kwargs)
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                __self._predict_str_method(what, owner, getattr(__obj, "__name__", ""), args, kwargs)
            return __self.check(what, super().call(__context, __obj, *args, **kwargs))

        def wrap_str_format(self, value: Any):
            wrapper = super().wrap_str_format(value)  # str.format / format_map, sandboxed by jinja2
            if wrapper is None:
                return None
            fmt, env = value.__self__, self

            @functools.wraps(wrapper)
            def bounded(*args, **kwargs):
                for _literal, _field, spec, _conversion in string.Formatter().parse(fmt):
                    for digits in _DIGITS.findall(spec or ""):
                        if len(digits) > 7 or int(digits) > env.limits.max_chars:
                            raise _Exceeded(f"str.format: a width of {digits[:12]} is larger than the limit "
                                            f"{env.limits.max_chars}")
                env.check_args("str.format", args, kwargs)
                return env.check("str.format", wrapper(*args, **kwargs))

            return bounded

        def _check_percent_widths(self, what: str, fmt: str) -> None:
            for width, precision in _PERCENT_SPEC.findall(fmt):
                for digits in (width, precision):
                    if digits and (len(digits) > 7 or int(digits) > self.limits.max_chars):
                        raise _Exceeded(f"{what}: a width of {digits[:12]} is larger than the limit "
                                        f"{self.limits.max_chars}")

        def _predict_str_method(self, what: str, s: str, name: str, args, kwargs) -> None:
            limit = self.limits.max_chars
            if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                old, new = args[0], args[1]
                count = s.count(old) if old else len(s) + 1
                if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                    count = min(count, args[2])
                self.predict(what, len(s) + count * max(len(new) - len(old), 0))
            elif name == "join" and args:
                items = args[0]
                if isinstance(items, (list, tuple)):
                    self.predict(what, _size(items, limit) + len(s) * len(items))
            elif name == "expandtabs":
                tab = args[0] if args else kwargs.get("tabsize", 8)
                if isinstance(tab, int):
                    self.predict(what, len(s) + s.count("\t") * max(tab, 0))
            elif name in ("format", "format_map"):
                pass  # handled by format_string

        def _bounded_filter(self, name: str, f):
            try:
                signature = inspect.signature(f)
            except (TypeError, ValueError):
                signature = None
            env = self

            @functools.wraps(f)
            def bounded(*args, **kwargs):
                what = f"filter '{name}'"
                env.check_args(what, args, kwargs)
                if signature is not None:
                    try:
                        bound = signature.bind(*args, **kwargs)
                    except TypeError:
                        bound = None  # the filter's own call reports the wrong arguments
                    if bound is not None:
                        env._predict_filter(what, name, bound.arguments)
                return env.check(what, f(*args, **kwargs))

            return bounded

        def _predict_filter(self, what: str, name: str, a: dict) -> None:
            limit = self.limits.max_chars
            if name == "join":
                value = a.get("value")
                if isinstance(value, (list, tuple)):
                    self.predict(what, _size(value, limit) + len(value) * len(str(a.get("d", ""))))
            elif name == "replace":
                s, old, new = a.get("s"), a.get("old"), a.get("new")
                if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
                    count = s.count(old) if old else len(s) + 1
                    self.predict(what, len(s) + count * max(len(new) - len(old), 0))
            elif name == "indent":
                s, width = a.get("s"), a.get("width", 4)
                if isinstance(s, str):
                    pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
                    self.predict(what, len(s) + (s.count("\n") + 1) * max(pad, 0))
            elif name == "wordwrap":
                s, wrap = a.get("s"), a.get("wrapstring")
                if isinstance(s, str):
                    self.predict(what, len(s) * (1 + len(wrap if isinstance(wrap, str) else "\n")))
            elif name == "format":
                if isinstance(a.get("value"), str):
                    self._check_percent_widths(what, a["value"])
            elif name == "sum":
                value = a.get("iterable")
                if isinstance(value, (list, tuple)):
                    self.predict(what, _size(value, limit))

    return _Environment()


def _raise_exception(message: Any):
    raise _TemplateRaised(str(message))


class _TemplateRaised(Exception):
    """raise_exception() called by the template: its message is the whole error."""


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and (not isinstance(indent, (int, str)) or isinstance(indent, bool)
                               or (isinstance(indent, int) and not 0 <= indent <= _MAX_TOJSON_INDENT)
                               or (isinstance(indent, str) and len(indent) > _MAX_TOJSON_INDENT)):
        raise _Exceeded(f"tojson: indent {str(indent)[:20]!r} is not an int in 0..{_MAX_TOJSON_INDENT}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Tracer:
    """sys.settrace hook counting steps against the render's budget."""

    def __init__(self, state: _Render, limits: TemplateLimits, max_steps: int) -> None:
        self.state = state
        self.limits = limits
        self.max_steps = max_steps

    def step(self) -> None:
        state = self.state
        state.steps += 1
        if state.steps > self.max_steps:
            raise _Exceeded(f"more than {self.max_steps} steps (loops too long?)")
        if state.steps & 255 == 0 and time.perf_counter() > state.deadline:
            raise _Exceeded(f"rendering took more than {self.limits.max_seconds} s")

    def global_trace(self, frame, event, arg):
        self.step()
        return self.local_trace if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    def local_trace(self, frame, event, arg):
        if event == "line":
            self.step()
        return self.local_trace


class ChatTemplate:
    """A compiled chat template (see the module docstring). Raises ChatTemplateError when the source is
    not a string, too long, or not valid Jinja; compiling runs within the same bounds as rendering (jinja2
    evaluates constant expressions, filters included, while it compiles)."""

    _COMPILE_STEPS_FACTOR = 10  # compiling a template takes more Python calls than rendering it

    def __init__(self, source: Any, *, origin: str, limits: TemplateLimits | None = None) -> None:
        self.origin = origin
        self.limits = limits or TemplateLimits()
        if not isinstance(source, str):
            raise ChatTemplateError(origin, f"expected the template as a string, got {type(source).__name__}")
        if len(source) > self.limits.max_source_chars:
            raise ChatTemplateError(origin, f"{len(source)} characters, more than the limit of "
                                    f"{self.limits.max_source_chars}")
        import jinja2

        self._env = _make_environment(self.limits)
        try:
            self._template = self._bounded(lambda: self._env.from_string(source),
                                           self.limits.max_steps * self._COMPILE_STEPS_FACTOR)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(origin, f"invalid Jinja at line {exc.lineno}: {exc.message}") from None
        except RecursionError:
            raise ChatTemplateError(origin, "invalid Jinja: expressions nested too deeply") from None
        except ChatTemplateError:
            raise
        except Exception as exc:  # any other compile failure is the template's
            raise ChatTemplateError(origin, f"invalid Jinja: {type(exc).__name__}: {exc}") from None

    def render(self, **variables: Any) -> str:
        """The rendered text; ChatTemplateError for any failure or limit (see the module docstring)."""
        def run() -> str:
            pieces: list[str] = []
            length = 0
            for piece in self._template.generate(**variables):
                length += len(piece)
                if length > self.limits.max_chars:
                    raise _Exceeded(f"the rendered text is longer than {self.limits.max_chars} characters")
                pieces.append(piece)
            return "".join(pieces)

        try:
            return self._bounded(run, self.limits.max_steps)
        except ChatTemplateError:
            raise
        except Exception as exc:  # sandbox violations, undefined names, errors of the template's own making
            raise ChatTemplateError(self.origin, f"rendering failed: {type(exc).__name__}: {exc}") from None

    def _bounded(self, fn, max_steps: int):
        """fn() under the step/time tracer and with the size checks armed; limits become ChatTemplateError."""
        state = self._env.render_state
        if state.active:
            raise ChatTemplateError(self.origin, "rendering called from within its own rendering")
        state.active, state.steps, state.emitted = True, 0, 0
        state.deadline = time.perf_counter() + self.limits.max_seconds
        tracer = _Tracer(state, self.limits, max_steps)
        previous = sys.gettrace()
        sys.settrace(tracer.global_trace)
        try:
            return fn()
        except _Exceeded as exc:
            raise ChatTemplateError(self.origin, f"refused: {exc}") from None
        except _TemplateRaised as exc:
            raise ChatTemplateError(self.origin, f"raised: {exc}") from None
        finally:
            sys.settrace(previous)
            state.active = False
