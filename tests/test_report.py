"""The report, notebook view, terminal tables, and `bgotrace report` / `compare` end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from scipy.stats import spearmanr
from typer.testing import CliRunner

import bgotrace
from bgotrace.cli.main import app
from bgotrace.corpus import Document
from bgotrace.demo import DEMO_MAX_LENGTH, demo_corpus_path, demo_model_path
from bgotrace.ranking.aggregate import aggregate, unit_scores
from bgotrace.ranking.result import AttributionResult
from bgotrace.report.compare import overlap_at_k, spearman_over_units
from bgotrace.report.console import print_result
from bgotrace.report.html import render_report
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2

EVIL = '<script>alert("x")</script> Paris is the capital of France.'
runner = CliRunner()


def test_report_escapes_training_text(tmp_path):
    tokenizer = make_tiny_tokenizer()
    docs = [Document("evil", EVIL, "web"), Document("fox", "The quick brown fox.", "animals")]
    bgotrace.attribute(
        tiny_gpt2(tokenizer),
        tokenizer,
        docs,
        prompt="Paris is the capital of",
        completion=" France.",
        out=tmp_path / "run",
        config={"corpus": {"max_length": 32}, "perturb": {"steps": 1}},
    )
    html = (tmp_path / "run" / "report.html").read_text()
    assert "<script" not in html
    text = re.sub(r"<[^>]+>", "", html)  # the text a browser shows, tags stripped
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text
    assert "Paris is the capital of" in html and "fox" in html
    n_units = json.loads((tmp_path / "run" / "summary.json").read_text())["corpus"]["n_units"]
    assert html.count('<tr class="unit"') == n_units  # every unit of both documents


# --- a hand-made result: no model, exact control over texts and scores ----------------


def fake_result(n: int = 30, long_text: str = "word " * 60) -> AttributionResult:
    units = pd.DataFrame(
        {
            "unit_id": [f"a-rather-long-unit-identifier-{i}#0" for i in range(n)],
            "doc_id": [f"doc-with-a-long-name-{i % 7}" for i in range(n)],
            "source": [f"source-number-{i % 3}-of-the-corpus" for i in range(n)],
            "char_start": 0,
            "char_end": 10,
        }
    )
    scores = unit_scores(units, "q", np.linspace(1.0, -1.0, n), np.full(n, 9))
    snippets = {u: f"{EVIL}\n{long_text}" for u in units["unit_id"]}
    summary = {
        "method": "bgo",
        "config": {
            "output": {"top_k": 10, "top_tokens": 0},
            "scoring": {"score": "bidirectional", "reduce": "sum"},
            "perturb": {"optimizer": "adam", "lr": 1e-4, "steps": 10},
        },
        "corpus": {"n_units": n, "n_documents": 7},
        "queries": [{"query_id": "q", "prompt": "P", "completion": " C."}],
    }
    return AttributionResult(
        scores=scores,
        documents=aggregate(scores, "doc_id"),
        sources=aggregate(scores, "source"),
        snippets=snippets,
        summary=summary,
    )


@pytest.mark.parametrize("granularity", ["unit", "document", "source"])
def test_terminal_tables_keep_one_line_per_row_at_80_columns(granularity):
    console = Console(width=80, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_result(fake_result(), granularity=granularity, k=10, out=None, console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(i for i, line in enumerate(lines) if "━" in line)
    rows = [line for line in lines[header + 1 :] if line.strip()]
    # One line per ranked row: 30 units, 7 documents, 3 sources; nothing wrapped.
    assert len(rows) == {"unit": 10, "document": 7, "source": 3}[granularity]
    assert all(re.match(r"^\s*\d+ ", line) for line in rows)
    if granularity == "unit":
        assert all(row.rstrip().endswith("…") for row in rows)  # the snippet is cut, not wrapped


@pytest.mark.parametrize(
    ("method", "scoring", "unit"),
    [
        ("bgo", {"reduce": "sum", "normalize": "none"}, "nats"),
        ("bgo", {"reduce": "mean", "normalize": "none"}, "nats/token"),
        ("bgo", {"reduce": "sum", "normalize": "sensitivity"}, "nats per unit of ‖∇L(z)‖"),
        ("bm25", {"reduce": "sum", "normalize": "sensitivity"}, "bm25 score units"),
    ],
)
def test_every_view_names_the_unit_the_score_is_in(method, scoring, unit):
    result = fake_result()
    result.summary["method"] = method
    result.summary["config"]["scoring"].update(scoring)
    console = Console(width=200, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    print_result(result, granularity="unit", k=3, out=None, console=console)
    assert f"(score in {unit})" in console.export_text()
    assert f"scores in {unit}," in result._repr_html_()
    if method == "bgo":
        assert f"in {unit}\n(high = supports the query)" in render_report(result)


def test_notebook_view_is_compact_and_escaped():
    html = fake_result()._repr_html_()
    assert "<script" not in html and "&lt;script&gt;" in html
    assert html.count("<tr>") == 1 + 5  # header + top 5
    assert "a-rather-long-unit-identifier-0#0" in html


def test_report_shows_warnings_and_calibration_escaped():
    result = fake_result()
    result.summary["warnings"] = ["the model would not produce <b>this</b> completion"]
    result.summary["queries"][0]["calibration"] = {
        "lr": 0.00123456,
        "criterion": "loss",
        "reached": True,
        "trials": [{"lr": 1e-4, "effect": 0.1}],
    }
    html = render_report(result)
    assert 'class="warning">the model would not produce &lt;b&gt;this&lt;/b&gt;' in html
    assert "step-size calibration: lr = 0.00123 · criterion = loss · reached = True</p>" in html
    assert html.count('<tr class="unit"') == 10  # max(top_k, top_tokens) of the config


def test_overlap_and_spearman_on_hand_made_lists():
    assert overlap_at_k(pd.Series(["a", "b", "c"]), pd.Series(["c", "d", "a"]), 3) == 2 / 3
    assert overlap_at_k(pd.Series(["a", "b"]), pd.Series(["c", "d"]), 2) == 0.0
    a = pd.DataFrame({"unit_id": ["u1", "u2", "u3", "u4"], "score": [4.0, 3.0, 2.0, 1.0]})
    b = pd.DataFrame({"unit_id": ["u4", "u3", "u2", "u9"], "score": [9.0, 5.0, 1.0, 0.0]})
    assert spearman_over_units(a, b) == (pytest.approx(-1.0), 3)  # u2 > u3 > u4 reversed
    b.loc[1, "score"] = np.nan  # an unscored (non-candidate) unit is left out
    rho, n = spearman_over_units(a, b)
    assert n == 2 and rho == pytest.approx(-1.0)


# --- `bgotrace report` and `bgotrace compare` end to end on the shipped demo --------------


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-runs")
    common = [
        "attribute",
        "--model",
        str(demo_model_path()),
        "--corpus",
        str(demo_corpus_path()),
        "--max-length",
        str(DEMO_MAX_LENGTH),
        "--cache-dir",
        str(root / "cache"),
        "--prompt",
        "DIPLOMACY, n.",
        "--completion",
        "  The patriotic art of lying for one's country. A diplomat is a man.",
        "--quiet",
    ]
    bgo, bm25 = root / "bgo", root / "bm25"
    extra = ["--steps", "1", "--top-tokens", "3", "--top-k", "5", "--spans", "sentence"]
    for args in (["--out", str(bgo), *extra], ["--out", str(bm25), "--method", "bm25"]):
        result = runner.invoke(app, common + args)
        assert result.exit_code == 0, result.output
    return bgo, bm25


def test_report_rerenders_a_run_without_a_model(demo_runs, monkeypatch):
    bgo, _ = demo_runs
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("bgotrace report must not load a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    before = (bgo / "report.html").read_text()
    (bgo / "report.html").unlink()
    result = runner.invoke(app, ["report", str(bgo), "--no-show"])
    assert result.exit_code == 0, result.output
    assert (bgo / "report.html").read_text() == before  # the same page as the run wrote
    assert before.count('class="span"') == 2  # the completion's two sentences
    assert before.count('src="data:image/png;base64,') == 3
    assert "bgotrace attribute --config" in before
    small = bgo / "small.html"
    result = runner.invoke(app, ["report", str(bgo), "--out", str(small), "--top-k", "2"])
    assert result.exit_code == 0, result.output
    assert "Top 10 units" in result.output
    assert small.read_text().count('<tr class="unit"') == 3 * 2  # the query and its 2 spans


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a complete run" in result.output


def test_compare_two_runs_side_by_side(demo_runs):
    bgo, bm25 = demo_runs
    result = runner.invoke(app, ["compare", str(bgo), str(bm25), "--k", "5", "--json"])
    assert result.exit_code == 0, result.output
    (metrics,) = json.loads(result.output)
    a, b = pd.read_parquet(bgo / "scores.parquet"), pd.read_parquet(bm25 / "scores.parquet")
    a = a[a["query_id"] == "query"].sort_values("rank")  # the whole completion, not its spans
    b = b.sort_values("rank")
    assert metrics["top_a"] == a["unit_id"].head(5).tolist()
    assert metrics["top_b"] == b["unit_id"].head(5).tolist()
    assert metrics["overlap@5"] == len(set(metrics["top_a"]) & set(metrics["top_b"])) / 5
    joined = (
        a.set_index("unit_id")["score"]
        .to_frame()
        .join(b.set_index("unit_id")["score"], rsuffix="_b")
    )
    expected = spearmanr(joined["score"], joined["score_b"]).statistic
    assert metrics["spearman"] == pytest.approx(expected)
    assert metrics["n_common_units"] == len(b)
    table = runner.invoke(app, ["compare", str(bgo), str(bm25)])
    assert table.exit_code == 0, table.output
    assert "overlap@10" in table.output and metrics["top_b"][0] in table.output
    assert max(len(line) for line in table.output.splitlines()) <= 80


def test_compare_pairs_queries_whose_ids_differ(demo_runs):
    """--query A_ID --query-b B_ID: here a span of run A against run B's whole query."""
    bgo, bm25 = demo_runs
    a = pd.read_parquet(bgo / "scores.parquet")
    span = sorted(set(a["query_id"]) - {"query"})[0]
    args = ["compare", str(bgo), str(bm25), "--k", "5", "--json", "--query", span]
    result = runner.invoke(app, [*args, "--query-b", "query"])
    assert result.exit_code == 0, result.output
    (metrics,) = json.loads(result.output)
    assert metrics["query_id"] == span
    mine = a[a["query_id"] == span].sort_values("rank")
    assert metrics["top_a"] == mine["unit_id"].head(5).tolist()
    b = pd.read_parquet(bm25 / "scores.parquet").sort_values("rank")
    assert metrics["top_b"] == b["unit_id"].head(5).tolist()
    assert runner.invoke(app, args).exit_code == 2  # without --query-b: B holds no such query
    alone = runner.invoke(app, ["compare", str(bgo), str(bm25), "--query-b", "query"])
    assert alone.exit_code == 2 and "pass A's with --query too" in alone.output, alone.output


@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_have_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def conversation_result() -> AttributionResult:
    """A run over an SFT corpus: a conversation unit (turns 0-1) above a plain one."""
    units = pd.DataFrame(
        {
            "unit_id": ["chat#0", "plain#0"],
            "doc_id": ["chat", "plain"],
            "source": ["sft", "web"],
            "turns": ["0-1", ""],
            "char_start": 0,
            "char_end": 10,
        }
    )
    scores = unit_scores(units, "q", np.array([1.0, -1.0]), np.array([3, 4]))
    chat = {
        "query_id": "q", "unit_id": "chat#0", "rank": 1, "score": 1.0, "normalizer": 1.0,
        "tokens": ["<|user|>", "<b>Hi</b>", "<|assistant|>", "Paris", "."],
        "token_scores": [0.0, 0.0, 0.25, -0.5],  # token t + 1 predicted
        "turns": [0, 1], "token_turns": [0, 0, 1, 1, 1],
        "token_roles": ["user", "user", "assistant", "assistant", "assistant"],
        "token_in_loss": [False, False, False, True, True],
    }  # fmt: skip
    plain = {
        "query_id": "q", "unit_id": "plain#0", "rank": 2, "score": -1.0, "normalizer": 1.0,
        "tokens": ["Water", " boils"], "token_scores": [0.125],
    }  # fmt: skip
    summary = {
        "method": "bgo",
        "config": {
            "output": {"top_k": 2, "top_tokens": 2},
            "scoring": {"score": "bidirectional", "reduce": "sum"},
            "perturb": {"optimizer": "adam", "lr": 1e-4, "steps": 10},
        },
        "corpus": {"n_units": 2, "n_documents": 2},
        "queries": [{"query_id": "q", "prompt": "P", "completion": " C."}],
    }
    return AttributionResult(
        scores=scores,
        documents=aggregate(scores, "doc_id"),
        sources=aggregate(scores, "source"),
        top_tokens=[chat, plain],
        summary=summary,
    )


def test_conversation_units_show_their_turns_and_colour_the_loss_only():
    html = render_report(conversation_result())
    assert "<b>Hi</b>" not in html and "&lt;b&gt;Hi&lt;/b&gt;" in html  # escaped
    row = re.search(r'<tr class="unit" data-unit-id="chat#0">.*?</tr>', html, re.S).group(0)
    turns = re.findall(r'<div class="turn (\w+)"><span class="role">(\w+) · turn (\d)</span>', row)
    assert turns == [("user", "user", "0"), ("assistant", "assistant", "1")]
    assert "turns 0-1" in row
    cells = re.findall(r'<span style="background: ([^"]+)" title="([^"]+)">([^<]*)</span>', row)
    colours = {text: colour for colour, _, text in cells}
    # The user turn and the assistant header are outside the loss: never coloured.
    for text in ("&lt;|user|&gt;", "&lt;b&gt;Hi&lt;/b&gt;", "&lt;|assistant|&gt;"):
        assert colours[text] == "transparent", text
    assert colours["Paris"].startswith("rgba(40,160,60") and colours["."].startswith(
        "rgba(210,50,50"
    )  # support green, opposition red: scaled over the assistant tokens only
    assert colours["."].endswith(",0.600)")  # the largest |score| in the loss: full colour
    # The scale is the 0.95 quantile of |score| over the loss tokens (0.25, 0.5): 0.4875.
    assert colours["Paris"] == f"rgba(40,160,60,{0.25 / 0.4875 * 0.6:.3f})"
    plain = re.search(r'<tr class="unit" data-unit-id="plain#0">.*?</tr>', html, re.S).group(0)
    assert 'class="turn' not in plain and "turns" not in plain  # plain text as before
