"""The Python API: one call from a model, a corpus and a text to ranked training data.

Example (CPU, the shipped demo model)::

    import bgotrace
    from bgotrace.demo import demo_corpus_path, demo_model_path

    result = bgotrace.attribute(
        demo_model_path(), None, demo_corpus_path(),
        prompt="DIPLOMACY, n.", completion="  The patriotic art of lying for one's country.",
        config={"corpus": {"max_length": 128}},
    )
    result.top(10)          # best units, with scores in nats
    result.by_source()      # source-level ranking
    result.to_pandas()      # every unit
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bgotrace.config import AttributeConfig
from bgotrace.corpus import Document, documents_from_records
from bgotrace.errors import InputError
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.pipeline import load_inputs, run_attribution
from bgotrace.query import Query
from bgotrace.ranking.result import AttributionResult

CorpusLike = str | Path | Sequence[Document] | Iterable[Mapping[str, Any] | str]


def attribute(
    model: PreTrainedModel | str | Path,
    tokenizer: PreTrainedTokenizerBase | None,
    corpus: CorpusLike,
    *,
    prompt: str | None = None,
    completion: str | None = None,
    queries: Sequence[Query] | None = None,
    config: AttributeConfig | Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    candidates: int | float | str | None = None,
    prefilter: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> AttributionResult:
    """Rank the training units of ``corpus`` by how much they support the query.

    ``model`` is a loaded causal LM (with its ``tokenizer``) or a model directory;
    ``corpus`` a path (JSONL, Parquet, .txt folder, saved dataset), a list of
    :class:`Document`, or a list of records/strings. ``config`` holds the options of
    ``bgotrace attribute`` as an :class:`AttributeConfig` or a nested dict of its
    sections (``{"perturb": {"lr": 1e-4}, "scoring": {"reduce": "sum"}}``).

    ``candidates`` (prefilter + rerank, as ``--candidates``): sweep only each query group's
    top-M units proposed by ``prefilter`` (default ``bm25``), M a count (200), a percentage
    ("5%") or a fraction (0.05); the other units get score NaN and ``candidate`` False.
    """
    rerank = {k: v for k, v in (("candidates", candidates), ("prefilter", prefilter)) if v}
    cfg = _build_config(model, corpus, prompt, completion, queries, config, out, rerank)
    documents = None if isinstance(corpus, (str, Path)) else _as_documents(corpus)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model_and_tokenizer(
            model,
            adapter=cfg.model.adapter,
            device=cfg.execution.device,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
            merge_adapter=cfg.perturb.params != "adapter",  # --params adapter: kept unmerged
            attn_implementation=cfg.model.attn_implementation,
        )
    if tokenizer is None:
        raise InputError("A loaded model needs its tokenizer: pass tokenizer=... as well.")
    inputs = load_inputs(
        cfg, model=model, tokenizer=tokenizer, documents=documents, queries=queries
    )
    return run_attribution(cfg, inputs, overwrite=overwrite, resume=resume)


def _as_documents(corpus: Iterable[Any]) -> list[Document]:
    items = list(corpus)
    if items and all(isinstance(d, Document) for d in items):
        return items
    return documents_from_records(items)


def _build_config(
    model: Any,
    corpus: Any,
    prompt: str | None,
    completion: str | None,
    queries: Sequence[Query] | None,
    config: AttributeConfig | Mapping[str, Any] | None,
    out: str | Path | None,
    scoring: Mapping[str, Any],
) -> AttributeConfig:
    if isinstance(config, AttributeConfig):
        data = config.to_dict()
    else:
        data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (config or {}).items()}
    model_path = (
        str(model)
        if isinstance(model, (str, Path))
        else getattr(model, "name_or_path", "<in-memory model>")
    )
    data.setdefault("model", {}).setdefault("path", model_path)
    corpus_path = str(corpus) if isinstance(corpus, (str, Path)) else "<in-memory corpus>"
    data.setdefault("corpus", {}).setdefault("path", corpus_path)
    query = data.setdefault("query", {})
    if queries is not None:
        query.setdefault("queries", "<in-memory queries>")
    else:
        query.update({k: v for k, v in (("prompt", prompt), ("completion", completion)) if v})
    if out is not None:
        data.setdefault("output", {})["out"] = str(out)
    data.setdefault("scoring", {}).update(scoring)
    return AttributeConfig.from_dict(data)
