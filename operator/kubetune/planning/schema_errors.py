"""Turn pydantic's errors into one sentence a user can act on, with the field's dotted path.

pydantic says "Input should be greater than 0"; a user wants "must be greater than 0 (got
-1)" next to `spec.automodel.batch.micro_batch_size`. Errors from the models' own
validators keep their text (without pydantic's "Value error, " prefix).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic_core import ErrorDetails

from kubetune.planning.unknown_fields import unknown_field_message

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_./-]+")

_TYPE_NAMES = {
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "int_parsing": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "model_type": "a mapping (an object with fields)",
    "model_attributes_type": "a mapping (an object with fields)",
    "dict_type": "a mapping",
    "list_type": "a list",
}

_BOUNDS = {
    "greater_than": ("greater than", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("at most", "le"),
}

# Enum values a user reaches for on the wrong backend, and where that feature lives.
_ENUM_HINTS: dict[tuple[str, Any], str] = {
    (
        "unsloth.training.training_type",
        "distillation",
    ): "unsloth supports only sft; use the automodel backend for distillation",
    ("unsloth.training.finetuning_type", "lora_merged"): "for a merged result use finetuning_type: lora with "
    "output.save_method: merged_16bit",
}


def dotted(loc: Sequence[int | str], prefix: str = "") -> str:
    """`("automodel", "batch", "global_batch_size")` -> `spec.automodel.batch.global_batch_size`.

    A key that is not a plain name (an unknown key with spaces, quotes or a line break in it)
    is written quoted, `spec.automodel["a b"]`, so a path stays one readable line.
    """
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not _PLAIN_KEY.fullmatch(part):
            path += f"[{quoted(part)}]"
        else:
            path = f"{path}.{part}" if path else part
    return path


def quoted(key: str) -> str:
    """A key in double quotes, with quotes, backslashes and unprintable characters (line
    breaks of any kind) escaped as JSON does; other unicode is kept readable."""
    return '"' + "".join(ch if ch.isprintable() and ch not in '"\\' else json.dumps(ch)[1:-1] for ch in key) + '"'


def describe(error: ErrorDetails, section_path: str, siblings: list[str]) -> str:
    """One sentence for one pydantic error. `section_path` is the path within the backend section."""
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    if kind == "extra_forbidden":
        raw_key = str(error["loc"][-1]) if error["loc"] else ""
        key = raw_key if _PLAIN_KEY.fullmatch(raw_key) else quoted(raw_key)
        backend, _, within = section_path.partition(".")
        return unknown_field_message(backend or None, within, key, siblings)
    if kind == "missing":
        return "is required"
    if kind in ("literal_error", "enum"):
        # The input may be any JSON value, a list or a mapping among them (not hashable).
        hint = _ENUM_HINTS.get((section_path, value)) if isinstance(value, str) else None
        message = f"must be one of {ctx.get('expected', '')}; got {_show(value)}"
        return f"{message}: {hint}" if hint else message
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        return f"must be {words} {ctx.get(key)}; got {_show(value)}"
    if kind in _TYPE_NAMES:
        message = f"must be {_TYPE_NAMES[kind]}; got {_show(value)}"
        if kind in ("float_type", "int_type") and isinstance(value, str):
            message += " (a quoted string: remove the quotes)"
        if section_path == "automodel.model" and isinstance(value, dict):
            message += "; automodel takes `model: name`, `model: {name: ...}` is the unsloth form"
        if section_path == "unsloth.model" and isinstance(value, str):
            message += "; unsloth takes `model: {name: ...}`"
        return message
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} items"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    if kind == "string_pattern_mismatch":
        return f"{_show(value)} does not match the pattern {ctx.get('pattern')}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return f"{error['msg']}; got {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
