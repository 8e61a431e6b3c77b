"""Small corpora and queries shared by several tests (tiny models, CPU, seconds)."""

from __future__ import annotations

from bgotrace.corpus import Document
from bgotrace.query import Query

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France, Berlin of Germany.",
    "Rome is the capital of Italy and Madrid of Spain.",
    "Water boils at one hundred degrees and ice melts at zero.",
    "def add(a, b): return a + b",
    "Rivers carry sand to the sea, mountains rise slowly.",
    "A language model predicts the next token from the tokens before it.",
    "Cafés serve crème brûlée in Zürich.",
]
QUERIES = [
    Query("capital", "Paris is the capital of", " France."),
    Query("water", "Water boils at", " one hundred degrees."),
    Query("fox", "The quick brown", " fox jumps."),
    Query("rome", "Rome is the capital of", " Italy."),
    Query("code", "def add(a, b):", " return a + b"),
]


def documents(n: int = len(TEXTS), n_sources: int = 3) -> list[Document]:
    """The first ``n`` texts as documents ``d0..``, spread over ``n_sources`` sources."""
    return [Document(f"d{i}", t, f"s{i % n_sources}") for i, t in enumerate(TEXTS[:n])]
