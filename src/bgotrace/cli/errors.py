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

USAGE_ERRORS: tuple[type[Exception], ...] = (click.UsageError,)
"""Bad flags, values and sub-commands (BadParameter, NoSuchOption, ... derive from these)."""
try:  # typer >= 0.20 parses with its own copy of click, whose errors are other classes
    from typer._click.exceptions import UsageError as _TyperUsageError

    USAGE_ERRORS += (_TyperUsageError,)
except ImportError:  # pragma: no cover - older typer uses click itself
    pass

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

    def invoke(self, ctx: Any) -> Any:  # typer's own click Context, or click's
        try:
            return super().invoke(ctx)
        except USAGE_ERRORS as err:
            usage_ctx = getattr(err, "ctx", None)
            command = usage_ctx.command_path if usage_ctx is not None else ctx.command_path
            message = " ".join(err.format_message().split()).rstrip(".")  # type: ignore[attr-defined]
            print(f"error: {message}: see `{command} --help`.", file=sys.stderr)
            raise typer.Exit(code=2) from None
