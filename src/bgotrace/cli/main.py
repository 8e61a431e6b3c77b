"""The ``bgotrace`` command line: one sub-command per stage a user runs."""

from __future__ import annotations

import logging

import typer

from bgotrace.cli.attribute import attribute
from bgotrace.cli.errors import user_errors

app = typer.Typer(
    name="bgotrace",
    help="Which training data made this model produce this text? Attribution by BGO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("attribute")(user_errors(attribute))


def _register_optional() -> None:
    """Sub-commands whose modules may import heavier stacks."""
    from bgotrace.cli.demo import demo
    from bgotrace.cli.generate import generate
    from bgotrace.cli.train import train

    app.command("train")(user_errors(train))
    app.command("generate")(user_errors(generate))
    app.command("demo")(user_errors(demo))


_register_optional()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()
