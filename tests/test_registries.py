"""Score variants and output writers are registries: one entry each, read by every stage and view.

The examples of a one-place change are checked here: the ``agree`` variant (against a hand
computation and end to end against the one-sided runs it combines) and the optional
``top_units`` writer (against the ranked scores), plus a variant and a writer a user
registers in the test itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import bgotrace
from bgotrace import variants
from bgotrace.cli.main import app
from bgotrace.config import ScoreConfig, help_of
from bgotrace.corpus import Document
from bgotrace.errors import ConfigError
from bgotrace.ranking import writers
from bgotrace.ranking.result import AttributionResult, score_unit
from bgotrace.ranking.writers import Writer, register_writer, save_result, selected_writers
from bgotrace.report.html import render_report, score_formula
from bgotrace.score.store import RunStore
from bgotrace.variants import ASCENT, BASE, DESCENT, ScoreVariant, get_variant, register_variant
from tests.conftest import make_tiny_tokenizer
from tests.models import tiny_gpt2
from tests.test_report import fake_result

AGREE = "min(L(z; θ−) − L(z; θ0), L(z; θ0) − L(z; θ+))"
DOCS = [
    Document("fox", "The quick brown fox jumps over the lazy dog.", "animals"),
    Document("cat", "The cat sleeps on a warm mat while rivers carry sand.", "animals"),
    Document("paris", "Paris is the capital of France, Berlin of Germany.", "geo"),
    Document("rome", "Rome is the capital of Italy and Madrid of Spain.", "geo"),
    Document("water", "Water boils at one hundred degrees and ice melts at zero.", "science"),
    Document("code", "def add(a, b): return a + b", "code"),
]


@pytest.fixture
def own_registries(monkeypatch):
    """Registries a test may extend; the entries it adds vanish afterwards."""
    monkeypatch.setattr(variants, "_VARIANTS", dict(variants._VARIANTS))
    monkeypatch.setattr(writers, "_WRITERS", dict(writers._WRITERS))


# --- score variants ----------------------------------------------------------------------


def test_agree_is_the_smaller_one_sided_change_by_hand():
    losses = {
        ASCENT: np.array([3.0, 2.5, 1.0, 2.0]),
        BASE: np.array([2.0, 2.0, 2.0, 2.0]),
        DESCENT: np.array([1.0, 1.9, 1.5, 3.0]),
    }
    # ascent change (θ− − θ0): 1.0, 0.5, -1.0, 0.0; descent change (θ0 − θ+): 1.0, 0.1, 0.5, -1.0
    expected = np.array([1.0, 0.1, -1.0, -1.0])
    np.testing.assert_allclose(variants.score_losses("agree", losses), expected, atol=1e-12)
    per_token = {k: np.stack([v, v[::-1]]) for k, v in losses.items()}  # (2, 4): elementwise
    np.testing.assert_allclose(
        variants.score_losses("agree", per_token), np.stack([expected, expected[::-1]]), atol=1e-12
    )


@pytest.mark.parametrize("name", variants.variant_names())
def test_every_variant_reads_only_the_states_it_declares(name):
    variant = get_variant(name)
    rng = np.random.default_rng(0)
    losses = {s: rng.normal(size=5) for s in variant.states}  # a KeyError if it reads more
    assert variant.combine(losses).shape == (5,)
    assert f"{variant.name}: {variant.formula}" in help_of(ScoreConfig, "score")


def test_a_registered_variant_reaches_the_config_and_every_view(own_registries):
    with pytest.raises(ConfigError, match=r"--score='twice' is unknown: use one of .*agree"):
        ScoreConfig(score="twice")
    register_variant(
        ScoreVariant(
            "twice",
            (ASCENT, DESCENT),
            lambda losses: 2 * (losses[ASCENT] - losses[DESCENT]),
            "2·(L(z; θ−) − L(z; θ+))",
            unit="half-nats",
        )
    )
    assert ScoreConfig(score="twice").score == "twice"
    result = fake_result()
    result.summary["config"]["scoring"]["score"] = "twice"
    assert score_unit(result.summary) == "half-nats" == result.score_unit
    assert score_formula(result.summary["config"]) == "2·(L(z; θ−) − L(z; θ+))"
    assert "score = 2·(L(z; θ−) − L(z; θ+)) in half-nats" in render_report(result)


def test_variant_entries_are_checked(own_registries):
    ok = (lambda losses: losses[ASCENT], "L(z; θ−)")
    with pytest.raises(ConfigError, match="not a CLI word"):
        ScoreVariant("Two Words", (ASCENT,), *ok)
    with pytest.raises(ConfigError, match="each one of ascent, descent, base"):
        ScoreVariant("theta", ("theta_star",), *ok)
    with pytest.raises(ConfigError, match="name at least one"):
        ScoreVariant("nothing", (), *ok)
    with pytest.raises(ConfigError, match="'agree' is already registered"):
        register_variant(ScoreVariant("agree", (ASCENT,), *ok))


def test_lds_refuses_the_non_additive_variants():
    from bgotrace.baselines import get_attributor
    from bgotrace.eval import influence as inf

    assert "score=agree" in (inf.unsigned_reason(get_attributor("bgo", score="agree")) or "")
    assert inf.unsigned_reason(get_attributor("bgo", score="descent")) is None


def _attribute(model, tokenizer, tmp_path, score, out=None, formats=""):
    config = {
        "corpus": {"max_length": 12, "stride": 4, "cache_dir": str(tmp_path / "cache")},
        "perturb": {"optimizer": "adam", "lr": 3e-3, "steps": 3},
        "scoring": {"score": score, "reduce": "sum", "normalize": "none"},
        "output": {"top_tokens": 100, "top_k": 3, "formats": formats},
    }
    return bgotrace.attribute(
        model,
        tokenizer,
        DOCS,
        prompt="Paris is the capital of",
        completion=" France.",
        config=config,
        out=out,
    )


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = make_tiny_tokenizer()
    return tiny_gpt2(tokenizer), tokenizer


def test_agree_end_to_end_is_the_min_of_the_one_sided_runs(model_and_tokenizer, tmp_path):
    """θ± and θ0 are the same in the three runs (seeded), so agree = min(ascent, descent)
    per unit and per token, up to float32 summation order (atol 1e-6 nats)."""
    model, tokenizer = model_and_tokenizer
    runs = {s: _attribute(model, tokenizer, tmp_path, s) for s in ("ascent", "descent")}
    agree = _attribute(model, tokenizer, tmp_path, "agree", out=tmp_path / "run")
    by_unit = {s: r.scores.set_index("unit_id")["score"] for s, r in runs.items()}
    got = agree.scores.set_index("unit_id")["score"]
    expected = np.minimum(by_unit["ascent"][got.index], by_unit["descent"][got.index])
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), atol=1e-6)
    one_sided = (by_unit["ascent"][got.index] - by_unit["descent"][got.index]).abs()
    assert one_sided.max() > 1e-3  # the two directions disagree: min picks a side per unit
    tokens = {
        s: {r["unit_id"]: r["token_scores"] for r in run.top_tokens} for s, run in runs.items()
    }
    for row in agree.top_tokens:
        pair = np.minimum(tokens["ascent"][row["unit_id"]], tokens["descent"][row["unit_id"]])
        np.testing.assert_allclose(row["token_scores"], pair, atol=2e-6)
    html = (tmp_path / "run" / "report.html").read_text()
    assert f"score = {AGREE} in nats" in html


# --- output writers ----------------------------------------------------------------------


def test_default_writers_write_each_file_as_before(tmp_path):
    result = fake_result()
    result.top_tokens = [{"query_id": "q", "unit_id": "u#0", "tokens": ["a"], "token_scores": []}]
    save_result(result, RunStore(tmp_path), selected_writers())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(
        ["scores.parquet", "documents.parquet", "sources.parquet", "top_tokens.jsonl"]
        + ["snippets.json", "report.html", "summary.json"]
    )
    assert (tmp_path / "top_tokens.jsonl").read_text() == json.dumps(result.top_tokens[0]) + "\n"
    assert (tmp_path / "summary.json").read_text() == json.dumps(result.summary, indent=2)
    assert (tmp_path / "snippets.json").read_text() == json.dumps(result.snippets, indent=1)
    assert (tmp_path / "report.html").read_text() == render_report(result)
    back = AttributionResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.scores, result.scores)
    assert back.top_tokens == result.top_tokens and back.snippets == result.snippets


def test_summary_is_written_last_so_a_failed_writer_leaves_an_incomplete_run(
    own_registries, tmp_path
):
    def broken(result, path):
        raise OSError("disk full")

    register_writer(Writer("broken", "broken.txt", broken))
    assert selected_writers()[-1].filename == "summary.json"
    with pytest.raises(OSError, match="disk full"):
        save_result(fake_result(), RunStore(tmp_path), selected_writers())
    assert (tmp_path / "report.html").is_file() and not (tmp_path / "summary.json").exists()


def test_writer_entries_are_checked(own_registries):
    def write(result, path):
        path.write_text("")

    with pytest.raises(ConfigError, match="cannot be listed in --formats"):
        Writer("a,b", "ab.txt", write)
    for bad in ("../escape.txt", "sub/dir.txt", "config.yaml", "state.json"):
        with pytest.raises(ConfigError, match="plain file name inside the run directory"):
            Writer("bad", bad, write)
    with pytest.raises(ConfigError, match="clashes with a registered writer"):
        register_writer(Writer("scores_again", "scores.parquet", write))
    with pytest.raises(ConfigError, match="clashes with a registered writer"):
        register_writer(Writer("top_units", "other.csv", write))


def test_top_units_csv_lists_each_querys_best_units(tmp_path):
    result = fake_result()
    result.summary["config"]["output"]["top_k"] = 4
    save_result(result, RunStore(tmp_path), selected_writers("top_units"))
    got = pd.read_csv(tmp_path / "top_units.csv")
    by_hand = result.scores.sort_values("score", ascending=False).head(4)  # one query, no ties
    assert got["unit_id"].tolist() == by_hand["unit_id"].tolist()
    assert got["rank"].tolist() == [1, 2, 3, 4]
    np.testing.assert_allclose(got["score"], by_hand["score"], rtol=1e-12)
    assert list(got.columns) == writers.TOP_UNITS_COLUMNS


def test_a_users_writer_runs_in_the_pipeline_and_unknown_ones_fail_first(
    own_registries, model_and_tokenizer, tmp_path
):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ConfigError, match="--formats names unknown output.*nope: use top_units"):
        _attribute(model, tokenizer, tmp_path, "bidirectional", tmp_path / "bad", "nope")
    assert not (tmp_path / "bad").exists()  # refused before the run directory was made

    def n_units(result, path):
        path.write_text(str(len(result.scores)))

    register_writer(Writer("n_units", "n_units.txt", n_units, default=False))
    run = tmp_path / "run"
    result = _attribute(model, tokenizer, tmp_path, "bidirectional", run, "top_units, n_units")
    assert (run / "n_units.txt").read_text() == str(len(result.scores))
    table = pd.read_csv(run / "top_units.csv")
    best = result.scores.sort_values("score", ascending=False).head(3)
    assert table["unit_id"].tolist() == best["unit_id"].tolist()
    assert not list(run.glob("*.part"))


def test_the_cli_takes_agree_and_top_units_and_refuses_an_unknown_format(
    model_and_tokenizer, tmp_path
):
    model, tokenizer = model_and_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d.doc_id, "text": d.text}) + "\n" for d in DOCS))
    args = ["attribute", "--model", tmp_path / "model", "--corpus", corpus, "--quiet"]
    args += ["--cache-dir", tmp_path / "cache", "--max-length", "12", "--steps", "2"]
    args += ["--prompt", "Paris is the capital of", "--completion", " France.", "--score", "agree"]
    run = tmp_path / "run"
    done = CliRunner().invoke(app, list(map(str, [*args, "--formats", "top_units", "--out", run])))
    assert done.exit_code == 0, done.output
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["scoring"]["score"], config["output"]["formats"]) == ("agree", "top_units")
    n_units = json.loads((run / "summary.json").read_text())["corpus"]["n_units"]
    assert len(pd.read_csv(run / "top_units.csv")) == min(config["output"]["top_k"], n_units)
    assert "report.html, top_units.csv)" in " ".join(done.output.split())  # the files listed
    bad = CliRunner().invoke(app, list(map(str, [*args, "--formats", "nope", "--out", run])))
    assert bad.exit_code == 2 and "--formats names unknown output(s) nope" in bad.output


def test_the_result_imports_no_view():
    code = (
        "import sys, bgotrace, bgotrace.ranking.result as r, bgotrace.ranking.writers as w\n"
        "views = [m for m in sys.modules if m.startswith('bgotrace.report')]\n"
        "assert not views and not r._NOTEBOOK_VIEW, views\n"
        # Through the package (bgotrace.AttributionResult) the report registers its views.
        "assert bgotrace.AttributionResult is r.AttributionResult and r._NOTEBOOK_VIEW\n"
        "assert 'report.html' in [x.filename for x in w.selected_writers()]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
