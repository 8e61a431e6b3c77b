"""The attribute CLI end to end, its --help, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from bgotrace.cli.main import app
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

runner = CliRunner()
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, Berlin of Germany.",
    "Water boils at one hundred degrees and ice melts at zero.",
    "def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tokenizer = make_tiny_tokenizer()
    tiny_gpt2(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"id": f"d{i}", "text": t, "source": f"s{i % 2}"} for i, t in enumerate(TEXTS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def base_args(model_dir, corpus, tmp_path, **extra):
    args = [
        "attribute",
        "--model",
        model_dir,
        "--corpus",
        corpus,
        "--quiet",
        "--cache-dir",
        tmp_path / "cache",
        "--max-length",
        "12",
        "--steps",
        "2",
    ]
    prompt = extra.pop("prompt", "Paris is the capital of")
    completion = extra.pop("completion", " France.")
    args += ["--prompt", prompt, "--completion", completion]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", value]
    return args


@pytest.mark.parametrize(
    "command",
    [
        "attribute", "plan", "train", "generate", "demo", "eval", "report", "compare",
        "bench build", "bench run", "cache build",
    ],
)  # fmt: skip
def test_every_subcommand_has_help(command):
    result = invoke(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_attribute_writes_a_complete_replayable_run(model_dir, corpus, tmp_path):
    out = tmp_path / "run"
    result = invoke(*base_args(model_dir, corpus, tmp_path, out=out))
    assert result.exit_code == 0, result.output
    assert "Top" in result.output and "d1#0" in result.output
    for name in (
        "config.yaml",
        "scores.parquet",
        "documents.parquet",
        "sources.parquet",
        "top_tokens.jsonl",
        "summary.json",
    ):
        assert (out / name).is_file(), name
    scores = pd.read_parquet(out / "scores.parquet")
    assert {"query_id", "unit_id", "doc_id", "source", "score", "rank"} <= set(scores.columns)
    assert sorted(scores["rank"]) == list(range(1, len(scores) + 1))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["corpus"]["n_units"] == len(scores)
    replay = invoke(
        "attribute", "--config", out / "config.yaml", "--out", tmp_path / "again", "--quiet"
    )
    assert replay.exit_code == 0, replay.output
    again = pd.read_parquet(tmp_path / "again" / "scores.parquet")
    pd.testing.assert_frame_equal(scores, again)


def test_baseline_method_writes_the_same_outputs(model_dir, corpus, tmp_path):
    out = tmp_path / "bm25"
    args = base_args(model_dir, corpus, tmp_path, out=out, method="bm25", max_length="64")
    del args[args.index("--steps") : args.index("--steps") + 2]  # bm25 makes no steps
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(out / "scores.parquet")
    assert scores.loc[scores["rank"] == 1, "doc_id"].item() == "d1"  # shares "France"
    assert json.loads((out / "summary.json").read_text())["method"] == "bm25"
    assert "method bm25" in (out / "report.html").read_text()
    bad = invoke(*base_args(model_dir, corpus, tmp_path, method="tracin"))
    assert_one_line_error(bad, "Unknown attribution method 'tracin'")


def test_existing_run_is_not_clobbered(model_dir, corpus, tmp_path):
    args = base_args(model_dir, corpus, tmp_path, out=tmp_path / "run")
    assert invoke(*args).exit_code == 0
    result = invoke(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert invoke(*args, "--overwrite").exit_code == 0


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_CORPORA = {
    "missing": (None, "does not exist"),
    "empty": ("", "empty"),
    "malformed": ('{"text": "ok"}\n{"text": broken\n', "line 2"),
    "no_text_field": ('{"body": "hello there"}\n', "--text-field"),
}


@pytest.mark.parametrize("case", sorted(BAD_CORPORA))
def test_bad_corpus_is_one_line_error(model_dir, tmp_path, case):
    content, expected = BAD_CORPORA[case]
    path = tmp_path / "c.jsonl" if content is None else _write(tmp_path, "c.jsonl", content)
    out = tmp_path / "run"
    result = invoke(*base_args(model_dir, path, tmp_path, out=out))
    assert_one_line_error(result, expected)
    assert not out.exists()  # nothing that looks like a run was written


def assert_one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert expected in errors[0], errors[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"prompt": ""}, "empty prompt"),
        ({"completion": " "}, "empty completion"),
        ({"completion": " France." * 40}, "reads at most"),
        ({"optimizer": "newton"}, "--optimizer"),
        ({"params": "regex:nothing_matches"}, "selects no parameter"),
        ({"optimizer": "sgd", "lr": "1e30"}, "lower --lr"),
    ],
)
def test_bad_query_or_option_is_one_line_error(model_dir, corpus, tmp_path, extra, expected):
    out = tmp_path / "run"
    result = invoke(*base_args(model_dir, corpus, tmp_path, out=out, **extra))
    assert_one_line_error(result, expected)
    assert not (out / "summary.json").exists()


def test_missing_or_wrong_model_is_one_line_error(corpus, tmp_path):
    result = invoke(*base_args(tmp_path / "nope", corpus, tmp_path))
    assert_one_line_error(result, "does not exist")
    from transformers import DistilBertConfig, DistilBertModel

    not_causal = tmp_path / "bert"
    tokenizer = make_tiny_tokenizer()
    DistilBertModel(
        DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    ).save_pretrained(not_causal)
    tokenizer.save_pretrained(not_causal)
    assert_one_line_error(invoke(*base_args(not_causal, corpus, tmp_path)), "not a causal LM")


def test_stale_cache_is_refused_until_rebuilt(model_dir, corpus, tmp_path):
    assert invoke(*base_args(model_dir, corpus, tmp_path)).exit_code == 0
    stale = base_args(model_dir, corpus, tmp_path)
    stale[stale.index("--max-length") + 1] = "16"
    assert_one_line_error(invoke(*stale), "--rebuild-cache")
    assert invoke(*stale, "--rebuild-cache").exit_code == 0


def test_queries_file_and_granularity(model_dir, corpus, tmp_path):
    queries = _write(
        tmp_path,
        "q.jsonl",
        "".join(
            json.dumps(q) + "\n"
            for q in [
                {"id": "a", "prompt": "Water boils at", "completion": " one hundred degrees"},
                {"id": "b", "prompt": "The quick brown", "completion": " fox jumps"},
            ]
        ),
    )
    args = [
        "attribute",
        "--model",
        model_dir,
        "--corpus",
        corpus,
        "--queries",
        queries,
        "--cache-dir",
        tmp_path / "cache",
        "--quiet",
        "--granularity",
        "source",
        "--out",
        tmp_path / "run",
    ]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "query 'a'" in result.output and "query 'b'" in result.output
    sources = pd.read_parquet(tmp_path / "run" / "sources.parquet")
    assert set(sources["query_id"]) == {"a", "b"} and set(sources["source"]) == {"s0", "s1"}
    bad = _write(tmp_path, "bad.jsonl", '{"id": "a", "prompt": "x"}\n')
    assert_one_line_error(invoke(*args[:6], bad, *args[7:]), "completion")


def test_every_config_field_has_a_flag_except_the_yaml_only_ones():
    import inspect

    from bgotrace.cli.attribute import _YAML_ONLY, SECTION_OF, attribute

    flags = set(inspect.signature(attribute).parameters)
    assert set(SECTION_OF) <= flags  # each derived config key is an option of the command
    assert _YAML_ONLY.isdisjoint(SECTION_OF)
