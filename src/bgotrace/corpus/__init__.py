"""Corpus stage: sources on disk -> documents with stable ids -> token units.

``load_documents`` reads a corpus (``iter_documents`` and ``CorpusFiles`` stream it),
``tokenize_and_chunk`` cuts it into the units that the
trainer trains on and the scorer ranks.
"""

from __future__ import annotations

from bgotrace.corpus.chunking import ChunkingConfig, Unit, tokenize_and_chunk
from bgotrace.corpus.documents import (
    CorpusFields,
    Document,
    corpus_fingerprint,
    documents_from_records,
)
from bgotrace.corpus.sources import CorpusFiles, iter_documents, load_documents

__all__ = [
    "ChunkingConfig",
    "CorpusFields",
    "CorpusFiles",
    "Document",
    "Unit",
    "corpus_fingerprint",
    "documents_from_records",
    "iter_documents",
    "load_documents",
    "tokenize_and_chunk",
]
