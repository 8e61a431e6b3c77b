"""Which ``--normalize`` holds on memorised data and keeps the ``cpu``-scale gains (issue 15).

    python benchmarks/normalise_protocol.py demo --entries 24         # ~15 min, loaded 2 cores
    bgotrace bench build --out /tmp/bench-cpu --bench-preset cpu --preset test --epochs 8
    python benchmarks/normalise_protocol.py bench --bench /tmp/bench-cpu \\
        --model /tmp/bench-cpu/model --split validation               # then --split test

BGO's raw scores are computed once per query set (``--normalize none``) and s(z) = ‖∇L(z)‖
once per corpus; every normalisation is then the raw score divided by its divisor, exactly
as the pipeline divides (``bgotrace.perturb.sensitivity``), so the settings differ in the
divisor only. Settings: none, sensitivity, damped λ ∈ {0.1, 0.3, 1, 3}.

``demo``: the shipped demo model and corpus; prompt ``"WORD, n."``, completion = the entry's
definition, for Devil's Dictionary entries ``WORD, n. …`` under 160 characters shuffled with
``random.Random(4)``: the first 24 (issue 15's check) are the validation split, the next 24
the test split. Printed per split: entries ranked first, MRR (95% bootstrap CI), and the
largest number of top-5s one unrelated unit appears in. The raw scores, s(z) and unit documents
are also saved to /tmp/normalise_protocol_demo.npz for re-analysis.
``bench``: fact MRR / recall@10, source precision@10 and hub share with their 95% CIs on one
split of a benchmark (``bgotrace eval``'s metrics, on the same scores). ``bench --saved FILE
--linear``: BGO's saved raw scores against ``bgo-linear``'s (scored here) under the default
normalisation, paired (issue 15 item 3 where a full ``bgotrace eval`` of both is too long).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from results_log import publish

from bgotrace.cli.demo import demo_config
from bgotrace.config import ScoreConfig
from bgotrace.eval.metrics import bootstrap_ci
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.sensitivity import cached_sensitivity, damped, score_divisors

SETTINGS: dict[str, Callable[[np.ndarray], np.ndarray | None]] = {
    "none": lambda s: None,
    "sensitivity": lambda s: s,
    **{
        f"damped λ={lam:g}": (lambda s, lam=lam: damped(s, lam))
        for lam in (0.1, 0.3, 0.5, 1.0, 3.0)
    },
    # the geometric mean of s and its median: a unit's divisor moves as √s, so a tiny-gradient
    # unit is inflated √ as much as under `sensitivity` (a candidate, not a shipped setting)
    "geometric √(s·median)": lambda s: np.sqrt(s * np.nanmedian(s)),
}
"""Each setting's divisor basis from s(z) (None: raw scores), as ``unit_normalizers`` builds it."""


def normalise(raw: np.ndarray, s: np.ndarray, setting: str) -> np.ndarray:
    basis = SETTINGS[setting](s)
    return raw if basis is None else raw / score_divisors(basis)


# --------------------------------------------------------------------------- demo


def demo_entries(n: int) -> list[dict]:
    """The Devil's Dictionary entries of issue 15's check, in its shuffled order."""
    from bgotrace.demo import demo_corpus_path

    rows = [json.loads(line) for line in demo_corpus_path().open(encoding="utf-8")]
    entries = [
        r
        for r in rows
        if r["source"] == "devils-dictionary"
        and r["text"].startswith(f"{r['id']}, n.")
        and len(r["text"]) < 160
    ]
    random.Random(4).shuffle(entries)
    return entries[:n]


def demo_raw_scores(n: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Raw BGO scores (n queries, units), s(z), each unit's doc id, each query's entry."""
    from bgotrace.config import OutputSpec, QuerySpec
    from bgotrace.demo import demo_model_path
    from bgotrace.modeling.loading import load_model_and_tokenizer
    from bgotrace.pipeline import load_inputs, run_attribution
    from bgotrace.query import Query

    entries = demo_entries(n)
    queries = [Query(e["id"], f"{e['id']}, n.", e["text"][len(e["id"]) + 4 :]) for e in entries]
    model, tok = load_model_and_tokenizer(demo_model_path(), device="cpu")
    cfg = demo_config(
        QuerySpec(prompt="unused", completion="unused"),
        scoring=ScoreConfig(normalize="none"),
        output=OutputSpec(top_tokens=0),
    )
    inputs = load_inputs(cfg, model=model, tokenizer=tok, queries=queries)
    result = run_attribution(cfg, inputs)
    table = result.scores.pivot(index="query_id", columns="unit_index", values="score")
    raw = table.loc[[q.query_id for q in queries]].to_numpy()
    names = select_parameters(model, cfg.perturb.params)
    s = cached_sensitivity(model, inputs.cache, names, reduce="sum", device=torch.device("cpu"))
    one = result.scores[result.scores["query_id"] == queries[0].query_id]
    docs = one.sort_values("unit_index")["doc_id"].astype(str).tolist()
    np.savez("/tmp/normalise_protocol_demo.npz", raw=raw, s=s, docs=docs)  # for re-analysis
    return raw, s, docs, [q.query_id for q in queries]


def demo_metrics(scores: np.ndarray, docs: Sequence[str], wanted: Sequence[str]) -> dict:
    """Entries ranked first, MRR with its CI, max top-5s of one unrelated unit."""
    docs_arr = np.asarray(docs)
    order = np.argsort(-scores, axis=1, kind="stable")
    pairs = list(zip(order, wanted, strict=True))
    rr = [1.0 / (1 + int(np.flatnonzero(docs_arr[o] == w)[0])) for o, w in pairs]
    hubs = np.zeros(len(docs), dtype=int)
    for o, w in pairs:
        top = o[:5]
        hubs[top[docs_arr[top] != w]] += 1
    mrr = bootstrap_ci(rr)
    return {"first": sum(r == 1.0 for r in rr), "n": len(rr), "mrr": mrr, "hub": int(hubs.max())}


def run_demo(record: bool, n: int) -> None:
    raw, s, docs, wanted = demo_raw_scores(n)
    lines = [
        "\n### `--normalize` on the memorised demo model (issue 15's check; validation = its 24 "
        "entries, test = the next 24)\n",
        "`python benchmarks/normalise_protocol.py demo`; unit s(z) = ‖∇L(z)‖ over all "
        "parameters, reduce=sum; MRR with a 95% bootstrap CI over the entries.\n",
        "| setting | val: entry first | val: MRR | val: max top-5s of one unrelated unit "
        + ("| test: entry first | test: MRR | test: max top-5s |" if n > 24 else "|"),
        "|---|---:|---:|---:|" + ("---:|---:|---:|" if n > 24 else ""),
    ]
    for name in SETTINGS:
        cells = []
        for part in (slice(0, 24), slice(24, 48))[: (n + 23) // 24]:
            m = demo_metrics(normalise(raw[part], s, name), docs, wanted[part])
            mrr = m["mrr"]
            cells += [f"{m['first']}/{m['n']}", f"{mrr.mean:.3f} [{mrr.lo:.3f}, {mrr.hi:.3f}]"]
            cells.append(str(m["hub"]))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    publish(lines, record=record)


# --------------------------------------------------------------------------- bench

BENCH_METRICS = ("mrr", "recall@10", "precision@10", "hub_share")
FAMILIES = ["fact", "source", "hubs"]


def run_linear(
    bench_dir: str,
    model_dir: str,
    split: str,
    record: bool,
    saved: str,
    setting: str,
    kind: str | None = None,
    tail_patch: bool = False,
) -> None:
    """BGO vs its first-order control ``bgo-linear`` (issue 15 item 3) at one normalisation,
    from the raw BGO scores a ``bench`` run saved: only ``bgo-linear`` is scored here (same
    perturbation: same seed, options and queries), both divided by the same divisors. Prints
    each method's mean and the paired difference (95% bootstrap CI; ``*``: excludes 0).
    ``bgo-linear``'s raw scores are saved beside ``saved`` (``*_linear.npz``) and read back
    from there by a later run instead of scored again; ``tail_patch``: the tail-patch metrics
    too (a step on each method's top units per query: minutes, not a corpus pass)."""
    from bgotrace.eval import runner as r
    from bgotrace.eval.collect import Collector
    from bgotrace.eval.families import FamilySettings, run_families

    kept = np.load(saved)
    raw, s = kept["raw"], kept["s"]
    opts = r.EvalOptions(method_options={"bgo-linear": {"normalize": "none"}})
    bench = r.load_benchmark(bench_dir)
    records = r.select_queries(bench, split, None)
    # ``kind``: only the fact (or style) queries, when a whole split's forward-mode pass is
    # too long; BGO's saved rows are the split's queries in order, so they are kept alike
    keep = [i for i, q in enumerate(records) if kind is None or q.get("kind") == kind]
    records, raw = [records[i] for i in keep], raw[keep]
    families = {None: FAMILIES, "fact": ["fact", "hubs"], "style": ["source", "hubs"]}[kind]
    families = [*families, "tail-patch"] if tail_patch else families
    eligible, _ = r.eligible_queries(records, families, split)
    loaded = r._load(bench, model_dir, records, opts)
    linear_path = Path(saved.replace(".npz", "_linear.npz"))
    if linear_path.exists():  # scored by an earlier run of this comparison
        linear, took = np.load(linear_path)["linear"], "read from " + str(linear_path)
    else:
        scores, seconds = r.score_methods(r.build_methods(["bgo-linear"], families, opts),
                                          loaded.ctx, loaded.queries)  # fmt: skip
        linear = scores["bgo-linear"]
        took = f"took {float(seconds['bgo-linear']['score_s']):.0f} s"
        np.savez(linear_path, linear=linear)  # for re-analysis
    settings = FamilySettings(opts.doc_reduce, opts.tail_patch, opts.leave_k_out, opts.lds, False)
    collector = Collector(loaded.query_ids)
    normalised = {"bgo": normalise(raw, s, setting), "bgo-linear": normalise(linear, s, setting)}
    run_families(families, eligible, loaded, normalised, settings, collector)
    table = collector.per_query()
    lines = [
        f"\n### BGO vs `bgo-linear` on `{bench_dir}` ({split} split, {len(records)} queries, "
        f"{setting})\n",
        f"`python benchmarks/normalise_protocol.py bench --bench {bench_dir} --model "
        f"{model_dir} --split {split} --saved {saved} --linear"
        f"{f' --kind {kind}' if kind else ''}{' --tail-patch' if tail_patch else ''}`; "
        f"bgo-linear scores {took}. Paired differences over the same "
        "queries, 95% bootstrap CI; `*`: the interval excludes 0.\n",
        "| metric | bgo | bgo-linear | bgo − bgo-linear |",
        "|---|---:|---:|---:|",
    ]
    paired = (
        ("fact", "mrr"),
        ("fact", "recall@10"),
        ("source", "precision@10"),
        ("tail-patch", "tail_patch_vs_random@10"),
        ("tail-patch", "tail_patch_ref@10"),
    )
    for family, metric in paired:
        a, b = (table[(table.family == family) & (table.metric == metric)
                      & (table.method == m)].set_index("query_id")["value"].dropna()
                for m in ("bgo", "bgo-linear"))  # fmt: skip
        both = a.index.intersection(b.index)
        if len(both) == 0:  # no query of this family (``--kind``)
            continue
        diff = bootstrap_ci((a[both] - b[both]).to_numpy())
        mark = "*" if diff.lo > 0 or diff.hi < 0 else ""
        lines.append(f"| {family} {metric} | {a[both].mean():.3f} | {b[both].mean():.3f} | "
                     f"{diff.mean:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}]{mark} |")  # fmt: skip
    # hub share is one number per split (a fraction of query groups), so no paired interval
    summary = collector.table()
    share = summary[(summary.family == "hubs") & (summary.metric == "hub_share")]
    if len(share):
        a, b = (float(share[share.method == m]["mean"].iloc[0]) for m in ("bgo", "bgo-linear"))
        lines.append(f"| hub share (per split) | {a:.2f} | {b:.2f} | {a - b:+.2f} |")
    publish(lines, record=record)


def run_bench(
    bench_dir: str, model_dir: str, split: str, record: bool, saved: str | None = None
) -> None:
    from bgotrace.eval import runner as r
    from bgotrace.eval.collect import Collector
    from bgotrace.eval.families import FamilySettings, run_families

    opts = r.EvalOptions(method_options={"bgo": {"normalize": "none"}})
    bench = r.load_benchmark(bench_dir)
    records = r.select_queries(bench, split, None)
    eligible, _ = r.eligible_queries(records, FAMILIES, split)
    loaded = r._load(bench, model_dir, records, opts)
    path = saved or f"/tmp/normalise_protocol_{split}.npz"
    if saved:  # raw scores of an earlier run: re-analyse without scoring again
        kept = np.load(saved)
        raw, s, score_s = kept["raw"], kept["s"], float(kept["score_s"])
    else:
        scores, seconds = r.score_methods(r.build_methods(["bgo"], FAMILIES, opts), loaded.ctx,
                                          loaded.queries)  # fmt: skip
        model = loaded.ctx.model
        names = select_parameters(model, opts.params)
        s = cached_sensitivity(
            model, loaded.ctx.cache, names, reduce="sum", device=torch.device("cpu")
        )
        raw, score_s = scores["bgo"], float(seconds["bgo"]["score_s"])
        np.savez(path, raw=raw, s=s, score_s=score_s)  # for re-analysis (--saved)
    settings = FamilySettings(opts.doc_reduce, opts.tail_patch, opts.leave_k_out, opts.lds, False)
    lines = [
        f"\n### `--normalize` on `{bench_dir}` ({split} split, {len(records)} queries)\n",
        f"`python benchmarks/normalise_protocol.py bench --bench {bench_dir} --model {model_dir} "
        f"--split {split}`; BGO defaults otherwise (Adam lr 1e-4, K = 10, reduce=sum); "
        f"scoring took {score_s:.0f} s. Means with 95% CIs; Δ: the paired difference "
        "from `sensitivity` over the same queries (95% bootstrap CI).\n",
        "| setting | fact MRR | fact recall@10 | source precision@10 | hub share "
        "| Δ fact MRR | Δ source P@10 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    per_query = {}
    for name in SETTINGS:
        collector = Collector(loaded.query_ids)
        run_families(FAMILIES, eligible, loaded, {"bgo": normalise(raw, s, name)},
                     settings, collector)  # fmt: skip
        table = collector.table().set_index("metric")
        per_query[name] = collector.per_query()
        cells = [_cell(table, m) for m in BENCH_METRICS]
        cells += [_paired(per_query[name], per_query["sensitivity"], m)
                  for m in ("mrr", "precision@10")] if name != "none" else ["", ""]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    publish(lines, record=record)


def _paired(mine, reference, metric: str) -> str:
    """Mean paired difference of ``metric`` (this setting − sensitivity), 95% bootstrap CI."""
    family = "fact" if metric == "mrr" else "source"
    a, b = (t[(t["metric"] == metric) & (t["family"] == family)].set_index("query_id")["value"]
            for t in (mine, reference))  # fmt: skip
    both = a.index.intersection(b.index)
    diff = bootstrap_ci((a[both] - b[both]).to_numpy())
    return f"{diff.mean:+.3f} [{diff.lo:+.3f}, {diff.hi:+.3f}]"


def _cell(table, metric: str) -> str:
    row = table.loc[metric]
    return f"{row['mean']:.3f} [{row['lo']:.3f}, {row['hi']:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("demo", "bench"))
    parser.add_argument("--bench")
    parser.add_argument("--model")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--entries", type=int, default=48, help="demo: 24 = validation only")
    parser.add_argument("--no-record", action="store_true", help="print only (smoke runs)")
    parser.add_argument("--saved", help="bench: re-analyse the raw scores an earlier run saved")
    parser.add_argument("--linear", action="store_true",
                        help="bench, with --saved: BGO vs bgo-linear at --setting")  # fmt: skip
    parser.add_argument("--setting", default="damped λ=0.3", choices=list(SETTINGS))
    parser.add_argument("--kind", choices=("fact", "style"), help="--linear: these queries only")
    parser.add_argument("--tail-patch", action="store_true",
                        help="--linear: the tail-patch metrics too")  # fmt: skip
    args = parser.parse_args()
    from bgotrace.runtime.progress import set_progress

    set_progress(False)
    if args.what == "demo":
        run_demo(not args.no_record, args.entries)
    elif args.linear:
        if not args.saved:
            parser.error("--linear compares with the raw BGO scores of --saved FILE")
        run_linear(args.bench, args.model, args.split, not args.no_record, args.saved,
                   args.setting, args.kind, args.tail_patch)  # fmt: skip
    else:
        run_bench(args.bench, args.model, args.split, not args.no_record, args.saved)


if __name__ == "__main__":
    main()
