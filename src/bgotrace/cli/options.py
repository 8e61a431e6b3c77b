"""Command-line options derived from the config dataclasses: a new config field is a flag.

Each field of each section of :data:`bgotrace.config.SECTIONS` becomes one option of the
command :func:`with_config_options` decorates, read from the field and its ``_help``
metadata (``bgotrace.config``):

- the flag: ``--field-name``, or the metadata's ``flag`` (``--model`` for ``model.path``);
  a boolean is ``--flag/--no-flag``;
- the type: the field's one type, or text where it takes several (``lr: float | str`` is
  ``--lr 1e-4`` or ``--lr auto``: the config converts it as it converts ``config.yaml``);
  a list is a repeatable flag (``<str>...``);
- the help text, ending in the ``choices`` where it does not name each of them already
  (a choice list as the type would narrow the help column of its whole panel);
- its ``--help`` panel: the section, titled by the section dataclass's docstring.

Every option defaults to None, meaning "not given": the config file, then the dataclass
default, decide. Fields with ``cli=False`` are set in ``config.yaml`` only.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any, NamedTuple, TypeVar

import typer

from bgotrace.config import SECTIONS, flag_of

F = TypeVar("F", bound=Callable[..., Any])
_SCALARS = (bool, int, float, str)


class ConfigOption(NamedTuple):
    """One command-line option and the config field it sets."""

    name: str
    """Keyword the command receives (the flag without dashes, ``-`` as ``_``)."""
    section: str
    """Config section (``perturb``)."""
    field: str
    """Field of that section (``lr``)."""
    parameter: inspect.Parameter
    """The typer option, as a keyword-only parameter of the command."""


def config_options(sections: Mapping[str, type] | None = None) -> list[ConfigOption]:
    """One option per config field with a CLI form, section by section, in field order."""
    sections = SECTIONS if sections is None else sections
    options = [
        _option(name, cls, f)
        for name, cls in sections.items()
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True)
    ]
    _refuse_clashes([o.name for o in options])
    return options


def _option(section: str, cls: type, f: dataclasses.Field) -> ConfigOption:
    flag = flag_of(f)
    kind = _cli_type(cls, f, f"{section}.{f.name}")
    decls = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
    info = typer.Option(
        decls,
        help=_help_text(f),
        show_default=False,
        rich_help_panel=_panel(section, cls),
        metavar=f"<{typing.get_args(kind)[0].__name__}>..." if typing.get_origin(kind) else None,
    )
    name = flag[2:].replace("-", "_")
    annotation = Annotated[kind | None, info]  # type: ignore[valid-type]
    parameter = inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    return ConfigOption(name, section, f.name, parameter.replace(annotation=annotation))


def _cli_type(cls: type, f: dataclasses.Field, key: str) -> Any:
    """What the flag parses: the field's one scalar type, text for a union, a list."""
    hint = typing.get_type_hints(cls)[f.name]
    members = _members(hint)
    if len(members) == 1 and members[0] in _SCALARS:
        return members[0]
    if members and all(m in _SCALARS and m is not bool for m in members):
        return str  # e.g. float | str: the config converts the text like a YAML value
    if len(members) == 1 and typing.get_origin(members[0]) is list:
        (item,) = typing.get_args(members[0]) or (str,)
        if item in _SCALARS:
            return list[item]  # type: ignore[valid-type]
    raise TypeError(
        f"Config field {key} of type {hint} has no command-line form: declare it "
        "_help(..., cli=False) to set it in config.yaml only, or give it a bool, int, "
        "float, str or list type."
    )


def _help_text(f: dataclasses.Field) -> str:
    text: str = f.metadata.get("help", "")
    choices = f.metadata.get("choices") or ()
    if all(c in text for c in choices):
        return text
    return f"{text} (one of: {', '.join(choices)})".lstrip()  # no [...]: rich reads markup


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(m for m in typing.get_args(hint) if m is not type(None))
    return (hint,)


def _panel(section: str, cls: type) -> str:
    """``perturb: how θ+ (descent) and θ− (ascent) are made from the base model``."""
    doc = (inspect.getdoc(cls) or "").split("\n", 1)[0].rstrip(".")
    return f"{section}: {doc[:1].lower()}{doc[1:]}" if doc else section


def _refuse_clashes(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise TypeError(
                f"Two config fields make the flag --{name.replace('_', '-')}: give one of "
                "them _help(..., flag='--SECTION-NAME') (as model.dtype has --model-dtype)."
            )
        seen.add(name)


def with_config_options(func: F, sections: Mapping[str, type] | None = None) -> F:
    """Give ``func(own options..., **options)`` one keyword option per config field.

    Typer reads the command's options from its signature: the own parameters stay first
    (shown under "Options"), the config options follow, grouped by section, and arrive
    in ``**options`` under their :attr:`ConfigOption.name`. ``sections``: default
    :data:`bgotrace.config.SECTIONS`.
    """
    own = [
        p
        for p in inspect.signature(func, eval_str=True).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    options = [o.parameter for o in config_options(sections)]
    _refuse_clashes([p.name for p in own] + [p.name for p in options])
    func.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        own + options, return_annotation=inspect.signature(func).return_annotation
    )
    return func
