"""Evaluation runners: tail-patch against a slow reference, retrain caching, ranking metrics on
hand-made scores, error cases, and a tiny end-to-end ``bench build`` + ``bench run``.

Tolerances: tail-patch deltas are differences of two float32 log-probabilities of ~20-40
nats, each summed over a few tokens, computed by ``cross_entropy`` in the library and by
``log_softmax`` in the reference: they agree to ~1e-6 relative, so atol 5e-5 nats.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from bgotrace.bench.build import BenchConfig, load_benchmark
from bgotrace.bench.runner import build_bench
from bgotrace.cache import get_token_cache
from bgotrace.cli.bench import bench_app
from bgotrace.cli.errors import user_errors
from bgotrace.cli.eval import eval_command, parse_options
from bgotrace.corpus import ChunkingConfig
from bgotrace.errors import ConfigError, InputError, RunDirectoryError
from bgotrace.eval import influence as inf
from bgotrace.eval.ranking_metrics import fact_tracing, source_attribution
from bgotrace.eval.retrain import RetrainCache, read_training_setup
from bgotrace.eval.runner import eligible_queries, run_eval
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.query import Query, encode_query
from bgotrace.ranking.order import rank_order
from bgotrace.train import TrainConfig
from tests.models import tiny_gpt2

ATOL_NATS = 5e-5
FAST_BGO = {"bgo": {"steps": 2}}


# --------------------------------------------------------------------------- fixtures


def _write_sources(root: Path) -> dict[str, str]:
    """Three small sources in the Debian formats, each with its own style (14 entries)."""
    fortunes = root / "fortunes"
    fortunes.mkdir()
    quips = [
        f"Fortune {i}: a wise cat naps by the stove, for the kettle {i} never boils when "
        f"watched and luck comes to those who wait {i} days."
        for i in range(14)
    ]
    (fortunes / "wisdom").write_text("\n%\n".join(quips) + "\n")
    devil = "".join(
        f"WORD{chr(65 + i)}, n.  A cynical name {i} for the plain habit of men who\n"
        f"praise their neighbours and despise them in equal measure.\n\n"
        for i in range(14)
    )
    (root / "devil.dict").write_text(devil)
    foldoc = "".join(
        f"term{i}\n\n   <jargon> A technical term {i} used by hackers for a {{compiler}}\n"
        f"   that optimises loops in the {{kernel}} of a computing system.\n\n"
        f"   (1999-07-{10 + i})\n\n"
        for i in range(14)
    )
    (root / "foldoc.dict").write_text(foldoc)
    return {"fortunes": str(fortunes), "devil": str(root / "devil.dict"),
            "foldoc": str(root / "foldoc.dict")}  # fmt: skip


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    return _write_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, sources):
    """A tiny benchmark and its base model (test preset, 1 epoch, facts seen twice)."""
    config = BenchConfig.preset("tiny", source_paths=sources)
    out = tmp_path_factory.mktemp("bench") / "tiny"
    return build_bench(
        out, config, TrainConfig(preset="test", epochs=1), fact_repeats=2, progress=False
    )


# --------------------------------------------------------------------------- tail-patch


def _ref_logprob(model, query) -> float:
    with torch.no_grad():
        logp = torch.log_softmax(model(query.input_ids).logits[0, :-1].float(), dim=-1)
    targets = query.labels[0, 1:]
    mask = targets != -100
    return float(logp[mask].gather(1, targets[mask][:, None]).sum())


def _ref_step(model, token_ids, step) -> torch.nn.Module:
    """Deep copy, one backward of the unit's loss, then ``step(copy)`` updates it in place."""
    ref = copy.deepcopy(model)
    ids = torch.tensor(token_ids.astype(np.int64))[None]
    ref(input_ids=ids, labels=ids).loss.backward()
    step(ref)
    return ref


@pytest.fixture(scope="module")
def patch_setup(tiny_tokenizer, tmp_path_factory):
    from tests.conftest import Document

    docs = [
        Document("a", "The quick brown fox jumps over the lazy dog.", "s1"),
        Document("b", "Paris is the capital of France, and Rome of Italy.", "s2"),
        Document("c", "Water boils at one hundred degrees and ice melts.", "s1"),
        Document("d", "Rivers carry sand to the sea while forests grow.", "s2"),
    ]
    root = tmp_path_factory.mktemp("tp") / "cache"
    cache = get_token_cache(docs, tiny_tokenizer, ChunkingConfig(16), root, progress=False)
    queries = [
        encode_query(Query("q1", "Paris is the capital of", " France."), tiny_tokenizer, None),
        encode_query(Query("q2", "The quick brown", " fox jumps."), tiny_tokenizer, None),
    ]
    return tiny_gpt2(tiny_tokenizer), cache, queries


def test_tail_patch_sgd_matches_slow_reference(patch_setup) -> None:
    model, cache, queries = patch_setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = inf.TailPatchConfig(ks=(1, 2), lr=0.05)
    patcher = inf.TailPatcher(model, cache, queries, config)
    units = np.array([[0, 2], [1, 2]])
    got = patcher.deltas(units)

    def sgd(m):
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.05 * p.grad

    for qi, row in enumerate(units):
        for j, u in enumerate(row):
            ref = _ref_step(model, cache.unit_tokens(int(u)), sgd)
            want = _ref_logprob(ref, queries[qi]) - _ref_logprob(model, queries[qi])
            assert got[qi, j] == pytest.approx(want, abs=ATOL_NATS)
    assert patcher.n_steps == 3  # unit 2 is shared by both queries: one gradient
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_tail_patch_adam_matches_torch_adam(patch_setup, tmp_path) -> None:
    model, cache, queries = patch_setup
    names = [n for n, _ in model.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    m = {n: 1e-3 * torch.randn(params[n].shape, generator=gen) for n in names}
    v = {n: 1e-4 * torch.rand(params[n].shape, generator=gen) + 1e-6 for n in names}
    tensors = {f"exp_avg.{n}": m[n] for n in names} | {f"exp_avg_sq.{n}": v[n] for n in names}
    path = tmp_path / "optimizer_state.safetensors"
    save_file(tensors, str(path), metadata={"step": "10", "betas": "[0.9, 0.95]", "eps": "1e-08"})
    state = inf.load_adam_state(path, names, torch.device("cpu"))
    config = inf.TailPatchConfig(ks=(1,), optimizer="adam", lr=1e-3)
    got = inf.TailPatcher(model, cache, queries, config, state).deltas(np.array([[3], [3]]))

    def adam(ref):
        ref_params = dict(ref.named_parameters())
        opt = torch.optim.Adam(ref.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
        for n, p in ref_params.items():
            opt.state[p] = {"step": torch.tensor(10.0), "exp_avg": m[n].clone(),
                            "exp_avg_sq": v[n].clone()}  # fmt: skip
        opt.step()

    ref = _ref_step(model, cache.unit_tokens(3), adam)
    for qi, query in enumerate(queries):
        want = _ref_logprob(ref, query) - _ref_logprob(model, query)
        assert got[qi, 0] == pytest.approx(want, abs=ATOL_NATS)


def test_tail_patch_random_control_is_shared_and_summarised(patch_setup) -> None:
    model, cache, queries = patch_setup
    patcher = inf.TailPatcher(model, cache, queries, inf.TailPatchConfig(ks=(1, 2)))
    qids = ["q1", "q2"]
    up = np.arange(len(cache), dtype=np.float64)
    scores = {"up": np.stack([up, -up]), "down": np.stack([-up, up])}
    results = inf.tail_patch(patcher, scores, qids)
    a, b = results["up"], results["down"]
    assert a.topk.shape == a.random.shape == (2, 2)
    np.testing.assert_array_equal(a.random, b.random)  # same control units for every method
    control = {int(u) for qid in qids for u in inf.random_units(len(cache), qid, 2, seed=0)}
    n = len(cache)
    assert patcher.n_steps == len(control | {n - 1, n - 2, 0, 1})  # one gradient per unit
    summary = a.summary(2)
    assert summary.topk.mean == pytest.approx(a.topk.mean())
    assert summary.difference.mean == pytest.approx((a.topk - a.random).mean())
    with pytest.raises(ConfigError, match="sgd or adam"):
        inf.TailPatchConfig(optimizer="lion")


# --------------------------------------------------------------------------- ranking metrics


UNITS = pd.DataFrame(
    {"unit_id": ["d1#0", "d1#1", "d2#0", "d3#0", "d4#0"],
     "doc_id": ["d1", "d1", "d2", "d3", "d4"],
     "source": ["A", "A", "B", "B", "C"]}
)  # fmt: skip


def test_fact_tracing_on_hand_made_scores() -> None:
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.2, 0.0],  # docs by max: d1 .9, d2 .5, d3 .2, d4 0
            [0.4, 0.4, 0.7, 0.1, 0.0],  # by max: d2 .7, d1 .4; by sum: d1 .8, d2 .7
        ]
    )
    queries = [
        {"id": "f1", "relevant_doc_ids": ["d2", "d3"]},
        {"id": "f2", "relevant_doc_ids": ["d1"]},
    ]
    got = fact_tracing(scores, UNITS, queries).set_index(["query_id", "metric"])["value"]
    assert got["f1", "recall@1"] == 0.0 and got["f1", "mrr"] == 0.5
    assert got["f1", "recall@10"] == 1.0  # both relevant documents are in the top 10
    assert got["f2", "mrr"] == 0.5 and got["f2", "recall@1"] == 0.0
    by_sum = fact_tracing(scores, UNITS, queries, reduce="sum").set_index(["query_id", "metric"])
    assert by_sum["value"]["f2", "mrr"] == 1.0  # sum favours d1's two units


def test_source_attribution_on_hand_made_scores() -> None:
    scores = np.array([[0.1, 0.2, 0.9, 0.8, 0.3]])  # source means: A .15, B .85, C .3
    got = source_attribution(scores, UNITS, [{"id": "s1", "true_source": "A"}])
    values = dict(zip(got["metric"], got["value"], strict=True))
    assert values["source_rank"] == 3.0
    assert values["precision@10"] == pytest.approx(2 / 5)  # the ranking has only 5 units


def test_ties_are_broken_randomly_but_reproducibly() -> None:
    flat = np.zeros(50)
    first, again = rank_order(flat, "q"), rank_order(flat, "q")
    np.testing.assert_array_equal(first, again)
    assert sorted(first.tolist()) == list(range(50)) and first.tolist() != list(range(50))
    assert rank_order(np.array([1.0, np.nan, 2.0]), "q").tolist() == [2, 0, 1]  # NaN last


def test_lds_subsets_values_and_sign_refusal() -> None:
    masks = inf.lds_subsets(10, inf.LDSConfig(n_subsets=4))
    assert masks.shape == (4, 10) and (masks.sum(1) == 5).all()
    scores = np.array([np.arange(10.0), np.full(10, np.nan)])
    losses = -(masks @ np.arange(10.0))[:, None].repeat(2, axis=1)  # perfectly predicted
    got = inf.lds_values(masks, scores, losses)
    assert got[0] == pytest.approx(1.0) and np.isnan(got[1])
    from bgotrace.baselines import get_attributor

    assert inf.unsigned_reason(get_attributor("bgo", score="abs")) is not None
    assert inf.unsigned_reason(get_attributor("bgo")) is None


# --------------------------------------------------------------------------- retraining


def test_retrains_remove_every_copy_and_are_cached(built, tmp_path) -> None:
    bench = load_benchmark(built.bench_dir)
    _, tokenizer = load_model_and_tokenizer(built.model_dir)
    setup = read_training_setup(built.model_dir, bench)
    assert setup.fact_repeats == 2 and len(setup.documents) > len(bench.documents)
    base_docs = setup.documents[: len(bench.documents)]
    cache = get_token_cache(base_docs, tokenizer, setup.chunking, tmp_path / "t", progress=False)
    ids, sources = cache.units["unit_id"].tolist(), cache.units["source"].tolist()
    fact = sources.index("facts")
    record = next(q for q in bench.queries if q["kind"] == "fact")
    query = encode_query(
        Query(record["id"], record["prompt"], record["completion"]), tokenizer, 128
    )
    removed = np.array([[[fact, 0], [fact, 0]]])  # (q=1, seeds=2, k=2)
    retrains = RetrainCache(tmp_path / "r", setup, tokenizer, ids, sources)
    losses = inf.removal_losses(retrains, [query], removed, (0, 1))
    assert retrains.trained == 2 and losses.shape == (1, 2)
    summary = json.loads((retrains.model_dir([fact, 0], 0) / "train_config.json").read_text())
    doc, _, k = ids[fact].rpartition("#")
    assert set(summary["excluded_units"]) == {ids[fact], f"{doc}~rep1#{k}", ids[0]}
    again = RetrainCache(tmp_path / "r", setup, tokenizer, ids, sources)
    np.testing.assert_array_equal(inf.removal_losses(again, [query], removed, (0, 1)), losses)
    assert again.trained == 0
    # The no-removal retrain with the base seed is the base model itself, bit for bit.
    assert again.model_dir([], setup.config.seed) == built.model_dir
    again._train([], setup.config.seed, tmp_path / "replay")
    replay, _ = load_model_and_tokenizer(tmp_path / "replay")
    base, _ = load_model_and_tokenizer(built.model_dir)
    assert all(
        torch.equal(a, b) for a, b in zip(replay.parameters(), base.parameters(), strict=True)
    )


# --------------------------------------------------------------------------- errors


def test_unknown_names_and_missing_ground_truth(built) -> None:
    with pytest.raises(ConfigError, match="Unknown method 'nope'.*bm25"):
        run_eval(built.bench_dir, built.model_dir, ["nope"], ["fact"])
    with pytest.raises(ConfigError, match="Unknown metric 'mrr'.*tail-patch"):
        run_eval(built.bench_dir, built.model_dir, ["bm25"], ["mrr"])
    style = [{"id": "s", "kind": "style", "true_source": "A"}]
    with pytest.raises(InputError, match="'fact' needs fact queries with 'relevant_doc_ids'"):
        eligible_queries(style, ["fact"], "test")
    eligible, notes = eligible_queries(style + [{"id": "f", "relevant_doc_ids": ["d"]}],
                                       ["fact", "lds"], "test")  # fmt: skip
    assert eligible == {"fact": [1], "lds": [0, 1]} and notes == [
        "fact: 1 queries skipped (not fact queries with 'relevant_doc_ids')."
    ]
    with pytest.raises(ConfigError, match="LDS .* signed.*score=abs"):
        run_eval(built.bench_dir, built.model_dir, ["bgo"], ["lds"],
                 options={"method_options": {"bgo": {"score": "abs"}}})  # fmt: skip


def test_other_benchmark_version_and_foreign_model_are_refused(built, tmp_path) -> None:
    old = tmp_path / "old"
    shutil.copytree(built.bench_dir, old, ignore=shutil.ignore_patterns("model", "retrains"))
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(InputError, match="format version 0 .* reads version 1"):
        run_eval(old, built.model_dir, ["bm25"], ["fact"])
    foreign = tmp_path / "foreign"
    shutil.copytree(built.model_dir, foreign)
    summary = json.loads((foreign / "train_config.json").read_text())
    summary["corpus_fingerprint"] = "0" * 64
    (foreign / "train_config.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match="not trained on the corpus of benchmark"):
        run_eval(built.bench_dir, foreign, ["bm25"], ["fact"], split="all")
    (tmp_path / "exists").mkdir()
    with pytest.raises(RunDirectoryError, match="exists"):
        run_eval(built.bench_dir, built.model_dir, ["bm25"], ["fact"], out=tmp_path / "exists")


def test_queries_follow_the_training_units_bos(built, tmp_path) -> None:
    """The eval encodes queries with the BOS the recorded training chunking put on units."""
    from bgotrace.eval.runner import EvalOptions, _load

    bench = load_benchmark(built.bench_dir)
    records = bench.queries[:2]
    plain = _load(bench, built.model_dir, records, EvalOptions())
    with_bos = tmp_path / "model-bos"
    shutil.copytree(built.model_dir, with_bos)
    summary = json.loads((with_bos / "train_config.json").read_text())
    bos = plain.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    summary["chunking"] = {**summary["chunking"], "bos_id": bos}
    (with_bos / "train_config.json").write_text(json.dumps(summary))
    marked = _load(bench, with_bos, records, EvalOptions())
    for a, b in zip(plain.queries, marked.queries, strict=True):
        assert b.input_ids[0, 0] == bos and b.input_ids[0, 1:].tolist() == a.input_ids[0].tolist()
        assert b.n_loss_tokens == a.n_loss_tokens
    assert all(int(marked.ctx.cache.unit_tokens(i)[0]) == bos for i in range(3))


def test_cli_errors_are_one_line_exit_2(built) -> None:
    app = typer.Typer()
    app.command("eval")(user_errors(eval_command))
    app.add_typer(bench_app, name="bench")
    args = ["eval", "--bench", str(built.bench_dir), "--model", str(built.model_dir)]
    result = CliRunner().invoke(app, [*args, "--methods", "bm25,nope"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "error: Unknown method 'nope'" in result.output
    result = CliRunner().invoke(app, [*args, "--option", "bgo.lr"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.output
    assert parse_options(["bgo.lr=1e-3", "lds.n_subsets=4", "doc_reduce=sum"]) == {
        "method_options": {"bgo": {"lr": 1e-3}}, "lds": {"n_subsets": 4}, "doc_reduce": "sum"
    }  # fmt: skip


# --------------------------------------------------------------------------- end to end


def test_bench_build_and_run_end_to_end(built, sources, tmp_path) -> None:
    """`bench build` (cached) then `bench run` with bm25, bgo and random on all metrics."""
    app = typer.Typer()
    app.add_typer(bench_app, name="bench")
    paths = [f"--source-path={k}={v}" for k, v in sources.items()]
    build = ["bench", "build", "--out", str(built.bench_dir), "--quick", "--fact-repeats", "2"]
    result = CliRunner().invoke(app, [*build, *paths, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "benchmark reused" in result.output and "model reused" in result.output
    out = tmp_path / "run"
    run = ["bench", "run", "--bench", str(built.bench_dir), "--out", str(out), "--quick",
           "--methods", "bm25,bgo,random", "--option", "bgo.steps=2", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, run)
    assert result.exit_code == 0, result.output
    names = {"results.csv", "results.md", "per_query.parquet", "results.png", "eval.json"}
    assert names <= {p.name for p in out.iterdir()}
    table = pd.read_csv(out / "results.csv")
    assert set(table["family"]) == {"fact", "source", "tail-patch", "leave-k-out", "lds", "hubs"}
    finite = table.dropna(subset=["mean"])
    assert (
        (finite["lo"] <= finite["mean"] + 1e-12) & (finite["mean"] <= finite["hi"] + 1e-12)
    ).all()
    controls = set(zip(table["method"], table["metric"], strict=True))
    assert {("random-k", "tail_patch@2"), ("random-k", "lko_increase")} <= controls
    assert ("no-removal", "lko_seed_sd") in controls and ("bgo", "lko_vs_random_seeds") in controls
    assert (
        (table.loc[table["metric"] == "lko_vs_random_seeds", "interval"])
        .str.contains("seeds")
        .all()
    )
    record = json.loads((out / "eval.json").read_text())
    assert record["command"].startswith("bgotrace") and record["seeds"]["leave_k_out_retrains"] == [
        0,
        1,
    ]
    assert "## leave-k-out" in (out / "results.md").read_text()
    # A rerun needs no retrain: leave-k-out and LDS models are cached under the benchmark.
    again = run_eval(built.bench_dir, built.model_dir, ["bm25"], ["leave-k-out", "lds"],
                     seeds=(0, 1), options=_quick())  # fmt: skip
    assert again.record["wall_time_s"]["metrics"]["retrains_trained"] == 0


def _quick() -> dict:
    from bgotrace.bench.runner import quick_options

    return quick_options()


@pytest.mark.slow
def test_full_benchmark(tmp_path) -> None:
    """The shipped benchmark end to end (Debian texts, `small` preset): hours on 2 CPU cores."""
    if not Path("/usr/share/dictd/devil.dict.dz").exists():
        pytest.skip("needs Debian's fortunes, dict-devil and dict-foldoc")
    built = build_bench(tmp_path / "bench", BenchConfig(), TrainConfig(preset="small", epochs=10))
    result = run_eval(built.bench_dir, built.model_dir, ["all"], ["all"], out=tmp_path / "run")
    assert result.value("bm25", "mrr") > result.value("random", "mrr")
