"""Config values: parse command-line text and check YAML values against a field's annotation.

`convert_value` turns a string from the command line into the type a field declares,
or checks that a value read from YAML or a preset already has that type. It raises
`ValueMismatch` when the value does not fit, and `describe_expected` words what would.
`format_type` and `format_value` write types and values as `--help` shows them.
`read_yaml_file` reads a config file, also reading `6e-4` as a float.

Supported field types: int, float, bool, str, pathlib.Path, Any, `X | None`,
`Literal[...]`, `list[X]`, `tuple[X, ...]`, `tuple[X, Y]` and `dict[K, V]`, where
X is one of the scalar types.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

import yaml

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
NONE_WORDS = ("none", "null")


class ValueMismatch(Exception):
    """A value does not fit a type. The caller words the message."""


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_path_type(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, os.PathLike)


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        pass
    # int() rejects "1e3" and "2.0", which are whole numbers written as floats.
    number = float(text)
    if not number.is_integer():
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


def convert_value(value: Any, tp: Any, from_text: bool) -> Any:
    """Convert `value` to the annotation `tp`.

    Args:
        value: a string when `from_text`, otherwise a typed value from YAML or a preset.
        tp: the field's resolved annotation.
        from_text: parse a string (command line) instead of checking a typed value.

    Raises:
        ValueMismatch: the value does not fit `tp`.
        TypeError: `tp` is not a supported annotation.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any or tp is object:
        return value

    if _is_union(tp):
        if type(None) in args:
            if value is None or (from_text and value.strip().lower() in NONE_WORDS):
                return None
        for member in args:
            if member is type(None):
                continue
            try:
                return convert_value(value, member, from_text)
            except ValueMismatch:
                pass
        raise ValueMismatch

    if origin is Literal:
        for choice in args:
            if from_text and str(choice) == value.strip():
                return choice
            # type() comparison keeps True from matching a choice of 1.
            if not from_text and type(value) is type(choice) and value == choice:
                return choice
        raise ValueMismatch

    if tp in (list, tuple) or origin in (list, tuple):
        return _convert_sequence(value, tp, from_text)

    if tp is dict or origin is dict:
        if from_text:
            value = _load_yaml_text(value)
        if not isinstance(value, Mapping):
            raise ValueMismatch
        key_type, value_type = args if args else (Any, Any)
        return {convert_value(k, key_type, False): convert_value(v, value_type, False) for k, v in value.items()}

    if tp is bool:
        if from_text:
            word = value.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise ValueMismatch
        if isinstance(value, bool):
            return value
        raise ValueMismatch

    if tp is int:
        if from_text:
            try:
                return _parse_int(value.strip())
            except ValueError:
                raise ValueMismatch from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueMismatch

    if tp is float:
        if from_text:
            try:
                return float(value.strip())
            except ValueError:
                raise ValueMismatch from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueMismatch

    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueMismatch

    if _is_path_type(tp):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise ValueMismatch

    raise TypeError(f"unsupported field type {format_type(tp)}")


def _convert_sequence(value: Any, tp: Any, from_text: bool) -> list | tuple:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if from_text:
        items: list = [item.strip() for item in value.split(",")] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise ValueMismatch

    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise ValueMismatch
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(items)
    converted = [convert_value(item, item_type, from_text) for item, item_type in zip(items, item_types)]
    return tuple(converted) if origin is tuple else converted


def format_type(tp: Any) -> str:
    """Write an annotation as short text for help output, such as `int | None`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return " | ".join("None" if arg is type(None) else format_type(arg) for arg in args)
    if origin is Literal:
        return "{" + ",".join(str(arg) for arg in args) + "}"
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if arg is Ellipsis else format_type(arg) for arg in args)
        return f"{origin.__name__}[{inner}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def describe_expected(tp: Any) -> str:
    """Describe the values a type accepts, for error messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        parts = [describe_expected(arg) for arg in args if arg is not type(None)]
        if type(None) in args:
            parts.append("none")
        return " or ".join(parts)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"{len(args)} comma-separated values ({', '.join(format_type(arg) for arg in args)})"
    if tp in (list, tuple) or origin in (list, tuple):
        item = format_type(args[0]) if args else "value"
        return f"a comma-separated list of {item} values"
    if tp is dict or origin is dict:
        return "a mapping such as {a: 1, b: 2}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in names:
        return names[tp]
    if _is_path_type(tp):
        return "a path"
    return format_type(tp)


def format_value(value: Any) -> str:
    """Write a value as it would be typed on the command line (help output)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(item) for item in value)
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


# ---------------------------------------------------------------------------
# YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `6e-4` and `1e3` as floats.

    PyYAML follows YAML 1.1, whose float pattern needs a dot and a signed exponent,
    so `lr: 6e-4` would load as the string "6e-4".
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _load_yaml_text(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        raise ValueMismatch from None


def read_yaml_file(path: str | os.PathLike, problems: list[str]) -> Mapping | None:
    """Read a YAML mapping, appending a problem and returning None when that fails."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_Loader)
    except FileNotFoundError:
        problems.append(f"config file {str(path)!r} not found. Check the path.")
        return None
    except yaml.YAMLError as exc:
        problems.append(f"config file {str(path)!r} is not valid YAML: {exc}")
        return None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problems.append(
            f"config file {str(path)!r} must contain a mapping of field names to values, "
            f"but its top level is a {type(data).__name__}."
        )
        return None
    return data
