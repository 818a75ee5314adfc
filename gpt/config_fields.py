"""Config fields: the settable fields of a config class and the keys that name them.

`build_tree` walks a config dataclass and its nested configs (groups) and lists every
field by dotted name (`model.n_layer`), with its annotation, help text and default.
`resolve_key` finds the field a key means: the full dotted name, or any dotted tail of
it (`n_layer`, `optim.lr`) when exactly one field ends that way, with spelling
suggestions when none does. Hyphens in keys read as underscores.

Fields declared with `init=False` are derived values: they cannot be set, so they are
not in the tree.

Limits: a nested config field must be typed as the dataclass itself, so
`SubConfig | None` is not a group and cannot be set from a file.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from gpt.config_values import format_type, format_value

# Marks a field with neither a default nor a default_factory.
REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One settable field: its dotted name, annotation and help text."""

    path: str
    type: Any
    help: str


@dataclasses.dataclass
class FieldTree:
    """The settable fields of a config class, keyed by dotted name, in declaration order."""

    cls: type
    leaves: dict[str, Leaf]
    groups: dict[str, type]  # dotted name of each nested config (the root is "") -> its class
    group_help: dict[str, str]
    defaults: dict[str, Any]  # dotted leaf name -> default value, or REQUIRED

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
    return REQUIRED


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


def build_tree(cls: type) -> FieldTree:
    """List the settable fields of a config class and of its nested configs.

    Raises:
        TypeError: `cls` is not a dataclass, or an annotation of it cannot be resolved.
    """
    if not _is_config_class(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")
    tree = FieldTree(cls=cls, leaves={}, groups={"": cls}, group_help={"": ""}, defaults={})
    _add_fields(tree, cls, "", None)
    return tree


def _add_fields(tree: FieldTree, cls: type, prefix: str, instance: Any) -> None:
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
            tree.leaves[path] = Leaf(path=path, type=tp, help=help_text)
            tree.defaults[path] = default


def resolve_key(tree: FieldTree, key: str, group: str, strict: bool, source: str) -> tuple[str | None, str | None]:
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

    `key` follows the same rules as in `gpt.config.build_config` (dotted, dotted tail, hyphens).
    """
    tree = build_tree(cls)
    path, _ = resolve_key(tree, key, "", strict=False, source="")
    if path is None or path not in tree.leaves:
        return None
    return tree.leaves[path].type


def _format_default(value: Any) -> str:
    return "(required)" if value is REQUIRED else format_value(value)


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """List every settable field as (dotted name, type, default, help), all as text.

    The type and default are written as they would be typed on the command line.
    """
    tree = build_tree(cls)
    return [
        (path, format_type(leaf.type), _format_default(tree.defaults[path]), leaf.help)
        for path, leaf in tree.leaves.items()
    ]


def describe_groups(cls: type) -> list[tuple[str, str]]:
    """List the nested configs as (dotted name, help), the root config first as ("", "")."""
    tree = build_tree(cls)
    return [(path, tree.group_help[path]) for path in tree.groups]