"""Build stage configs from defaults, presets, a YAML file and command-line overrides.

A stage config is a plain dataclass whose fields carry `metadata={"help": ...}`
(see `option`). A field whose type is another dataclass is a nested config, or
group, and its fields are named with dots: `model.n_layer`. `build_config` applies,
in order, the field defaults, each preset, the YAML file and the overrides, then
validates the result and raises one `ConfigError` that lists every problem found.

Keys may be the full dotted name, or any dotted tail of it (`n_layer`,
`optim.lr`) when exactly one field ends that way. Hyphens in keys read as
underscores. Override values are strings parsed by the field's annotation. Values
from YAML and presets are already typed and are only checked against it.

Supported field types: int, float, bool, str, pathlib.Path, Any, `X | None`,
`Literal[...]`, `list[X]`, `tuple[X, ...]`, `tuple[X, Y]` and `dict[K, V]`, where
X is one of the scalar types. Fields declared with `init=False` are derived values:
they cannot be set and are not saved.

Limits: a nested config field must be typed as the dataclass itself, so
`SubConfig | None` is not a group and cannot be set from a file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from gpt.files import atomic_write_text

__all__ = [
    "FALSE_WORDS",
    "NONE_WORDS",
    "TRUE_WORDS",
    "ConfigError",
    "build_config",
    "config_to_dict",
    "describe_fields",
    "describe_groups",
    "field_type",
    "format_type",
    "format_value",
    "load_config",
    "option",
    "save_config",
]

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
NONE_WORDS = ("none", "null")

# Marks a field with neither a default nor a default_factory.
_REQUIRED = object()


class ConfigError(ValueError):
    """Every problem found while building one config, listed one per line.

    Attributes:
        problems: one full sentence per problem, each naming the dotted field,
            the value received and the fix.
        subject: name of the config class the problems belong to.
    """

    def __init__(self, problems: Sequence[str], subject: str = "config") -> None:
        self.problems = list(problems)
        self.subject = subject
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"invalid {subject}: {count} {noun}"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """Declare a dataclass field with a default and a help text.

    Args:
        default: the default value. A dataclass type becomes a nested config built
            by calling it. A list, dict, set or dataclass instance is copied for
            every new config, so instances never share it.
        help: what the field sets, with its unit, as `--help` shows it.
        **kwargs: passed on to `dataclasses.field` (for example `init=False`).

    Returns:
        The `dataclasses.Field` to assign in the class body.
    """
    metadata = {**kwargs.pop("metadata", {}), "help": help}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, metadata=metadata, **kwargs)
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        # Bind a private copy now, so mutating the caller's object later changes nothing.
        template = copy.deepcopy(default)
        return dataclasses.field(default_factory=lambda: copy.deepcopy(template), metadata=metadata, **kwargs)
    return dataclasses.field(default=default, metadata=metadata, **kwargs)


# ---------------------------------------------------------------------------
# The field tree of a config class


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: str
    type: Any
    help: str


@dataclasses.dataclass
class _Tree:
    """The settable fields of a config class, keyed by dotted name, in declaration order."""

    cls: type
    leaves: dict[str, _Leaf]
    groups: dict[str, type]  # dotted name of each nested config (the root is "") -> its class
    group_help: dict[str, str]
    defaults: dict[str, Any]  # dotted leaf name -> default value, or _REQUIRED

    def paths_under(self, group: str) -> list[str]:
        """Dotted names of every leaf and group below `group`, relative to it."""
        prefix = group + "." if group else ""
        names = [path for path in self.leaves if path.startswith(prefix)]
        names += [path for path in self.groups if path and path.startswith(prefix)]
        return [path[len(prefix):] for path in names]


def _is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _REQUIRED


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:
        # With `from __future__ import annotations` every annotation is a string that
        # must resolve in the module's globals, which a class local to a function is not.
        raise TypeError(
            f"cannot resolve the field types of {cls.__qualname__}: {exc}. "
            "Define the config classes at module level."
        ) from exc


def _build_tree(cls: type) -> _Tree:
    if not _is_config_class(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    tree = _Tree(cls=cls, leaves={}, groups={"": cls}, group_help={"": ""}, defaults={})
    _add_fields(tree, cls, "", None)
    return tree


def _add_fields(tree: _Tree, cls: type, prefix: str, instance: Any) -> None:
    """Add the fields of `cls` to `tree`, taking defaults from `instance` when given."""
    hints = _type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        path = prefix + field.name
        tp = hints[field.name]
        help_text = field.metadata.get("help", "")
        if instance is not None:
            default = getattr(instance, field.name)
        else:
            default = _field_default(field)

        if _is_config_class(tp):
            tree.groups[path] = tp
            tree.group_help[path] = help_text
            # When the factory is the class itself, the class-level defaults are the
            # constructor arguments. A custom factory (a lambda that sets some fields)
            # has to be called, and its instance read back.
            # NOTE: reading an instance back also reads any value its __post_init__
            # derived, which then no longer follows the fields it was derived from.
            nested = default if isinstance(default, tp) else None
            if instance is None and field.default_factory is tp:
                nested = None
            _add_fields(tree, tp, path + ".", nested)
        else:
            tree.leaves[path] = _Leaf(path=path, type=tp, help=help_text)
            tree.defaults[path] = default


# ---------------------------------------------------------------------------
# Values: parse strings and check typed values against an annotation


class _Mismatch(Exception):
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


def _convert(value: Any, tp: Any, from_text: bool) -> Any:
    """Convert `value` to the annotation `tp`.

    Args:
        value: a string when `from_text`, otherwise a typed value from YAML or a preset.
        tp: the field's resolved annotation.
        from_text: parse a string (command line) instead of checking a typed value.

    Raises:
        _Mismatch: the value does not fit `tp`.
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
                return _convert(value, member, from_text)
            except _Mismatch:
                pass
        raise _Mismatch

    if origin is Literal:
        for choice in args:
            if from_text and str(choice) == value.strip():
                return choice
            # type() comparison keeps True from matching a choice of 1.
            if not from_text and type(value) is type(choice) and value == choice:
                return choice
        raise _Mismatch

    if tp in (list, tuple) or origin in (list, tuple):
        return _convert_sequence(value, tp, from_text)

    if tp is dict or origin is dict:
        if from_text:
            value = _load_yaml_text(value)
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_type, value_type = args if args else (Any, Any)
        return {_convert(k, key_type, False): _convert(v, value_type, False) for k, v in value.items()}

    if tp is bool:
        if from_text:
            word = value.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise _Mismatch
        if isinstance(value, bool):
            return value
        raise _Mismatch

    if tp is int:
        if from_text:
            try:
                return _parse_int(value.strip())
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch

    if tp is float:
        if from_text:
            try:
                return float(value.strip())
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch

    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch

    if _is_path_type(tp):
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise _Mismatch

    raise TypeError(f"unsupported field type {format_type(tp)}")


def _convert_sequence(value: Any, tp: Any, from_text: bool) -> list | tuple:
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    if from_text:
        items: list = [item.strip() for item in value.split(",")] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise _Mismatch

    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(items) != len(args):
            raise _Mismatch
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(items)
    converted = [_convert(item, item_type, from_text) for item, item_type in zip(items, item_types)]
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


def _expected(tp: Any) -> str:
    """Describe the values a type accepts, for error messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        parts = [_expected(arg) for arg in args if arg is not type(None)]
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
    if value is _REQUIRED:
        return "(required)"
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
        raise _Mismatch from None


def _read_yaml_file(path: str | os.PathLike, problems: list[str]) -> Mapping | None:
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


# ---------------------------------------------------------------------------
# Keys


def _resolve_key(tree: _Tree, key: str, group: str, strict: bool, source: str) -> tuple[str | None, str | None]:
    """Find the dotted name that `key` means inside `group`.

    Returns:
        (dotted name, None) on success, or (None, the problem) when `key` names no
        field or several.
    """
    name = key.replace("-", "_")
    relative = tree.paths_under(group)
    prefix = group + "." if group else ""
    if name in relative:
        return prefix + name, None

    if not strict:
        matches = [path for path in relative if path.endswith("." + name)]
        if len(matches) == 1:
            return prefix + matches[0], None
        if matches:
            names = ", ".join(prefix + path for path in sorted(matches))
            return None, f"{key!r} from {source} matches several fields ({names}). Use the dotted name of the one you mean."

    # Suggest close spellings of both whole dotted names and their last parts.
    by_spelling: dict[str, list[str]] = {}
    for path in relative:
        by_spelling.setdefault(path, []).append(path)
        by_spelling.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    suggestions: list[str] = []
    for spelling in difflib.get_close_matches(name, list(by_spelling), n=5, cutoff=0.6):
        for path in by_spelling[spelling]:
            if prefix + path not in suggestions:
                suggestions.append(prefix + path)
    if suggestions:
        return None, f"unknown field {key!r} from {source}. Did you mean {' or '.join(suggestions[:3])}?"
    owner = group or tree.cls.__name__
    return None, f"unknown field {key!r} from {source}. {owner} has no field of that name."


def field_type(cls: type, key: str) -> Any | None:
    """Return the annotation of the field `key` names, or None if it names no single field.

    `key` follows the same rules as in `build_config` (dotted, dotted tail, hyphens).
    """
    tree = _build_tree(cls)
    path, _ = _resolve_key(tree, key, "", strict=False, source="")
    if path is None or path not in tree.leaves:
        return None
    return tree.leaves[path].type


# ---------------------------------------------------------------------------
# Building


def _flatten(
    tree: _Tree,
    mapping: Mapping,
    group: str,
    source: str,
    strict: bool,
    entries: list[tuple[str, Any, str]],
    problems: list[str],
) -> None:
    """Append (dotted leaf name, value, source) for every key of a nested mapping."""
    for key, value in mapping.items():
        if not isinstance(key, str):
            problems.append(f"key {key!r} from {source} is not a string. Field names are text, such as model.n_layer.")
            continue
        path, problem = _resolve_key(tree, key, group, strict, source)
        if path is None:
            problems.append(problem)
            continue
        if path in tree.groups:
            if isinstance(value, Mapping):
                _flatten(tree, value, path, source, strict, entries, problems)
            else:
                example = next(name for name in tree.leaves if name.startswith(path + "."))
                problems.append(
                    f"{path} is a group of fields, so it cannot take the value {value!r} from {source}. "
                    f"Set its fields instead, for example {example}=..."
                )
            continue
        entries.append((path, value, source))


def _parses_as(text: str, tp: Any) -> bool:
    try:
        _convert(text, tp, from_text=True)
    except (_Mismatch, TypeError):
        return False
    return True


def _apply(
    tree: _Tree,
    entries: list[tuple[str, Any, str]],
    text_layer: bool,
    values: dict[str, Any],
    problems: list[str],
) -> None:
    """Convert each entry to its field's type and store it in `values`, or record a problem."""
    for path, raw, source in entries:
        tp = tree.leaves[path].type
        from_text = text_layer and isinstance(raw, str)
        try:
            values[path] = _convert(raw, tp, from_text)
        except _Mismatch:
            message = f"{path}: expected {_expected(tp)} but received {raw!r} from {source}."
            if not from_text and isinstance(raw, str) and _parses_as(raw, tp):
                message += " Write the value without quotes so that YAML does not read it as a string."
            elif not from_text and tp is str:
                message += " Put the value in quotes to make it a string."
            problems.append(message)
        except TypeError as exc:
            problems.append(f"{path}: {exc}, so it cannot be set from {source}.")


def _instantiate(tree: _Tree, cls: type, prefix: str, values: dict[str, Any], problems: list[str]) -> Any:
    """Construct `cls` and its nested configs from `values`, or return None if any part failed."""
    kwargs: dict[str, Any] = {}
    complete = True
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        path = prefix + field.name
        if path in tree.groups:
            kwargs[field.name] = _instantiate(tree, tree.groups[path], path + ".", values, problems)
            complete = complete and kwargs[field.name] is not None
        elif values[path] is _REQUIRED:
            problems.append(f"{path} has no default. Set it in the config file or as {path}=VALUE.")
            complete = False
        else:
            kwargs[field.name] = values[path]
    if not complete:
        return None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{prefix.rstrip('.') or cls.__name__}: {exc}")
        return None


def _collect_problems(tree: _Tree, config: Any) -> list[str]:
    """Call `problems()` of the config and of every nested config."""
    found: list[str] = []
    for path in tree.groups:
        node = config
        for name in path.split(".") if path else []:
            node = getattr(node, name)
        check = getattr(node, "problems", None)
        if not callable(check):
            continue
        for problem in check():
            # Nested configs may not know their own dotted name, so prefix it.
            if path and not problem.startswith(path + "."):
                problem = f"{path}: {problem}"
            found.append(problem)
    return found


def _build(cls: type, layers: Sequence[tuple[Mapping, str, bool]], strict: bool, problems: list[str]) -> Any:
    """Apply each (mapping, source, values are text) layer over the defaults, then validate."""
    tree = _build_tree(cls)
    values = dict(tree.defaults)
    for mapping, source, text_layer in layers:
        entries: list[tuple[str, Any, str]] = []
        _flatten(tree, mapping, "", source, strict, entries, problems)
        _apply(tree, entries, text_layer, values, problems)

    config = _instantiate(tree, cls, "", values, problems)
    if config is not None:
        problems.extend(_collect_problems(tree, config))
    if problems:
        raise ConfigError(problems, cls.__name__)
    return config


def build_config(
    cls: type,
    *,
    config_file: str | os.PathLike | None = None,
    presets: Sequence[Mapping | tuple[str, Mapping]] = (),
    overrides: Mapping[str, str] | Sequence[tuple[str, str]] = (),
) -> Any:
    """Build a validated config: defaults, then each preset, the YAML file, then overrides.

    Args:
        cls: the config dataclass.
        config_file: a YAML mapping of field names to typed values, nested or dotted.
        presets: mappings like the YAML file, applied in order. A (name, mapping)
            pair names the preset in error messages.
        overrides: (key, string value) pairs from the command line, applied in order.
            Non-string values are checked as typed values instead of parsed.

    Returns:
        An instance of `cls`.

    Raises:
        ConfigError: listing every invalid key, every value that does not fit its
            field, and every problem that `problems()` of the config or of a
            nested config returns.
    """
    problems: list[str] = []
    layers: list[tuple[Mapping, str, bool]] = []
    for index, preset in enumerate(presets, start=1):
        if isinstance(preset, tuple):
            name, preset = preset
            layers.append((preset, f"preset {name!r}", False))
        else:
            layers.append((preset, f"preset #{index}" if len(presets) > 1 else "the preset", False))

    if config_file is not None:
        data = _read_yaml_file(config_file, problems)
        if data is not None:
            layers.append((data, f"config file {str(config_file)!r}", False))

    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    for key, value in pairs:
        # One layer per pair keeps the command-line order when two keys name one field.
        layers.append(({key: value}, "the command line", True))

    return _build(cls, layers, strict=False, problems=problems)


def load_config(cls: type, path: str | os.PathLike) -> Any:
    """Read a config saved by `save_config`.

    Keys must be full field names, nested or dotted. Fields missing from the file
    take their defaults, so a config saved before a field was added still loads.

    Raises:
        ConfigError: the file is missing or invalid, a key is unknown or shortened,
            or a value does not fit its field.
    """
    problems: list[str] = []
    data = _read_yaml_file(path, problems)
    if data is None:
        raise ConfigError(problems, cls.__name__)
    return _build(cls, [(data, f"config file {str(path)!r}", False)], strict=True, problems=problems)


# ---------------------------------------------------------------------------
# Output


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def config_to_dict(config: Any) -> dict[str, Any]:
    """Convert a config to nested dicts of plain YAML types (tuples become lists).

    Fields declared with `init=False` are left out, because they cannot be loaded back.
    """
    return {
        field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(config) if field.init
    }


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write a config as YAML, atomically: a temporary file beside `path`, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True))


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """List every settable field as (dotted name, type, default, help), all as text.

    The type and default are written as they would be typed on the command line.
    """
    tree = _build_tree(cls)
    return [
        (path, format_type(leaf.type), format_value(tree.defaults[path]), leaf.help)
        for path, leaf in tree.leaves.items()
    ]


def describe_groups(cls: type) -> list[tuple[str, str]]:
    """List the nested configs as (dotted name, help), the root config first as ("", "")."""
    tree = _build_tree(cls)
    return [(path, tree.group_help[path]) for path in tree.groups]
