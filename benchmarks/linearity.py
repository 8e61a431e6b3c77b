"""How far is BGO from its exact first-order control ``bgo-linear``? (issue 15, item 2)

    python benchmarks/linearity.py demo                       # memorised demo model, ~10 min
    bgotrace bench build --out /tmp/lin/bench-cpu --bench-preset cpu --preset test --epochs 8
    python benchmarks/linearity.py bench --bench /tmp/lin/bench-cpu \\
        --model /tmp/lin/bench-cpu/model --split validation   # its 12 fact queries, ~3 min

Both methods run through ``bgotrace attribute``'s pipeline with the shipped perturbation
defaults and ``--normalize none``; the normalisations are then the raw scores divided by
their divisors (as the pipeline divides), so each setting compares the same two score sets.
Per setting: Spearman and top-10 overlap between exact and linear over the whole corpus
(mean, min, max over queries), the same on the linearity diagnostic's seeded 256-unit
sample (what ``summary.json`` would report), and each method's fact MRR.

``demo``: issue 15's check (24 Devil's Dictionary entries ``WORD, n.`` under 160 characters,
shuffled with ``random.Random(4)``; prompt ``"WORD, n."``, completion = the definition; the
entry's own unit is the answer). ``bench``: the split's fact queries; MRR of the first
document that states the fact (documents ranked by their best unit).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from normalise_protocol import demo_entries
from results_log import publish

from bgotrace.config import (
    AttributeConfig,
    CorpusSpec,
    ExecutionConfig,
    ModelSpec,
    QuerySpec,
    ScoreConfig,
)
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.sensitivity import cached_sensitivity, damped, score_divisors
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.query import Query
from bgotrace.runtime.progress import set_progress
from bgotrace.score.linear import agreement, sample_units

METHODS = ("bgo", "bgo-linear")
SAMPLE = 256
"""Units of the linearity diagnostic's sample (``ScoreConfig.linearity_sample``'s default)."""


def raw_scores(
    model_dir: str, corpus: str, max_length: int | None, queries: Sequence[Query]
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str], dict[str, float]]:
    """Raw scores per method (n_queries, n_units), s(z), each unit's doc id, seconds per method."""
    model, tok = load_model_and_tokenizer(model_dir, device="cpu")
    out, seconds = {}, {}
    for method in METHODS:
        cfg = AttributeConfig(
            method=method,
            model=ModelSpec(path=model_dir),
            corpus=CorpusSpec(path=corpus, max_length=max_length),
            query=QuerySpec(prompt="unused", completion="unused"),
            scoring=ScoreConfig(normalize="none"),
            execution=ExecutionConfig(device="cpu"),
        )
        inputs = load_inputs(cfg, model=model, tokenizer=tok, queries=queries)
        started = time.time()
        result = run_attribution(cfg, inputs)
        seconds[method] = time.time() - started
        table = result.scores.pivot(index="query_id", columns="unit_index", values="score")
        out[method] = table.loc[[q.query_id for q in queries]].to_numpy()
    names = select_parameters(model, cfg.perturb.params)
    s = cached_sensitivity(model, inputs.cache, names, reduce="sum", device=torch.device("cpu"))
    docs = inputs.cache.units["doc_id"].astype(str).tolist()  # rows in unit order
    return out, s, docs, seconds


def cached_raw_scores(
    saved: str | None, *args: object
) -> tuple[dict[str, np.ndarray], np.ndarray, list[str], dict[str, float]]:
    """:func:`raw_scores`, kept in ``saved`` (.npz) so a table can be redone without the runs."""
    if saved and Path(saved).is_file():
        with np.load(saved, allow_pickle=False) as f:
            raw = {m: f[m] for m in METHODS}
            seconds = {m: float(f[f"seconds_{m}"]) for m in METHODS}
            return raw, f["s"], f["docs"].tolist(), seconds
    raw, s, docs, seconds = raw_scores(*args)  # type: ignore[arg-type]
    if saved:
        extra = {f"seconds_{m}": np.array(seconds[m]) for m in METHODS}
        np.savez(saved, s=s, docs=np.array(docs), **raw, **extra)
    return raw, s, docs, seconds


SETTINGS = {"none": None, "sensitivity": 0.0, "damped λ=1": 1.0}
"""``--normalize`` settings: None raw; else the damping λ of s(z) + λ·median(s)."""


def normalise(raw: np.ndarray, s: np.ndarray, setting: str) -> np.ndarray:
    lam = SETTINGS[setting]
    return raw if lam is None else raw / score_divisors(damped(s, lam) if lam else s)


def doc_rr(scores: np.ndarray, docs: Sequence[str], relevant: Sequence[set[str]]) -> list[float]:
    """Per query: reciprocal rank of the first relevant document (documents by best unit)."""
    docs_arr = np.asarray(docs)
    rr = []
    for row, wanted in zip(scores, relevant, strict=True):
        seen: list[str] = []
        for d in docs_arr[np.argsort(-row, kind="stable")]:
            if d not in seen:
                seen.append(d)
                if d in wanted:
                    break
        rr.append(1.0 / len(seen) if seen[-1] in wanted else 0.0)
    return rr


def compare(exact: np.ndarray, linear: np.ndarray) -> dict[str, list[float]]:
    """Per query: agreement over all units and on the diagnostic's sample."""
    rows: dict[str, list[float]] = {"rho": [], "top10": [], "rho_s": [], "top10_s": []}
    for e, lin in zip(exact, linear, strict=True):
        full = agreement(e, lin)
        pick = sample_units(np.arange(len(e)), SAMPLE, seed=0)
        part = agreement(e[pick], lin[pick])
        rows["rho"].append(full["spearman"])
        rows["top10"].append(full["top10_overlap"])
        rows["rho_s"].append(part["spearman"])
        rows["top10_s"].append(part["top10_overlap"])
    return rows


def _stat(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ({np.min(values):.2f}–{np.max(values):.2f})"


def table(
    title: str,
    command: str,
    raw: dict[str, np.ndarray],
    s: np.ndarray,
    docs: list[str],
    relevant: list[set[str]],
    seconds: dict[str, float],
) -> list[str]:
    n_q, n_u = raw["bgo"].shape
    lines = [
        f"\n### {title}\n",
        f"`{command}`; {n_q} queries, {n_u} units, shipped perturbation defaults (Adam, lr "
        f"1e-4, K = 10, all parameters, reduce=sum). Spearman / top-10 overlap between `bgo` "
        f"and `bgo-linear`: mean (min–max) over queries, over all units and on the linearity "
        f"diagnostic's seeded {SAMPLE}-unit sample (top-10 within the sample). Wall time of "
        f"the whole run per method: bgo {seconds['bgo']:.0f} s, bgo-linear "
        f"{seconds['bgo-linear']:.0f} s.\n",
        "| normalize | Spearman (all units) | top-10 overlap (all) | Spearman (sample) "
        "| top-10 overlap (sample) | fact MRR bgo | fact MRR bgo-linear |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in SETTINGS:
        exact, linear = (normalise(raw[m], s, name) for m in METHODS)
        r = compare(exact, linear)
        cells = [_stat(r[k]) for k in ("rho", "top10", "rho_s", "top10_s")]
        for x in (exact, linear):
            rr = doc_rr(x, docs, relevant)
            cells.append(f"{np.mean(rr):.3f} ({sum(v == 1.0 for v in rr)}/{len(rr)} first)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def run_demo(record: bool, saved: str | None) -> None:
    from bgotrace.demo import DEMO_MAX_LENGTH, demo_corpus_path, demo_model_path

    entries = demo_entries(24)
    queries = [Query(e["id"], f"{e['id']}, n.", e["text"][len(e["id"]) + 4 :]) for e in entries]
    raw, s, docs, seconds = cached_raw_scores(
        saved, str(demo_model_path()), str(demo_corpus_path()), DEMO_MAX_LENGTH, queries
    )
    title = "BGO vs its first-order control on the memorised demo model (issue 15's check)"
    command = "python benchmarks/linearity.py demo"
    relevant = [{q.query_id} for q in queries]
    publish(table(title, command, raw, s, docs, relevant, seconds), record=record)


def run_bench(bench: str, model: str, split: str, record: bool, saved: str | None) -> None:
    rows = [json.loads(line) for line in (Path(bench) / "queries.jsonl").open()]
    facts = [r for r in rows if r["kind"] == "fact" and r["split"] == split]
    queries = [Query(r["id"], r["prompt"], r["completion"], r["loss_on"]) for r in facts]
    corpus = str(Path(bench) / "corpus.jsonl")
    raw, s, docs, seconds = cached_raw_scores(saved, model, corpus, None, queries)
    title = f"BGO vs its first-order control on the `cpu` benchmark ({split} fact queries)"
    command = (
        f"python benchmarks/linearity.py bench --bench {bench} --model {model} --split {split}"
    )
    relevant = [set(r["relevant_doc_ids"]) for r in facts]
    publish(table(title, command, raw, s, docs, relevant, seconds), record=record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("where", choices=("demo", "bench"))
    parser.add_argument("--bench")
    parser.add_argument("--model")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--no-record", action="store_true", help="print only, no RESULTS.md")
    parser.add_argument("--scores", help="an .npz keeping the raw scores (reused when present)")
    args = parser.parse_args()
    set_progress(False)
    if args.where == "demo":
        run_demo(not args.no_record, args.scores)
    else:
        run_bench(args.bench, args.model, args.split, not args.no_record, args.scores)


if __name__ == "__main__":
    main()
