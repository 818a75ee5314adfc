"""Build stage configs from defaults, presets, a YAML file and command-line overrides.

A stage config is a plain dataclass whose fields carry `metadata={"help": ...}`
(see `option`). A field whose type is another dataclass is a nested config, or
group, and its fields are named with dots: `model.n_layer`. `build_config` applies,
in order, the field defaults, each preset, the YAML file and the overrides, then
validates the result and raises one `ConfigError` that lists every problem found.

Keys may be the full dotted name, or any dotted tail of it (`n_layer`,
`optim.lr`) when exactly one field ends that way (`gpt.config_fields`). Override
values are strings parsed by the field's annotation. Values from YAML and presets
are already typed and are only checked against it (`gpt.config_values`, which lists
the supported types). Fields declared with `init=False` are derived values: they
cannot be set and are not saved.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from gpt.config_fields import REQUIRED, FieldTree, build_tree, resolve_key
from gpt.config_values import ValueMismatch, convert_value, describe_expected, read_yaml_file
from gpt.files import atomic_write_text

__all__ = [
    "ConfigError",
    "build_config",
    "config_to_dict",
    "load_config",
    "option",
    "save_config",
]


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
# Building


def _flatten(
    tree: FieldTree,
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
        path, problem = resolve_key(tree, key, group, strict, source)
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
        convert_value(text, tp, from_text=True)
    except (ValueMismatch, TypeError):
        return False
    return True


def _apply(
    tree: FieldTree,
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
            values[path] = convert_value(raw, tp, from_text)
        except ValueMismatch:
            message = f"{path}: expected {describe_expected(tp)} but received {raw!r} from {source}."
            if not from_text and isinstance(raw, str) and _parses_as(raw, tp):
                message += " Write the value without quotes so that YAML does not read it as a string."
            elif not from_text and tp is str:
                message += " Put the value in quotes to make it a string."
            problems.append(message)
        except TypeError as exc:
            problems.append(f"{path}: {exc}, so it cannot be set from {source}.")


def _instantiate(tree: FieldTree, cls: type, prefix: str, values: dict[str, Any], problems: list[str]) -> Any:
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
        elif values[path] is REQUIRED:
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


def _collect_problems(tree: FieldTree, config: Any) -> list[str]:
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
    tree = build_tree(cls)
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
        data = read_yaml_file(config_file, problems)
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
    data = read_yaml_file(path, problems)
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
