"""Property test: whatever a user feeds ``bgotrace attribute``, the answer is clean.

Every generated case (a corpus file, a query file, option values, a hand-written config.yaml,
or a model the inputs do not fit) must end in exit code 0, or exit code 2 with exactly one
``error: <problem>: <fix>`` line, never a traceback, and never a run directory that looks
complete (``summary.json``) after a failure. A case built with one known fault must fail, and
its error line must name that fault.

The CLI runs in-process on one tiny model (64 positions) saved once per module; most cases
fail at validation, and the valid ones use ``--method random`` or one BGO step on a tiny
corpus, so the 1,100 generated cases (320 corpora, 250 query inputs, 330 option sets, 160
config files, 40 model/tokenizer mismatches) take about 45 s of CPU (75-120 s of wall time on
2 cores shared with other jobs). Hypothesis is derandomized: the cases are the same on every
run and in CI. Set BGOTRACE_FUZZ_SCALE=0.1 to run a tenth of them while editing.
"""

from __future__ import annotations

import functools
import json
import os
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer.testing
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bgotrace.cli.main import app
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

CONTEXT = 64
"""Positions of the tiny model (tests.models.tiny_gpt2)."""
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, Berlin of Germany.",
    "Water boils at one hundred degrees and ice melts at zero.",
    "def add(a, b): return a + b",
]
FIX_WORDS = re.compile(
    r"\b(use|pass|give|fix|check|choose|convert|delete|remove|add|shorten|lower|drop|make|"
    r"store|save|widen|write|omit|wait|see|rebuild|resume|start over)\b",
    re.IGNORECASE,
)
runner = CliRunner()


def fuzz_settings(n: int) -> Any:
    """Fixed cases (derandomize); BGOTRACE_FUZZ_SCALE=0.1 runs a tenth of them while editing."""
    scale = float(os.environ.get("BGOTRACE_FUZZ_SCALE", "1"))
    return settings(
        max_examples=max(1, int(n * scale)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


# ----------------------------------------------------------------------------- fixtures


@dataclass
class World:
    """The tiny models and the folder every case writes into (also the cwd)."""

    root: Path
    model: Path
    small_vocab_model: Path
    n_cases: int = 0

    def case_dir(self, path: Path | None = None) -> Path:
        """A fresh folder for the next case (``path`` if the case named it in advance)."""
        self.n_cases += 1
        path = path or self.root / f"case{self.n_cases:05d}"
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    tokenizer = make_tiny_tokenizer()
    model = root / "model"
    tiny_gpt2(tokenizer).save_pretrained(model)
    tokenizer.save_pretrained(model)
    # A tokenizer larger than the embedding matrix: ids >= 100 have no embedding row.
    small = root / "small-vocab-model"
    small_model = tiny_gpt2(tokenizer)
    small_model.resize_token_embeddings(100)
    small_model.save_pretrained(small)
    tokenizer.save_pretrained(small)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the default .bgotrace-cache/ goes here, not into the repository
        # typer turns the app into click commands on every invoke (a quarter of a second
        # here, more than most cases); the app does not change, so convert it once.
        mp.setattr(typer.testing, "_get_command", functools.lru_cache(typer.testing._get_command))
        yield World(root, model, small)


# ----------------------------------------------------------------------------- the check


@dataclass
class Case:
    """One invocation: files to write, arguments, and the fault it holds (if any)."""

    files: dict[str, bytes] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    expect: str | None = None
    """Regex the error line must match; None: a valid case, or one whose outcome may vary."""
    must_fail: bool = False


def run_case(
    world: World, case: Case, *, model: Path | None = None, case_dir: Path | None = None
) -> None:
    here = world.case_dir(case_dir)
    for name, content in case.files.items():
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        (here / name).write_bytes(content)
    out = here / "run"
    args = ["attribute", "--quiet", "--model", str(model or world.model)]
    if case.expect is not None or case.must_fail or world.n_cases % 10 == 0:
        # A failure must leave no complete-looking run; writing one (report figures) is the
        # slowest part of a valid case, so only every 10th valid case writes it.
        args += ["--out", str(out)]
    if "--corpus" not in case.args and "--config" not in case.args:
        (here / "corpus.jsonl").write_text(_jsonl([_row(i, t) for i, t in enumerate(TEXTS)]))
        args += ["--corpus", str(here / "corpus.jsonl")]
    args += [a.replace("{here}", str(here)) for a in case.args]
    result = runner.invoke(app, args)
    check_result(result, out, case, args)


def check_result(result: Any, out: Path, case: Case, args: list[str]) -> None:
    shown = f"args={args}\n{result.output}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        trace = "".join(traceback.format_exception(*result.exc_info))
        pytest.fail(f"uncaught exception\n{shown}\n{trace}")
    assert "Traceback" not in result.output, shown
    assert result.exit_code in (0, 2), shown
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    if result.exit_code == 0:
        assert not errors and not case.must_fail, shown
        assert "--out" not in args or (out / "summary.json").is_file(), shown
        return
    assert len(errors) == 1, shown
    problem, _, fix = errors[0].removeprefix("error:").partition(": ")
    assert problem.strip() and fix.strip(), f"no 'problem: fix' form\n{shown}"
    assert FIX_WORDS.search(fix), f"the fix names no action\n{shown}"
    if case.expect is not None:
        assert re.search(case.expect, errors[0], re.IGNORECASE), (
            f"expected {case.expect!r}\n{shown}"
        )
    assert not (out / "summary.json").exists(), shown


# ----------------------------------------------------------------------------- corpora


def _row(i: int, text: Any, **extra: Any) -> dict[str, Any]:
    return {"id": f"d{i}", "text": text, "source": f"s{i % 2}", **extra}


def _jsonl(rows: list[Any], ascii_only: bool = True) -> str:
    return "".join(json.dumps(r, ensure_ascii=ascii_only) + "\n" for r in rows)


TEXT = st.sampled_from(TEXTS) | st.text(min_size=1, max_size=60).filter(str.strip)
JUNK = st.sampled_from(['{"text": broken', "{", "text,id", '{"text": "a"', "nul\x00l", "]"])
NON_STRING = st.sampled_from([1, 2.5, True, None, ["a"], {"a": 1}])


@st.composite
def corpus_cases(draw: Any) -> Case:
    rows = [_row(i, draw(TEXT)) for i in range(draw(st.integers(1, 5)))]
    kind = draw(st.sampled_from(CORPUS_FAULTS))
    name, content, expect = kind(draw, rows)
    data = content if isinstance(content, bytes) else content.encode("utf-8")
    return Case(
        files={name: data},
        args=["--corpus", "{here}/" + name, "--method", "random", "--prompt", "Paris is"]
        + ["--completion", " the capital"],
        expect=expect,
        must_fail=expect is not None,
    )


def _valid(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    return "corpus.jsonl", _jsonl(rows, draw(st.booleans())), None


def _bom_crlf_blank_lines(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    body = _jsonl(rows).replace("\n", draw(st.sampled_from(["\n", "\r\n", "\n\n  \n"])))
    return "corpus.jsonl", "\ufeff" + body if draw(st.booleans()) else body, None


def _bad_json(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    lines = _jsonl(rows).splitlines()
    at = draw(st.integers(0, len(lines)))
    lines.insert(at, draw(JUNK))
    return "corpus.jsonl", "\n".join(lines) + "\n", rf"line {at + 1} is not valid JSON"


def _wrong_text_type(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    rows[draw(st.integers(0, len(rows) - 1))]["text"] = draw(NON_STRING)
    return "corpus.jsonl", _jsonl(rows), "not a string"


def _not_an_object(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    rows.insert(draw(st.integers(0, len(rows))), draw(st.sampled_from([1, 2.5, True, [1], None])))
    return "corpus.jsonl", _jsonl(rows), "not a record"


def _array_in_jsonl(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    if draw(st.booleans()):
        return "corpus.jsonl", json.dumps(rows) + "\n", "not a record"
    return "corpus.jsonl", json.dumps(rows, indent=2), r"line 1 is not valid JSON"


def _array_in_json(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    return "corpus.json", json.dumps(rows, indent=draw(st.sampled_from([None, 2]))), None


def _null_ids_and_sources(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    for row in rows:
        row[draw(st.sampled_from(["id", "source"]))] = None
    return "corpus.jsonl", _jsonl(rows), None


def _duplicate_ids(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    rows.append(_row(0, draw(TEXT)))
    return "corpus.jsonl", _jsonl(rows), "duplicate id 'd0'"


def _empty_texts(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    blank = st.sampled_from(["", " ", "\n\t ", "\u3000"])
    if draw(st.booleans()):  # all blank: nothing to rank
        return "corpus.jsonl", _jsonl([_row(i, draw(blank)) for i in range(3)]), "no documents"
    rows.append(_row(len(rows), draw(blank)))  # some blank: skipped with a warning
    return "corpus.jsonl", _jsonl(rows), None


def _empty_file(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    return "corpus.jsonl", draw(st.sampled_from(["", "\n", "  \n\n", "\ufeff"])), "no documents"


def _invalid_utf8(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    raw = _jsonl(rows).encode()
    at = draw(st.integers(0, len(raw)))
    return (
        "corpus.jsonl",
        raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\x80"])) + raw[at:],
        "UTF-8",
    )


def _missing_text_field(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    del rows[draw(st.integers(0, len(rows) - 1))]["text"]
    return "corpus.jsonl", _jsonl(rows), "--text-field"


def _huge_document(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    rows.append(_row(len(rows), " ".join(TEXTS) * draw(st.integers(50, 400))))  # ~9k-70k tokens
    return "corpus.jsonl", _jsonl(rows), None


def _lone_surrogate(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    """Half an emoji, as JSON can escape it: Python reads it, no tokenizer can encode it."""
    row = rows[draw(st.integers(0, len(rows) - 1))]
    key = draw(st.sampled_from(["text", "id", "source"]))
    half = draw(st.sampled_from(["\ud83d", "\udcff", "\udfff"]))
    row[key] = f"{row[key]} {half}"
    return "corpus.jsonl", _jsonl(rows), "unpaired surrogate"


def _other_formats(draw: Any, rows: list) -> tuple[str, Any, str | None]:
    return draw(
        st.sampled_from(
            [
                ("corpus.parquet", b"PAR1 not really parquet", "not a readable Parquet"),
                ("corpus.csv", "text\nhello\n", "unknown format"),
                ("docs/a.txt", b"caf\xe9", "UTF-8"),
                ("docs/a.txt", "A folder of one text file.", None),
            ]
        )
    )


CORPUS_VALID = [
    _valid,
    _bom_crlf_blank_lines,
    _array_in_json,
    _null_ids_and_sources,
    _huge_document,
]
CORPUS_BAD = [
    _bad_json,
    _wrong_text_type,
    _not_an_object,
    _array_in_jsonl,
    _duplicate_ids,
    _empty_texts,
    _empty_file,
    _invalid_utf8,
    _missing_text_field,
    _lone_surrogate,
    _other_formats,
]
CORPUS_FAULTS = CORPUS_VALID + CORPUS_BAD * 2  # valid cases run to the end: fewer of them


@fuzz_settings(320)
@given(case=corpus_cases())
def test_fuzz_corpus_files(world: World, case: Case) -> None:
    name = next(iter(case.files))
    if name.startswith("docs/"):
        case.args[1] = "{here}/docs"
    run_case(world, case)


# ----------------------------------------------------------------------------- queries

PROMPT = st.sampled_from(["Paris is", "The quick brown", "Water boils at"]) | TEXT
COMPLETION = st.sampled_from([" the capital", " fox jumps", " one hundred"]) | TEXT
LONG = " ".join(TEXTS) * 3  # well over the model's 64 positions


def _query(i: int, draw: Any) -> dict[str, Any]:
    return {"id": f"q{i}", "prompt": draw(PROMPT), "completion": draw(COMPLETION)}


@st.composite
def query_cases(draw: Any) -> Case:
    queries = [_query(i, draw) for i in range(draw(st.integers(1, 3)))]
    kind = draw(st.sampled_from(QUERY_FAULTS))
    content, expect, extra = kind(draw, queries)
    if content is None:  # inline --prompt/--completion or a path only
        return Case(args=["--method", "random", *extra], expect=expect, must_fail=bool(expect))
    data = content if isinstance(content, bytes) else content.encode("utf-8")
    args = ["--method", "random", "--queries", "{here}/q.jsonl", *extra]
    return Case(files={"q.jsonl": data}, args=args, expect=expect, must_fail=bool(expect))


def _q_valid(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    # Unescaped U+2028 / U+0085 inside a JSON string are legal and must not split a line.
    queries[0]["completion"] += draw(st.sampled_from(["", "\u2028 more", "\x85 more"]))
    body = _jsonl(queries, ascii_only=draw(st.booleans()))
    if draw(st.booleans()):
        body = "\ufeff" + body.replace("\n", "\r\n")
    return body, None, []


def _q_bad_json(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    lines = _jsonl(queries).splitlines()
    at = draw(st.integers(0, len(lines)))
    lines.insert(at, draw(JUNK))
    return "\n".join(lines), rf"line {at + 1} is not valid JSON", []


def _q_not_object(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    queries.insert(0, draw(st.sampled_from([[1], "text", 3, None])))
    return _jsonl(queries), "line 1 is not a JSON object", []


def _q_field_type(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    key = draw(st.sampled_from(["prompt", "completion"]))
    if draw(st.booleans()):
        del queries[-1][key]
    else:
        queries[-1][key] = draw(NON_STRING)
    return _jsonl(queries), f"no string field '{key}'", []


def _q_empty_text(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    key = draw(st.sampled_from(["prompt", "completion"]))
    queries[0][key] = draw(st.sampled_from(["", " ", "\n\t"]))
    return _jsonl(queries), f"empty {key}", []


def _q_loss_on(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    queries[0]["loss_on"] = draw(st.sampled_from(["tokens", "", 3, None, "ALL"]))
    return _jsonl(queries), "loss_on=", []


def _q_duplicate(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    queries.append(dict(queries[0]))
    return _jsonl(queries), "repeats the id 'q0'", []


def _q_empty_file(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    return draw(st.sampled_from(["", "\n \n", "\ufeff"])), "is empty", []


def _q_invalid_utf8(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    return _jsonl(queries).encode() + b"\xff\xfe", "UTF-8", []


def _q_too_long(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    queries[-1][draw(st.sampled_from(["prompt", "completion"]))] = LONG
    return _jsonl(queries), "reads at most 64", []


def _q_nothing_to_predict(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    one = [{"id": "one", "prompt": "", "completion": "a", "loss_on": "all"}]
    return _jsonl(one), "no token to take the loss on", []


def _q_lone_surrogate(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    key = draw(st.sampled_from(["prompt", "completion", "id"]))
    queries[0][key] += "\ud800"
    if draw(st.booleans()):  # the same from the command line (argv decoded with surrogateescape)
        return None, "unpaired surrogate", ["--prompt", "Paris \udcff", "--completion", " is"]
    return _jsonl(queries), "unpaired surrogate", []


def _q_inline(draw: Any, queries: list) -> tuple[Any, str | None, list[str]]:
    return draw(
        st.sampled_from(
            [
                (None, None, ["--prompt", "Paris is", "--completion", " the capital"]),
                (None, None, ["--prompt", "", "--completion", "Whole text.", "--loss-on", "all"]),
                (None, "No query", []),
                (None, "--completion is missing", ["--prompt", "Paris is"]),
                (
                    None,
                    "one or the other",
                    ["--prompt", "a", "--completion", "b", "--queries", "q"],
                ),
                (None, "does not exist", ["--queries", "{here}/missing.jsonl"]),
                (None, "reads at most 64", ["--prompt", "Paris", "--completion", LONG]),
            ]
        )
    )


QUERY_VALID = [_q_valid]
QUERY_BAD = [
    _q_bad_json,
    _q_not_object,
    _q_field_type,
    _q_empty_text,
    _q_loss_on,
    _q_duplicate,
    _q_empty_file,
    _q_invalid_utf8,
    _q_too_long,
    _q_nothing_to_predict,
    _q_lone_surrogate,
    _q_inline,
]
QUERY_FAULTS = QUERY_VALID * 2 + QUERY_BAD


@fuzz_settings(250)
@given(case=query_cases())
def test_fuzz_query_files(world: World, case: Case) -> None:
    if "--prompt" not in case.args and "--queries" not in case.args and case.expect is None:
        case.args += ["--prompt", "Paris is", "--completion", " the capital"]
    run_case(world, case)


# ----------------------------------------------------------------------------- options

VALID_OPTIONS: dict[str, list[str]] = {
    "--max-length": ["8", "16", "64"],
    "--stride": ["0", "1", "3"],
    "--optimizer": ["sgd", "adam"],
    "--lr": ["1e-4", "0.001"],
    "--params": ["all", "last:1", "last:half", "regex:mlp", r"regex:\.h\.1\."],
    "--max-grad-norm": ["0.5", "10"],
    "--score": ["bidirectional", "ascent", "descent", "abs"],
    "--reduce": ["mean", "sum"],
    "--batch-size": ["1", "3", "16"],
    "--dtype": ["float32", "bfloat16"],
    "--block-units": ["1", "2", "1024"],
    "--queries-per-sweep": ["1", "8"],
    "--top-k": ["1", "5"],
    "--top-tokens": ["0", "2"],
    "--granularity": ["unit", "document", "source"],
    "--seed": ["0", "7"],
    "--device": ["cpu", "auto"],
    "--method": ["bgo", "random", "bm25"],
}
BAD_OPTIONS: list[tuple[str, str, str]] = [
    ("--max-length", "1", "--max-length must be >= 2"),
    ("--max-length", "65", "longer than the model's context of 64"),
    ("--max-length", "100000", "longer than the model's context of 64"),
    ("--max-length", "abc", "--max-length"),
    ("--stride", "-1", "--stride"),
    ("--stride", "64", "stride"),
    ("--stride", "1.5", "--stride"),
    ("--optimizer", "newton", "--optimizer"),
    ("--lr", "0", "--lr"),
    ("--lr", "-1e-3", "--lr"),
    ("--lr", "nan", "--lr"),
    ("--lr", "inf", "--lr"),
    ("--lr", "fast", "--lr"),
    ("--steps", "0", "--steps"),
    ("--steps", "two", "--steps"),
    ("--params", "regex:(", "not a valid regular expression"),
    ("--params", "regex:[a-", "not a valid regular expression"),
    ("--params", "regex:*mlp", "not a valid regular expression"),
    ("--params", "regex:(?P<x", "not a valid regular expression"),
    ("--params", "regex:nothing_matches", "selects no parameter"),
    ("--params", "last:0", "selects no block"),
    ("--params", "last:x", "--params"),
    ("--params", "regex:", "--params"),
    ("--params", "bogus", "--params"),
    ("--max-grad-norm", "0", "--max-grad-norm"),
    ("--fisher-samples", "0", "--fisher-samples"),
    ("--score", "max", "--score"),
    ("--reduce", "median", "--reduce"),
    ("--batch-size", "0", "--batch-size"),
    ("--dtype", "float64", "--dtype"),
    ("--block-units", "0", "--block-units"),
    ("--queries-per-sweep", "0", "--queries-per-sweep"),
    ("--workers", "-1", "--workers"),
    ("--top-k", "0", "--top-k"),
    ("--top-tokens", "-1", "--top-tokens"),
    ("--granularity", "token", "--granularity"),
    ("--method", "tracin", "Unknown attribution method"),
    ("--seed", "x", "--seed"),
    ("--seed", "-1", "--seed"),
    ("--seed", "4294967296", "--seed"),
    ("--lr", "1e300", "--lr"),
    ("--device", "tpu", "tpu"),
    ("--loss-on", "tokens", "--loss-on"),
    ("--adapter", "{here}", "adapter_config.json"),
    ("--config", "{here}/missing.yaml", "does not exist"),
    ("--cache-dir", "{here}/afile", "is a file"),
    ("--out", "{here}/afile", "is a file"),
    ("--out", "{here}/afile/run", "Cannot create the run directory"),
    ("--cache-dir", "{here}/afile/sub", "Cannot create"),
    ("--text-field", "body", "--text-field"),
    ("--frobnicate", "1", "No such option"),
]


NEWER_BAD_OPTIONS: list[tuple[str, str, str]] = [
    ("--candidates", "lots", "--candidates"),
    ("--candidates", "-5", "--candidates"),
    ("--spans", "words", "--spans"),
    ("--lr", "autom", "--lr"),
    ("--lr-target", "0", "--lr-target"),
    ("--lr-criterion", "speed", "--lr-criterion"),
    ("--fisher-damping", "-1", "--fisher-damping"),
    ("--normalize", "zscore", "--normalize"),
    ("--trunk-cache-dtype", "int8", "--trunk-cache-dtype"),
    ("--cpus-per-worker", "-1", "--cpus-per-worker"),
    ("--gpus-per-worker", "-1", "--gpus-per-worker"),
    ("--block-attempts", "0", "--block-attempts"),
    ("--ray-timeout", "-1", "--ray-timeout"),
    ("--bos", "sometimes", "--bos"),
]
"""Flags that other parts of the project add; fuzzed where this version of the CLI has them."""


def _attribute_flags() -> set[str]:
    import typer.main

    command = typer.main.get_command(app).commands["attribute"]  # type: ignore[attr-defined]
    return {flag for param in command.params for flag in param.opts}


BAD_OPTIONS += [bad for bad in NEWER_BAD_OPTIONS if bad[0] in _attribute_flags()]


BGO_ONLY = ("--steps", "--optimizer", "--lr", "--max-grad-norm", "--score", "--reduce", "--dtype",
            "--block-units", "--queries-per-sweep")  # fmt: skip


def _without(args: list[str], flags: Sequence[str]) -> list[str]:
    """``args`` without the given flags and their values."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg not in flags and not (i and args[i - 1] in flags):
            out.append(arg)
    return out


@st.composite
def option_cases(draw: Any) -> Case:
    chosen = draw(st.lists(st.sampled_from(sorted(VALID_OPTIONS)), max_size=4, unique=True))
    bad = draw(st.sampled_from(BAD_OPTIONS)) if draw(st.integers(0, 6)) else None  # 6 in 7
    args = ["--steps", "1", "--prompt", "Paris is", "--completion", " the capital"]
    for flag in chosen:
        if bad is not None and flag in ("--method", "--max-length", "--stride", "--device"):
            continue  # these decide whether (and which) check of the bad option runs first
        args += [flag, draw(st.sampled_from(VALID_OPTIONS[flag]))]
    if "--stride" in args and "--max-length" not in args:
        args += ["--max-length", "16"]
    if bad is None:
        if "--method" not in args and draw(st.booleans()):
            args += ["--method", "random"]  # half the valid cases skip the (slower) BGO sweep
        if "--method" in args and args[args.index("--method") + 1] != "bgo":
            args = _without(args, BGO_ONLY)  # a baseline refuses the options it would ignore
        return Case(files={"afile": b"x"}, args=args)
    return Case(files={"afile": b"x"}, args=args + [bad[0], bad[1]], expect=bad[2], must_fail=True)


@fuzz_settings(330)
@given(case=option_cases())
def test_fuzz_option_values(world: World, case: Case) -> None:
    if "--max-length" in case.args and "--stride" in case.args:
        length = int(case.args[case.args.index("--max-length") + 1])
        stride = case.args[case.args.index("--stride") + 1]
        if stride.lstrip("-").isdigit() and int(stride) >= length and not case.must_fail:
            return  # an invalid combination drawn from two valid values: covered by BAD_OPTIONS
    run_case(world, case)


# ----------------------------------------------------------------------------- config.yaml

WRONG_VALUES = {
    int: ["abc", [1], {"a": 1}, True, 1.5, "1e3"],
    float: ["abc", [1.0], {"a": 1}, True, "1,5"],
    str: [5, 2.5, [1], {"a": 1}, True],
    bool: ["yes", 1, "true", [True]],
}


def _config_fields() -> list[tuple[str, str, tuple[type, ...]]]:
    from bgotrace.config import SECTIONS
    from bgotrace.config_values import field_types

    return [
        (section, name, kinds)
        for section, cls in SECTIONS.items()
        for name, kinds in field_types(cls).items()
    ]


@st.composite
def config_cases(draw: Any) -> Case:
    data: dict[str, Any] = {
        "model": {"path": "{model}"},
        "corpus": {"path": "{here}/corpus.jsonl", "max_length": 16},
        "query": {"prompt": "Paris is", "completion": " the capital"},
        "perturb": {},  # method random refuses perturbation options
        "method": "random",
    }
    kind = draw(st.integers(0, 9))
    expect, must_fail = None, False
    if kind <= 5:  # a value of the wrong type for one field
        section, name, kinds = draw(st.sampled_from(_config_fields()))
        main = next(k for k in kinds if k is not type(None))
        wrong = [
            v
            for v in [*WRONG_VALUES.get(main, []), [1]]
            if not any(_accepts(k, v) for k in kinds)  # e.g. any string suits `float | str`
        ]
        value = draw(st.sampled_from(wrong))
        data.setdefault(section, {})[name] = value
        expect = rf"Config key {section}\.{name} must be|--{name.replace('_', '-')}"
        must_fail = True
    elif kind == 6:  # numbers as YAML 1.1 reads them: strings, converted losslessly
        data["perturb"].update(lr="1e-4", steps="10")  # the defaults, as strings
        data["corpus"]["max_length"] = "16"
    elif kind == 7:
        section = draw(st.sampled_from(["perturb", "scoring", "output", "corpus"]))
        data[section] = draw(st.sampled_from([5, "fast", [1, 2]]))
        expect, must_fail = f"section '{section}' is a", True
    elif kind == 8:
        data[draw(st.sampled_from(["perturb", "scoring"]))] = {"frobnicate": 1}
        expect, must_fail = "Unknown key", True
    else:
        text = draw(st.sampled_from(["model: [unclosed\n", "a: b: c\n", "- 1\n- 2\n", "\t x"]))
        return Case(
            files={"config.yaml": text.encode()},
            args=["--config", "{here}/config.yaml"],
            expect="config|YAML|mapping",
            must_fail=True,
        )
    text = yaml.safe_dump(data, sort_keys=False)
    return Case(
        files={"config.yaml": text.encode()},
        args=["--config", "{here}/config.yaml"],
        expect=expect,
        must_fail=must_fail,
    )


def _accepts(kind: type, value: Any) -> bool:
    from bgotrace.config_values import checked_value
    from bgotrace.errors import ConfigError

    try:
        checked_value(value, (kind,), key="k")
    except ConfigError:
        return False
    return True


@fuzz_settings(160)
@given(case=config_cases())
def test_fuzz_config_yaml(world: World, case: Case) -> None:
    here = world.root / f"cfg{world.n_cases + 1:05d}"  # the case dir run_case will make
    text = case.files["config.yaml"].decode().replace("{model}", str(world.model))
    case.files["config.yaml"] = text.replace("{here}", str(here)).encode()
    case.files["corpus.jsonl"] = _jsonl([_row(i, t) for i, t in enumerate(TEXTS)]).encode()
    run_case(world, case, case_dir=here)


# ----------------------------------------------------------------------------- model fit


@fuzz_settings(40)
@given(rows=st.lists(TEXT, min_size=1, max_size=4), known=st.booleans())
def test_fuzz_tokenizer_larger_than_the_embedding(world: World, rows: list, known: bool) -> None:
    """Token ids beyond the embedding matrix: a clear error, never an IndexError."""
    texts = TEXTS[:2] + rows if known else rows  # TEXTS surely use ids >= 100
    corpus = _jsonl([_row(i, t) for i, t in enumerate(texts)]).encode()
    case = Case(
        files={"corpus.jsonl": corpus},
        args=["--corpus", "{here}/corpus.jsonl", "--steps", "1", "--prompt", "Paris is"]
        + ["--completion", " the capital"],
        expect="beyond the model's 100 embedding rows",
        must_fail=known,
    )
    run_case(world, case, model=world.small_vocab_model)


def test_default_unit_length_follows_the_model_context(world: World) -> None:
    """No --max-length on a 64-position model: units of 64 tokens, recorded for the replay."""
    case = Case(args=["--steps", "1", "--prompt", "Paris is", "--completion", " the capital"])
    long_row = _row(9, " ".join(TEXTS) * 5)
    case.files["corpus.jsonl"] = _jsonl([long_row]).encode()
    case.args += ["--corpus", "{here}/corpus.jsonl", "--out", "{here}/run"]
    run_case(world, case)
    run = world.root / f"case{world.n_cases:05d}" / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["corpus"]["max_length"] == CONTEXT
    assert yaml.safe_load((run / "config.yaml").read_text())["corpus"]["max_length"] == CONTEXT


def test_two_corpora_of_one_file_name_get_their_own_default_cache(world: World) -> None:
    """The default cache is keyed by content: a second corpus.jsonl is not refused as stale."""
    here = world.case_dir()
    paths = []
    # Texts no other case uses, so both caches are new ones.
    for name, texts in (("a", ["Only corpus a has this text."]), ("b", ["Corpus b is other."])):
        (here / name).mkdir()
        paths.append(here / name / "corpus.jsonl")
        paths[-1].write_text(_jsonl([_row(i, t) for i, t in enumerate(texts)]))
    query = ["--prompt", "Paris is", "--completion", " the capital", "--method", "random"]
    base = ["attribute", "--quiet", "--model", str(world.model), *query]
    before = set((world.root / ".bgotrace-cache").glob("corpus.jsonl-*"))
    for path in paths:
        result = runner.invoke(app, [*base, "--corpus", str(path)])
        assert result.exit_code == 0, result.output
    made = set((world.root / ".bgotrace-cache").glob("corpus.jsonl-*")) - before
    assert len(made) == 2
    # An explicit --cache-dir still refuses a cache built from another corpus.
    shared = ["--cache-dir", str(here / "cache")]
    assert runner.invoke(app, [*base, "--corpus", str(paths[0]), *shared]).exit_code == 0
    stale = runner.invoke(app, [*base, "--corpus", str(paths[1]), *shared])
    assert stale.exit_code == 2 and "--rebuild-cache" in stale.output, stale.output


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("perturb", {"steps": "abc"}, "Config key perturb.steps must be an integer, got 'abc'"),
        ("perturb", {"steps": 2.5}, "write it like `steps: 10`"),
        ("scoring", {"batch_size": True}, "Config key scoring.batch_size must be an integer"),
        ("corpus", {"max_length": [256]}, "an integer (or null for the default)"),
        ("model", {"trust_remote_code": "yes"}, "must be true or false, got 'yes'"),
        ("query", {"prompt": 1789}, "Config key query.prompt must be a string"),
        ("perturb", {"max_grad_norm": "big"}, "a number (or null for the default)"),
    ],
)
def test_config_values_of_the_wrong_type_name_key_type_and_example(
    section: str, values: dict, message: str
) -> None:
    from bgotrace.config import AttributeConfig
    from bgotrace.errors import ConfigError

    data: dict[str, Any] = {
        "model": {"path": "m"},
        "corpus": {"path": "c.jsonl"},
        "query": {"prompt": "p", "completion": "c"},
    }
    data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=re.escape(message)):
        AttributeConfig.from_dict(data)


def test_config_numbers_written_as_strings_are_converted() -> None:
    """YAML 1.1 reads ``lr: 1e-4`` as a string; it is the number the user meant."""
    from bgotrace.config import AttributeConfig

    text = "model: {path: m}\ncorpus: {path: c.jsonl, max_length: '16'}\n"
    text += "query: {prompt: p, completion: c}\nperturb: {lr: 1e-4, steps: '3'}\nseed: '7'\n"
    cfg = AttributeConfig.from_dict(yaml.safe_load(text))
    assert yaml.safe_load(text)["perturb"]["lr"] == "1e-4"  # the YAML quirk itself
    assert (cfg.perturb.lr, cfg.perturb.steps, cfg.corpus.max_length, cfg.seed) == (
        1e-4,
        3,
        16,
        7,
    )


def _weights(d: Path) -> Path:
    return next(d.glob("*.safetensors"))


MODEL_FAULTS = {
    "garbage weights": (
        lambda d: _weights(d).write_bytes(b"garbage" * 10),
        "weights .* unreadable",
    ),
    "truncated weights": (
        lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:1000]),
        "weights .* unreadable",
    ),
    "config not JSON": (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
    "unknown architecture": (
        lambda d: (d / "config.json").write_text('{"model_type": "nonexistent"}'),
        "config.json is unreadable",
    ),
    "no tokenizer": (
        lambda d: [p.unlink() for p in d.iterdir() if "token" in p.name],
        "no tokenizer files",
    ),
    "damaged tokenizer": (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer"),
}


@pytest.mark.parametrize("fault", sorted(MODEL_FAULTS))
def test_damaged_model_directory_is_one_line_error(world: World, fault: str) -> None:
    import shutil

    damage, expect = MODEL_FAULTS[fault]
    broken = world.root / f"model-{fault.replace(' ', '-')}"
    shutil.copytree(world.model, broken)
    damage(broken)
    case = Case(
        args=["--method", "random", "--prompt", "Paris is", "--completion", " the capital"],
        expect=expect,
        must_fail=True,
    )
    run_case(world, case, model=broken)


def test_damaged_adapter_config_is_one_line_error(world: World) -> None:
    here = world.root / "adapter"
    here.mkdir()
    (here / "adapter_config.json").write_text("{broken")
    case = Case(
        args=["--adapter", str(here), "--prompt", "Paris is", "--completion", " the capital"],
        expect="adapter_config.json is not a JSON object",
        must_fail=True,
    )
    run_case(world, case)


def test_resume_with_the_default_unit_length_is_the_same_config(world: World) -> None:
    """config.yaml holds the resolved length; the same flags resolve to it again: resume works."""
    here = world.case_dir()
    (here / "corpus.jsonl").write_text(_jsonl([_row(i, t) for i, t in enumerate(TEXTS)]))
    args = ["attribute", "--quiet", "--model", str(world.model), "--steps", "1"]
    args += ["--corpus", str(here / "corpus.jsonl"), "--out", str(here / "run")]
    args += ["--prompt", "Paris is", "--completion", " the capital"]
    assert runner.invoke(app, args).exit_code == 0
    resumed = runner.invoke(app, [*args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert (here / "run" / "summary.json").is_file()
