"""The ``bgotrace`` command line: one sub-command per stage a user runs."""

from __future__ import annotations

import logging

import typer

from bgotrace.cli.attribute import attribute
from bgotrace.cli.errors import OneLineUsageErrors, user_errors
from bgotrace.cli.plan import plan

app = typer.Typer(
    name="bgotrace",
    help="Which training data made this model produce this text? Attribution by BGO.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineUsageErrors,
)
app.command("attribute")(user_errors(attribute))
app.command("plan")(user_errors(plan))


def _register_optional() -> None:
    """Sub-commands whose modules may import heavier stacks."""
    from bgotrace.cli.bench import bench_app
    from bgotrace.cli.cache import cache_app
    from bgotrace.cli.compare import compare
    from bgotrace.cli.demo import demo
    from bgotrace.cli.eval import eval_command
    from bgotrace.cli.generate import generate
    from bgotrace.cli.report import report
    from bgotrace.cli.train import train

    app.command("train")(user_errors(train))
    app.command("generate")(user_errors(generate))
    app.command("demo")(user_errors(demo))
    app.command("eval")(user_errors(eval_command))
    app.command("report")(user_errors(report))
    app.command("compare")(user_errors(compare))
    app.add_typer(bench_app, name="bench")
    app.add_typer(cache_app, name="cache")


_register_optional()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # bgotrace shows its own progress; HF's would interleave
    app()
