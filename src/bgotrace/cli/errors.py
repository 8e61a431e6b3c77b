"""Turn user errors into one line on stderr and exit code 2 — never a traceback.

Two kinds: a :class:`BgotraceError` raised by a command (``user_errors``), and a flag that
click cannot parse, such as ``--lr abc`` (``OneLineUsageErrors``, which replaces click's
boxed usage screen by the same one-line form).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
import typer
from typer.core import TyperGroup

from bgotrace.errors import BgotraceError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(func: F) -> F:
    """Wrap a CLI command so a BgotraceError prints ``error: ...`` and exits 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BgotraceError as err:
            print(f"error: {err}", file=sys.stderr)
            raise typer.Exit(code=err.exit_code) from None
        except KeyboardInterrupt:
            print("interrupted (an attribute run continues with --resume).", file=sys.stderr)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


class OneLineUsageErrors(TyperGroup):
    """The command group of ``bgotrace``: a bad flag or sub-command is one ``error:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as err:  # also BadParameter, NoSuchOption, NoSuchCommand
            command = err.ctx.command_path if err.ctx is not None else ctx.command_path
            message = err.format_message().strip().rstrip(".")
            print(f"error: {message}: see `{command} --help`.", file=sys.stderr)
            raise typer.Exit(code=2) from None
