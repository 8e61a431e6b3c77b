"""Does a BGO setting diverge on the shipped demo model, and does each demo prompt still rank its
entry first? (The demo model memorised its corpus: training loss 0.06, F̂ → 0.)

    python benchmarks/demo_settings.py '{"fisher": {"perturb": {"optimizer": "fisher"}}}'

Each setting (a name → {"perturb": {...}, "scoring": {...}} overrides of the defaults) is run
on the 5 shipped prompts, each continued greedily for 24 tokens; printed: how many rank their
Devil's Dictionary entry first, the largest top score, and the chosen η per query (lr auto).
"""

from __future__ import annotations

import json
import sys

from bgotrace.config import (
    AttributeConfig,
    CorpusSpec,
    ExecutionConfig,
    ModelSpec,
    PerturbConfig,
    QuerySpec,
    ScoreConfig,
)
from bgotrace.demo import DEMO_MAX_LENGTH, DEMO_PROMPT_DOCS, demo_corpus_path, demo_model_path
from bgotrace.generate import generate_completion
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.query import Query
from bgotrace.runtime.progress import set_progress


def main() -> None:
    settings = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {"default": {}}
    set_progress(False)
    model, tok = load_model_and_tokenizer(demo_model_path(), device="cpu")
    queries = [
        Query(f"q{i}", p, generate_completion(model, tok, p, max_new_tokens=24))
        for i, p in enumerate(DEMO_PROMPT_DOCS)
    ]
    for name, s in settings.items():
        cfg = AttributeConfig(
            model=ModelSpec(path=str(demo_model_path())),
            corpus=CorpusSpec(path=str(demo_corpus_path()), max_length=DEMO_MAX_LENGTH),
            query=QuerySpec(prompt="unused", completion="unused"),
            perturb=PerturbConfig(**s.get("perturb", {})),
            scoring=ScoreConfig(**s.get("scoring", {})),
            execution=ExecutionConfig(device="cpu"),
        )
        result = run_attribution(cfg, load_inputs(cfg, model=model, tokenizer=tok, queries=queries))
        tops = [result.top(1, q.query_id).iloc[0] for q in queries]
        hits = sum(
            t["doc_id"] == want for t, want in zip(tops, DEMO_PROMPT_DOCS.values(), strict=True)
        )
        lrs = [(q.get("calibration") or {}).get("lr") for q in result.summary["queries"]]
        print(
            f"{name}: top-1 correct {hits}/{len(queries)}, largest top score "
            f"{max(float(t['score']) for t in tops):.3g}, lr auto chose {lrs}",
            flush=True,
        )


if __name__ == "__main__":
    main()
