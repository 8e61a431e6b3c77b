"""``--normalize`` on a model that memorised its data (issue 15's demo check, six entries).

The shipped demo model has memorised its corpus; users attribute what their model produces,
i.e. what it has learned well. Each query is a Devil's Dictionary headword ``"WORD, n."`` with
the entry's own definition as completion: a normaliser must rank the entry first, and no
unrelated unit may crowd the top 5 of several queries (a hub). Dividing by ‖∇L(z)‖ alone
(``sensitivity``) fails this: the units the model learned best have tiny gradients and are
inflated into hubs (benchmarks/RESULTS.md, "`--normalize` on the memorised demo model").

The raw BGO scores are computed once (``--normalize none``, the default perturbation); each
setting then divides them by exactly what the pipeline divides by
(:func:`~bgotrace.perturb.sensitivity.unit_normalizers`, floored by ``normalized``).
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bgotrace.cli.demo import demo_config
from bgotrace.config import (
    OutputSpec,
    QuerySpec,
    ScoreConfig,
)
from bgotrace.demo import demo_corpus_path, demo_model_path
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.perturb.params import select_parameters
from bgotrace.perturb.sensitivity import normalized, unit_normalizers
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.query import Query

ENTRIES = ("AFRICAN", "KILT", "TYPE", "HAND", "RAZOR", "CAVILER")
"""Six of issue 15's 24 entries, picked (from the protocol's saved scores) so that dividing by
‖∇L(z)‖ alone fails them both ways, to keep the check sharp: GLUTTON#0 tops AFRICAN and KILT,
and NIHILIST#0 is in 5 of the 6 top-5s; damped at the default λ = 0.3 ranks each entry first
with no unrelated unit in more than 3 (λ = 1 and 3: 2)."""
MAX_HUB = 3
"""Most top-5s (of the six) one unrelated unit may appear in."""
DAMPED = ScoreConfig(normalize="damped")
"""``--normalize damped`` at its default λ."""


def _queries() -> list[Query]:
    texts = {}
    for line in demo_corpus_path().open(encoding="utf-8"):
        row = json.loads(line)
        texts[row["id"]] = row["text"]
    return [Query(w, f"{w}, n.", texts[w][len(w) + 4 :]) for w in ENTRIES]


@pytest.fixture(scope="module")
def raw():
    """Raw scores (6, units), the unit table, and a divisor maker for a ScoreConfig."""
    model, tok = load_model_and_tokenizer(demo_model_path(), device="cpu")
    cfg = demo_config(
        QuerySpec(prompt="unused", completion="unused"),
        scoring=ScoreConfig(normalize="none"),
        output=OutputSpec(top_tokens=0),  # the ranking is all these tests read
    )
    inputs = load_inputs(cfg, model=model, tokenizer=tok, queries=_queries())
    scores = run_attribution(cfg, inputs).scores
    table = scores.pivot(index="query_id", columns="unit_index", values="score")
    units = scores[scores["query_id"] == ENTRIES[0]].sort_values("unit_index")
    names = select_parameters(model, cfg.perturb.params)

    def divisors(score_cfg: ScoreConfig) -> np.ndarray | None:
        return unit_normalizers(model, inputs.cache, names, score_cfg, torch.device("cpu"))

    return table.loc[list(ENTRIES)].to_numpy(), units, divisors


def _check(raw, score_cfg: ScoreConfig) -> tuple[list[str], int]:
    """Top unit's document of each query, and the most top-5s of one unrelated unit."""
    scores, units, divisors = raw
    ranked = np.argsort(-normalized(scores, divisors(score_cfg)), axis=1, kind="stable")
    docs, ids = units["doc_id"].to_numpy(), units["unit_id"].to_numpy()
    firsts, hubs = [], {}
    for order, entry in zip(ranked, ENTRIES, strict=True):
        firsts.append(str(docs[order[0]]))
        for unit in ids[order[:5]][docs[order[:5]] != entry]:
            hubs[unit] = hubs.get(unit, 0) + 1
    return firsts, max(hubs.values(), default=0)


_DEFAULT = ScoreConfig()


def test_the_default_normaliser_holds_on_a_memorised_model(raw):
    firsts, most = _check(raw, _DEFAULT)
    assert firsts == list(ENTRIES)
    assert most <= MAX_HUB


def test_damped_normalisation_holds_on_a_memorised_model(raw):
    firsts, most = _check(raw, DAMPED)
    assert firsts == list(ENTRIES)
    assert most <= MAX_HUB


def test_dividing_by_the_gradient_norm_alone_fails_there(raw):
    """What the check exists for: without damping the best-learned units become hubs."""
    firsts, most = _check(raw, replace(DAMPED, normalize="sensitivity"))
    assert firsts != list(ENTRIES) or most > MAX_HUB
