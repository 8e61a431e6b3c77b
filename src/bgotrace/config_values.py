"""Values of a hand-written ``config.yaml``, checked against the config fields' types.

The CLI's flags are typed by typer, but a YAML file can hold anything: ``lr: 1e-4`` is a
string to YAML (it wants ``1.0e-4``), ``max_length: [256]`` a list. Each value is converted to
the field's declared type when that is lossless (a numeric string to a number), and refused
otherwise with a message naming the key, the expected type and an example, before any
``__post_init__`` check compares it with a number and fails with a bare ``TypeError``.

A field may accept a few special strings besides its type, e.g. ``lr: auto``: declare them in
the field's metadata as ``special=("auto",)`` (see ``bgotrace.config._help``). A field typed
``X | str`` without ``special`` accepts any string and leaves its parsing to ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from bgotrace.errors import ConfigError

_MISSING = object()
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_EXAMPLES = {bool: "true", int: "16", float: "0.0001", str: "'text'"}


def field_types(cls: type) -> dict[str, tuple[type, ...]]:
    """``{field name: the types it accepts}``; ``int | None`` -> ``(int, NoneType)``."""
    hints = typing.get_type_hints(cls)
    return {f.name: _members(hints[f.name]) for f in dataclasses.fields(cls)}


def _members(hint: Any) -> tuple[type, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(typing.get_args(hint))
    return (hint,)


def checked_values(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    """``values`` with each one converted to its field's type, or a :class:`ConfigError`."""
    accepted = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return {
        name: checked_value(
            value,
            accepted[name],
            key=f"{section}.{name}" if section else name,
            special=tuple(fields[name].metadata.get("special", ())),
            example=_example(fields[name]),
        )
        for name, value in values.items()
    }


def checked_value(
    value: Any,
    accepted: tuple[type, ...],
    *,
    key: str,
    special: tuple[str, ...] = (),
    example: str | None = None,
) -> Any:
    """``value`` as one of the ``accepted`` types (tried in order), else a pointed error."""
    if isinstance(value, str) and value in special:
        return value
    if value is None and type(None) in accepted:
        return None
    for kind in accepted:
        if kind is str and special:
            continue  # only the declared special strings, handled above
        converted = _convert(value, kind)
        if converted is not _MISSING:
            return converted
    expected = " or ".join(
        [_NAMES.get(k, k.__name__) for k in accepted if k is not type(None)]
        + [repr(s) for s in special]
    )
    if type(None) in accepted:
        expected += " (or null for the default)"
    name = key.rsplit(".", 1)[-1]
    shown = example or _EXAMPLES.get(accepted[0], "...")
    raise ConfigError(
        f"Config key {key} must be {expected}, got {value!r} ({type(value).__name__}): "
        f"write it like `{name}: {shown}`."
    )


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` when that loses nothing; ``_MISSING`` when it cannot be."""
    if kind is bool:
        return value if isinstance(value, bool) else _MISSING
    if isinstance(value, bool):  # bool is an int to Python, never a number to a user
        return _MISSING
    if kind is int:
        if isinstance(value, int):
            return value
        return _parse(value, int) if isinstance(value, str) else _MISSING
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        return _parse(value, float) if isinstance(value, str) else _MISSING
    if kind is str:
        return value if isinstance(value, str) else _MISSING
    origin = typing.get_origin(kind) or kind  # dict[str, Any] -> dict: isinstance needs it
    return value if isinstance(value, origin) else _MISSING


def _parse(text: str, kind: type) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        return _MISSING


def _example(field: dataclasses.Field) -> str | None:
    """The field's default as YAML would show it (``0.0001``, ``true``), if it has one."""
    default = field.default
    if default is dataclasses.MISSING or default is None:
        return None
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return default or "''"
    return repr(default)
