"""Config sections and the CLI derived from them.

- ``execution``: device and Ray settings in their own section; old config.yaml files that
  hold them under ``scoring:`` / ``model:`` still load, with one deprecation line per key.
- ``bgotrace.cli.options``: every config field is a flag of ``bgotrace attribute`` (name,
  type, help, choices, panel), so a new field needs no other edit.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from bgotrace.cli import attribute as attribute_cli
from bgotrace.cli.attribute import build_config
from bgotrace.cli.main import app
from bgotrace.cli.options import config_options, with_config_options
from bgotrace.config import (
    SECTIONS,
    AttributeConfig,
    ExecutionConfig,
    OutputSpec,
    _help,
    check_choices,
)
from bgotrace.errors import ConfigError

runner = CliRunner()
RUN = {
    "model": {"path": "m"},
    "corpus": {"path": "c.jsonl"},
    "query": {"prompt": "Paris is", "completion": " the capital"},
}
OLD_LAYOUT = """\
model: {path: m, device: cpu}
corpus: {path: c.jsonl}
query: {prompt: Paris is, completion: ' the capital'}
scoring: {workers: 0, ray_timeout: 60, reduce: mean}
"""


def _deprecations(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]


# --------------------------------------------------------------------------- execution


def test_an_old_layout_config_loads_into_execution_with_one_line_per_moved_key(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(OLD_LAYOUT)
    with caplog.at_level(logging.WARNING, logger="bgotrace.config"):
        cfg = AttributeConfig.load(path)
    assert cfg.execution == ExecutionConfig(device="cpu", workers=0, ray_timeout=60.0)
    assert cfg.scoring.reduce == "mean"  # the keys that stay are read where they were
    lines = _deprecations(caplog)
    assert sorted(lines) == sorted(
        f"config key {old} is deprecated: it is read as execution.{old.split('.')[1]} "
        "(write it there)."
        for old in ("model.device", "scoring.workers", "scoring.ray_timeout")
    )
    saved = tmp_path / "saved.yaml"
    cfg.save(saved)  # written in the new layout: replays without a warning
    written = yaml.safe_load(saved.read_text())
    assert written["execution"]["ray_timeout"] == 60.0 and "workers" not in written["scoring"]
    assert "device" not in written["model"]
    caplog.clear()
    assert AttributeConfig.load(saved) == cfg and not _deprecations(caplog)


def test_an_old_layout_config_replays_through_the_cli_with_flags_on_top(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    path.write_text(OLD_LAYOUT)
    with caplog.at_level(logging.WARNING, logger="bgotrace.config"):
        cfg = build_config({"config": path, "workers": 2, "device": None})
    assert cfg.execution.workers == 2 and cfg.execution.device == "cpu"
    assert cfg.execution.ray_timeout == 60.0 and len(_deprecations(caplog)) == 3


def test_an_old_key_and_its_new_place_must_agree():
    agree = {**RUN, "scoring": {"workers": 1}, "execution": {"workers": 1}}
    assert AttributeConfig.from_dict(agree).execution.workers == 1
    disagree = {**RUN, "scoring": {"workers": 1}, "execution": {"workers": 2}}
    with pytest.raises(ConfigError, match="scoring.workers=1 and execution.workers=2 disagree"):
        AttributeConfig.from_dict(disagree)


def test_moving_keys_leaves_the_callers_dict_alone():
    data = {**RUN, "scoring": {"workers": 1}}
    AttributeConfig.from_dict(data)
    assert data["scoring"] == {"workers": 1} and "execution" not in data


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"device": "tpu"}, "--device='tpu' is unknown"),
        ({"workers": -1}, "--workers must be >= 0"),
        ({"ship_cache": "sometimes"}, "--ship-cache='sometimes' is unknown: use one of auto"),
        ({"ray_timeout": 0.0}, "--ray-timeout must be > 0"),
    ],
)
def test_execution_values_are_checked(values, message):
    with pytest.raises(ConfigError, match=message):
        ExecutionConfig(**values)


def test_a_choice_error_names_the_fields_own_flag():
    @dataclass
    class Section:
        kind: str = _help("Kind.", "a", choices=("a", "b"), flag="--section-kind")

        def __post_init__(self) -> None:
            check_choices(self)

    assert Section("b").kind == "b"
    with pytest.raises(ConfigError, match="--section-kind='c' is unknown: use one of a, b."):
        Section("c")


# --------------------------------------------------------------------------- derived flags


@dataclass
class OutputWithExtras(OutputSpec):
    """Where results go and what is shown."""

    csv_rows: int = _help("Rows of the extra CSV.", 5)
    csv_sep: str = _help("Separator of the extra CSV.", "comma", choices=("comma", "tab"))
    csv_header: bool = _help("Write a header line.", True)
    csv_columns: list[str] | None = _help("Columns of the extra CSV.", None)
    csv_style: dict[str, Any] | None = _help("Styling, in config.yaml only.", None, cli=False)


def _command(captured: list[AttributeConfig]):
    """A command with the attribute command's derived flags, capturing the config it builds."""

    def command(config: Annotated[Path | None, typer.Option()] = None, **options: Any) -> None:
        captured.append(build_config({"config": config, **options}))

    with_config_options(command)
    test_app = typer.Typer(add_completion=False)
    test_app.command("attribute")(command)
    test_app.command("other")(lambda: None)  # two commands: "attribute" is a sub-command
    return test_app


def test_a_new_config_field_is_a_working_flag_with_no_other_edit(monkeypatch):
    monkeypatch.setitem(SECTIONS, "output", OutputWithExtras)
    captured: list[AttributeConfig] = []
    base = ["attribute", "--model", "m", "--corpus", "c", "--prompt", "p", "--completion", "q"]
    flags = ["--csv-rows", "7", "--csv-sep", "tab", "--no-csv-header"]
    result = runner.invoke(_command(captured), [*base, *flags, "--csv-columns", "a"])
    assert result.exit_code == 0, result.output
    output = captured[-1].output
    assert isinstance(output, OutputWithExtras)
    assert (output.csv_rows, output.csv_sep, output.csv_header) == (7, "tab", False)
    assert output.csv_columns == ["a"] and output.csv_style is None
    runner.invoke(_command(captured), [*base, "--csv-rows", "9"])  # others: their defaults
    output = captured[-1].output
    assert (output.csv_rows, output.csv_sep, output.csv_header, output.csv_columns) == (
        9, "comma", True, None,
    )  # fmt: skip

    bad = runner.invoke(_command(captured), [*base, "--csv-rows", "many"])
    assert bad.exit_code == 2 and "--csv-rows" in bad.output
    given = {"model": "m", "corpus": "c", "prompt": "p", "completion": "q"}
    with pytest.raises(ConfigError, match="--csv-sep='semicolon' is unknown: use one of comma"):
        build_config({"config": None, **given, "csv_sep": "semicolon"})
    assert runner.invoke(_command(captured), [*base, "--csv-style", "x"]).exit_code == 2


def test_a_new_fields_help_shows_its_text_choices_and_section(monkeypatch):
    monkeypatch.setitem(SECTIONS, "output", OutputWithExtras)
    result = runner.invoke(_command([]), ["attribute", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    text = result.output
    panel = text.index("output: where results go and what is shown")
    assert text.index("--csv-rows") > panel and "Rows of the extra CSV." in text
    assert "Separator of the extra CSV. (one of: comma, tab)" in text
    assert "--csv-columns" in text and "<str>..." in text
    assert "--no-csv-header" in text and "--csv-style" not in text


def test_a_type_without_a_command_line_form_is_refused_with_the_fix(monkeypatch):
    @dataclass
    class Styled(OutputSpec):
        """Where results go and what is shown."""

        style: dict[str, Any] | None = _help("Styling.", None)

    monkeypatch.setitem(SECTIONS, "output", Styled)
    with pytest.raises(TypeError, match=r"output\.style .* no command-line form.*cli=False"):
        config_options()


def test_two_fields_with_one_flag_are_refused_with_the_fix(monkeypatch):
    @dataclass
    class Clashing(OutputSpec):
        """Where results go and what is shown."""

        workers: int = _help("Also a flag of the execution section.", 1)

    monkeypatch.setitem(SECTIONS, "output", Clashing)
    with pytest.raises(TypeError, match="--workers.*flag='--SECTION-NAME'"):
        config_options()


def test_every_config_field_reaches_its_own_section(monkeypatch):
    """Each flag of the real command sets its own field and nothing else (slow obvious map)."""
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(AttributeConfig, "from_dict", classmethod(lambda cls, d: seen.append(d)))
    command = typer.main.get_command(app).commands["attribute"]  # type: ignore[attr-defined]
    flags = {opt for param in command.params for opt in param.opts}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
            assert (flag in flags) == f.metadata.get("cli", True), flag
            if flag not in flags:
                continue
            name = flag[2:].replace("-", "_")
            build_config({"config": None, "model": "m", "corpus": "c", name: "V"})
            expected = {"model": {"path": "m"}, "corpus": {"path": "c"}, "query": {}}
            if section in ("model", "corpus") and f.name == "path":
                expected[section]["path"] = "V"
            else:
                expected.setdefault(section, {})[f.name] = "V"
            assert seen[-1] == expected, flag


def test_the_attribute_command_keeps_its_own_flags_first():
    names = list(attribute_cli.SECTION_OF)
    assert {"seed", "method", "model", "corpus", "lr", "workers", "device"} <= set(names)
    result = runner.invoke(app, ["attribute", "--help"], env={"COLUMNS": "160"})
    text = result.output
    for flag in ("--config", "--overwrite", "--resume", "--rebuild-cache", "--quiet"):
        assert text.index(flag) < text.index("model: which model to attribute"), flag
    assert text.index("--workers") > text.index("execution: where the run executes")
