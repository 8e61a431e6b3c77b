"""``bm25``: lexical retrieval of training units by the words they share with the query.

Documents are the units' texts (``cache.unit_text(i)``); the query text is the completion
(default) or prompt + completion. Tokenization is bm25s's: lower-cased words of two or more
word characters, English stopwords removed, no stemming. Scores are BM25 relevances
(unitless, >= 0; high = the unit shares more, and rarer, words with the query). BM25 does
not look at the model, so it measures lexical overlap, not what the model learned — yet on
verbatim facts it is a strong baseline (METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import bm25s
import numpy as np

from bgotrace.baselines.base import Attributor, MethodContext, register
from bgotrace.errors import ConfigError
from bgotrace.query import EncodedQuery

QUERY_TEXTS = ("completion", "prompt+completion")


@dataclass
class BM25Options:
    """Options of ``bm25``."""

    query_text: str = "completion"
    """Text searched for: ``completion`` or ``prompt+completion``."""
    k1: float = 1.5
    """Term-frequency saturation of BM25."""
    b: float = 0.75
    """Length normalisation of BM25 (0 = none, 1 = full)."""
    stopwords: str | None = "en"
    """Stopword list of bm25s (``en``) or None to keep every word."""

    def __post_init__(self) -> None:
        if self.query_text not in QUERY_TEXTS:
            raise ConfigError(
                f"bm25 query_text={self.query_text!r} is unknown: use one of "
                f"{', '.join(QUERY_TEXTS)}."
            )
        if self.k1 < 0 or not 0 <= self.b <= 1:
            raise ConfigError(f"bm25 needs k1 >= 0 and 0 <= b <= 1, got k1={self.k1}, b={self.b}.")


@register("bm25")
class BM25Attributor(Attributor):
    """BM25 relevance of each unit's text to the query text (unitless, >= 0)."""

    Options = BM25Options

    def _prepare(self, ctx: MethodContext) -> None:
        texts = [ctx.cache.unit_text(i) for i in range(ctx.n_units)]
        corpus = bm25s.tokenize(texts, stopwords=self.opts.stopwords, show_progress=False)
        self.index = bm25s.BM25(k1=self.opts.k1, b=self.opts.b)
        self.index.index(corpus, show_progress=False)

    def query_text(self, q: EncodedQuery) -> str:
        if self.opts.query_text == "completion":
            return q.query.completion
        return f"{q.query.prompt}{q.query.completion}"

    def _score(self, queries: list[EncodedQuery]) -> np.ndarray:
        n_units = self._prepared().n_units
        return np.stack([self._score_one(self.query_text(q), n_units) for q in queries])

    def _score_one(self, text: str, n_units: int) -> np.ndarray:
        words = bm25s.tokenize(
            [text], stopwords=self.opts.stopwords, return_ids=False, show_progress=False
        )[0]
        ids = self.index.get_tokens_ids(list(words))  # words absent from the corpus drop out
        if not ids:
            return np.zeros(n_units)  # no shared word: no evidence for any unit
        return np.asarray(self.index.get_scores_from_ids(ids), dtype=np.float64)
