"""Typed reads of fields from model files (config.json, GGUF metadata, tokenizer files): a wrong type is an error.

Model files come from anywhere. A field of the wrong type must never be coerced into something plausible
(`bool("false")` is True), nor crash later with a TypeError that names nothing. Each reader here takes the
mapping, the key and the file (for the message) and returns the value only if it has the expected type
and range; otherwise it raises `ModelFileError` naming the file, the key, what was expected and what was
found (a long value is shortened in the message).

    n = get_int(config, "num_hidden_layers", source="config.json", minimum=1)
    tied = get_bool(config, "tie_word_embeddings", source="config.json", default=False)

JSON types map as: a bool is a JSON `true`/`false` (GGUF BOOL), an int a JSON integer (GGUF integer
types; never a bool, never a float such as 2048.0), a number an int or a float, finite; a string a string;
a list a list. `None`/`null` is "absent": readers return `default` for it (or refuse it when required).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

__all__ = ["ModelFileError", "REQUIRED", "short_repr", "get_bool", "get_int", "get_number", "get_str",
           "get_list", "get_mapping", "type_name", "read_json_object", "MAX_JSON_BYTES"]

REQUIRED = object()  # `default=REQUIRED`: the key must be present (and not null)

_REPR_CHARS = 120


class ModelFileError(ValueError):
    """A model file is malformed or asks for something trinfer does not run.

    file: the file (or directory) at fault; key: the field or tensor within it (None when the whole file is
    at fault). str(error) is one line: "FILE: KEY: what was expected, what was found".
    """

    def __init__(self, file: str, key: str | None, message: str) -> None:
        self.file = file
        self.key = key
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {message}")


def short_repr(value: Any, limit: int = _REPR_CHARS) -> str:
    """repr(value), cut to `limit` characters (values from files can be megabytes long).

    Long containers are not repr'd whole: only their first items are looked at.
    """
    if isinstance(value, (list, tuple)) and len(value) > 8:
        head = ", ".join(short_repr(v, limit) for v in value[:4])
        text = f"[{head}, ... ({len(value)} items)]"
    elif isinstance(value, str) and len(value) > limit:
        text = repr(value[:limit]) + f"... ({len(value)} characters)"
    elif isinstance(value, Mapping) and len(value) > 8:
        text = f"{{... ({len(value)} keys)}}"
    else:
        text = repr(value)
    return text if len(text) <= limit + 40 else text[:limit] + "..."


def type_name(value: Any) -> str:
    """The JSON-ish name of a value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _fail(source: str, key: str, expected: str, value: Any) -> ModelFileError:
    return ModelFileError(source, key, f"expected {expected}, got {type_name(value)} {short_repr(value)}")


def _lookup(mapping: Mapping[str, Any], key: str, source: str, default: Any) -> tuple[bool, Any]:
    """(present, value); raise when a required key is missing or null."""
    value = mapping.get(key)
    if value is None:
        if default is REQUIRED:
            raise ModelFileError(source, key, "missing (required)")
        return False, default
    return True, value


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (not isinstance(value, float) or math.isfinite(value)))


def get_bool(mapping: Mapping[str, Any], key: str, *, source: str, default: Any = REQUIRED) -> Any:
    present, value = _lookup(mapping, key, source, default)
    if present and not isinstance(value, bool):
        raise _fail(source, key, "a bool (true/false)", value)
    return value


def get_int(mapping: Mapping[str, Any], key: str, *, source: str, default: Any = REQUIRED,
            minimum: int | None = None, maximum: int | None = None) -> Any:
    present, value = _lookup(mapping, key, source, default)
    if not present:
        return value
    if not is_int(value):
        raise _fail(source, key, "an int", value)
    _check_range(source, key, value, minimum, maximum, "an int")
    return value


def get_number(mapping: Mapping[str, Any], key: str, *, source: str, default: Any = REQUIRED,
               minimum: float | None = None, maximum: float | None = None, positive: bool = False) -> Any:
    """A finite int or float, returned as float (bools and strings refused)."""
    present, value = _lookup(mapping, key, source, default)
    if not present:
        return value
    if not is_number(value):
        raise _fail(source, key, "a finite number", value)
    if positive and not value > 0:
        raise _fail(source, key, "a number > 0", value)
    _check_range(source, key, value, minimum, maximum, "a number")
    return float(value)


def get_str(mapping: Mapping[str, Any], key: str, *, source: str, default: Any = REQUIRED,
            choices: tuple[str, ...] | None = None) -> Any:
    present, value = _lookup(mapping, key, source, default)
    if not present:
        return value
    if not isinstance(value, str):
        raise _fail(source, key, "a string", value)
    if choices is not None and value not in choices:
        raise ModelFileError(source, key, f"expected one of {list(choices)}, got {short_repr(value)}")
    return value


def get_list(mapping: Mapping[str, Any], key: str, *, source: str, default: Any = REQUIRED,
             item: Callable[[Any], bool] | None = None, item_name: str = "", max_len: int | None = None) -> Any:
    """A list (tuples accepted) whose items all pass `item` (described by item_name, e.g. "strings")."""
    present, value = _lookup(mapping, key, source, default)
    if not present:
        return value
    if not isinstance(value, (list, tuple)):
        raise _fail(source, key, f"a list of {item_name}" if item_name else "a list", value)
    if max_len is not None and len(value) > max_len:
        raise ModelFileError(source, key, f"expected at most {max_len} items, got {len(value)}")
    if item is not None:
        for index, v in enumerate(value):
            if not item(v):
                raise ModelFileError(source, f"{key}[{index}]",
                                     f"expected {item_name[:-1] if item_name.endswith('s') else item_name}, "
                                     f"got {type_name(v)} {short_repr(v)}")
    return value


def get_mapping(mapping: Mapping[str, Any], key: str, *, source: str, default: Any = REQUIRED) -> Any:
    present, value = _lookup(mapping, key, source, default)
    if present and not isinstance(value, Mapping):
        raise _fail(source, key, "an object", value)
    return value


def _check_range(source: str, key: str, value, minimum, maximum, what: str) -> None:
    if minimum is not None and value < minimum:
        raise ModelFileError(source, key, f"expected {what} >= {minimum}, got {short_repr(value)}")
    if maximum is not None and value > maximum:
        raise ModelFileError(source, key, f"expected {what} <= {maximum}, got {short_repr(value)}")


MAX_JSON_BYTES = 64 << 20  # config.json, generation_config.json, the index: no real one comes near


class DuplicateKeyError(ValueError):
    """A JSON object with the same key twice (json.load keeps the last, other readers may keep the first)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        raise DuplicateKeyError(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def read_json_object(path: str, what: str | None = None) -> dict:
    """A JSON file that must hold an object; ModelFileError naming the file for anything else.

    Refuses files over MAX_JSON_BYTES and nesting too deep for Python's parser, before either costs much, and an
    object with a key given twice (naming the key): json keeps the last, other tools may keep the first.
    what: the file's role, for the FileNotFoundError when it is missing (None: the caller checked).
    """
    if what is not None and not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.dirname(path) or '.'}: missing {what} ({os.path.basename(path)})")
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ModelFileError(path, None, f"{size} bytes, more than the {MAX_JSON_BYTES >> 20} MiB a JSON file of "
                             "a model may have")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_refuse_duplicate_keys)
    except DuplicateKeyError as exc:
        raise ModelFileError(path, exc.key[:80], "given twice in one object (which one counts is up to the reader: "
                             "refused)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(path, None, f"not valid JSON ({exc})") from exc
    except RecursionError:
        raise ModelFileError(path, None, "not valid JSON for a model file (arrays or objects nested too deeply)") \
            from None
    if not isinstance(data, dict):
        raise ModelFileError(path, None, f"expected a JSON object, got {type(data).__name__}")
    return data
