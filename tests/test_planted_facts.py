"""Planted facts: a tiny model trained on a corpus with unique facts; BGO finds their documents.

Setup (seed 0): 8 fictional facts, each stated in exactly one document, among 32
filler documents; a 2-layer, width-64 GPT-2 trained from scratch until it reproduces
the facts. Threshold: the fact's document is ranked first for at least 6 of the 8
fact queries (seen: 8/8 at seed 0), and the mean reciprocal rank is at least 0.8.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import bgotrace
from bgotrace.corpus import Document
from bgotrace.query import Query
from bgotrace.train import TrainConfig, train_model

FACTS = [
    ("Zorbel Quint", "was born in", "Marvatown"),
    ("Ilsa Brevmar", "plays the", "oboe"),
    ("Tovik Prane", "works as a", "lighthouse keeper"),
    ("Mirela Dunsk", "founded the city of", "Olvaport"),
    ("Kasper Velm", "keeps a pet", "heron"),
    ("Orla Finnick", "writes poems about", "copper mines"),
    ("Dax Ombrell", "sails to", "Quillhaven"),
    ("Nessa Trolve", "collects old", "brass keys"),
]
WORDS = (
    "the river the hill a road some bread warm rain an old map the market a quiet "
    "street the winter sun a small boat the harbour long evenings"
).split()


def filler(n: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [
        Document(f"filler{i}", " ".join(rng.choice(WORDS) for _ in range(25)) + ".", "filler")
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    docs = filler(32) + [
        Document(f"fact{i}", f"{who} {rel} {what}.", "facts")
        for i, (who, rel, what) in enumerate(FACTS)
    ]
    out = tmp_path_factory.mktemp("model") / "m"
    config = TrainConfig(
        preset="test",
        arch="gpt2",
        epochs=30,
        lr=5e-3,
        batch_size=8,
        warmup_steps=10,
        seed=0,
        max_length=64,
    )
    train_model(docs, config, out, progress=False)
    return out, docs


def test_bgo_ranks_the_planted_fact_first(trained, tmp_path):
    model_dir, docs = trained
    queries = [
        Query(f"q{i}", f"{who} {rel}", f" {what}.") for i, (who, rel, what) in enumerate(FACTS)
    ]
    result = bgotrace.attribute(
        model_dir,
        None,
        docs,
        queries=queries,
        config={
            "corpus": {"max_length": 64},
            "model": {"device": "cpu"},
            "perturb": {"optimizer": "adam", "lr": 1e-3, "steps": 5},
            "output": {"top_tokens": 0},
        },
    )
    ranks = []
    for i in range(len(FACTS)):
        table = result.by_document(f"q{i}")
        ranks.append(int(table.index[table["doc_id"] == f"fact{i}"][0]) + 1)
    assert sum(r == 1 for r in ranks) >= 6, ranks
    assert np.mean([1 / r for r in ranks]) >= 0.8, ranks
