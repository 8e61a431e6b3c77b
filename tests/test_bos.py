"""``--bos auto|always|never``: text encoded as the model saw it in training.

Two tokenizers built in code: a Llama-style one whose post-processor adds ``<s>`` in front
(so ``auto`` prepends it) and the GPT-2-style test tokenizer, which adds nothing.
"""

from __future__ import annotations

import pytest

from bgotrace.cache.token_cache import requested_manifest
from bgotrace.config import AttributeConfig, CorpusSpec
from bgotrace.corpus import ChunkingConfig, tokenize_and_chunk
from bgotrace.corpus.bos import resolve_bos, tokenizer_adds_bos
from bgotrace.errors import ConfigError
from bgotrace.pipeline import load_inputs
from bgotrace.query import Query, encode_query
from tests.conftest import TOKENIZER_TRAINING_TEXT, make_tiny_tokenizer
from tests.models import tiny_llama

QUERY = Query("q", "Paris is the capital of", " France.")


def make_llama_style_tokenizer(with_bos_token: bool = True):
    """A word-piece BPE whose post-processor puts ``<s>`` in front, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(TOKENIZER_TRAINING_TEXT.splitlines() * 3, trainer=trainer)
    if with_bos_token:
        bos = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>" if with_bos_token else None,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )


@pytest.fixture(scope="module")
def llama_tok():
    return make_llama_style_tokenizer()


@pytest.fixture(scope="module")
def gpt2_tok():
    return make_tiny_tokenizer()


def test_auto_follows_the_tokenizer(llama_tok, gpt2_tok):
    assert tokenizer_adds_bos(llama_tok) and not tokenizer_adds_bos(gpt2_tok)
    bos = llama_tok.bos_token_id
    assert resolve_bos(llama_tok, "auto") == bos
    assert resolve_bos(gpt2_tok, "auto") is None  # GPT-2: no BOS although bos_token is set
    assert resolve_bos(gpt2_tok, "always") == gpt2_tok.bos_token_id
    assert resolve_bos(llama_tok, "never") is None


def test_bad_modes_are_clean_errors():
    with pytest.raises(ConfigError, match="--bos always, but the tokenizer has no bos_token"):
        resolve_bos(make_llama_style_tokenizer(with_bos_token=False), "always")
    with pytest.raises(ConfigError, match="--bos='sometimes' is unknown"):
        CorpusSpec(path="c.jsonl", bos="sometimes")


def test_query_gets_the_bos_and_no_loss_on_it(llama_tok):
    plain = encode_query(QUERY, llama_tok, None)
    with_bos = encode_query(QUERY, llama_tok, None, llama_tok.bos_token_id)
    assert with_bos.input_ids[0, 0] == llama_tok.bos_token_id
    assert with_bos.input_ids[0, 1:].tolist() == plain.input_ids[0].tolist()
    assert with_bos.n_loss_tokens == plain.n_loss_tokens
    assert with_bos.labels[0, 0] == -100
    all_tokens = encode_query(
        Query("a", "Paris is", " France.", loss_on="all"), llama_tok, None, llama_tok.bos_token_id
    )
    assert all_tokens.n_loss_tokens == all_tokens.input_ids.shape[1] - 1  # BOS never predicted


def test_every_unit_starts_with_bos_and_covers_the_document(llama_tok, tiny_documents):
    bos = llama_tok.bos_token_id
    plain = tokenize_and_chunk(tiny_documents, llama_tok, ChunkingConfig(max_length=8))
    units = tokenize_and_chunk(tiny_documents, llama_tok, ChunkingConfig(max_length=8, bos_id=bos))
    assert all(u.token_ids[0] == bos and len(u.token_ids) <= 8 for u in units)
    for doc in tiny_documents:
        mine = [u for u in units if u.doc_id == doc.doc_id]
        ref = [t for u in plain if u.doc_id == doc.doc_id for t in u.token_ids]
        assert [t for u in mine for t in u.token_ids[1:]] == ref  # stride 0: a partition
    with pytest.raises(ConfigError, match="stride must be < 7"):
        ChunkingConfig(max_length=8, stride=7, bos_id=bos)


def test_manifest_records_the_bos(llama_tok, tiny_documents):
    with_bos = requested_manifest(tiny_documents, llama_tok, ChunkingConfig(8, bos_id=1))
    without = requested_manifest(tiny_documents, llama_tok, ChunkingConfig(8))
    assert with_bos["chunking"]["bos_id"] == 1 and "bos_id" not in without["chunking"]
    assert with_bos != without  # a cache made without a BOS is not reused with one


def _config(tmp_path, bos: str) -> AttributeConfig:
    return AttributeConfig.from_dict(
        {
            "model": {"path": "in-memory"},
            "corpus": {"path": "in-memory", "max_length": 12, "bos": bos,
                       "cache_dir": str(tmp_path / bos)},
            "query": {"prompt": QUERY.prompt, "completion": QUERY.completion},
        }
    )  # fmt: skip


@pytest.mark.parametrize("bos", ["auto", "never"])
def test_pipeline_encodes_queries_and_units_alike(llama_tok, tiny_documents, tmp_path, bos):
    model = tiny_llama(llama_tok)
    inputs = load_inputs(
        _config(tmp_path, bos), model=model, tokenizer=llama_tok, documents=tiny_documents
    )
    starts_with_bos = [
        int(inputs.cache.unit_tokens(i)[0]) == llama_tok.bos_token_id
        for i in range(len(inputs.cache))
    ]
    assert all(starts_with_bos) == (bos == "auto")
    assert (int(inputs.queries[0].input_ids[0, 0]) == llama_tok.bos_token_id) == (bos == "auto")


def test_cli_bos_flag(tmp_path):
    from tests.test_cli import TEXTS, invoke

    model_dir, corpus = tmp_path / "model", tmp_path / "c.jsonl"
    tok = make_llama_style_tokenizer()
    tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus.write_text("".join(f'{{"id": "d{i}", "text": "{t}"}}\n' for i, t in enumerate(TEXTS)))
    args = ["attribute", "--model", model_dir, "--corpus", corpus, "--quiet", "--steps", "1",
            "--max-length", "12", "--prompt", QUERY.prompt,
            "--completion", QUERY.completion]  # fmt: skip
    for mode in ("never", "auto"):
        out = tmp_path / mode
        result = invoke(*args, "--bos", mode, "--out", out, "--cache-dir", tmp_path / f"c{mode}")
        assert result.exit_code == 0, result.output
        assert f"bos: {mode}" in (out / "config.yaml").read_text()
    bad = invoke(*args, "--bos", "maybe", "--out", tmp_path / "bad")
    assert bad.exit_code == 2 and "--bos='maybe' is unknown" in bad.output
