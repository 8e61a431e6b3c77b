"""SFT corpora: conversation records rendered by the chat template, cut at turn boundaries,
each unit's loss on its assistant tokens only (as SFT trained them).

Tokenizers and templates are the ones of ``tests/test_chat.py`` (a Llama-style tokenizer
whose template writes ``<s>``, and the GPT-2-style test tokenizer with ChatML). References
are the obvious ones: the template's pieces tokenized one by one, and each unit's mean NLL
over its assistant tokens computed by hand from the model's logits, one unit at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bgotrace.cache.batching import collate
from bgotrace.cache.token_cache import TokenCache, get_token_cache
from bgotrace.chat import Message, render_conversation
from bgotrace.cli.main import app
from bgotrace.corpus import ChunkingConfig, CorpusFiles, Document, load_documents
from bgotrace.corpus.conversations import turn_windows
from bgotrace.errors import InputError
from bgotrace.score.sweep import unit_loss_sums
from tests.models import tiny_gpt2, tiny_llama
from tests.test_chat import CHATML, make_chatml_tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital."},
    {"role": "user", "content": "And Germany?"},
    {"role": "assistant", "content": "Berlin."},
]
RECORDS = [
    {"id": "chat", "source": "sft", "messages": CONVERSATION},
    {"id": "plain", "source": "web", "text": "Water boils at one hundred degrees."},
    {"id": "pc", "source": "sft", "prompt": "Capital of Italy?", "completion": "Rome."},
]
CPU = torch.device("cpu")
CHATML_BOT_PROMPT = CHATML.replace("assistant\n{% endif", "bot\n{% endif")


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build(tmp_path: Path, tok: Any, records: list[Any], name: str = "c", **chunking: Any):
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", records)
    chunking.setdefault("bos_id", tok.bos_token_id if "<s>" in tok.get_vocab() else None)
    config = ChunkingConfig(**{"max_length": 64, **chunking})
    return get_token_cache(
        CorpusFiles(str(corpus)), tok, config, tmp_path / f"{name}-cache", progress=False
    )


def llama_pieces(tok: Any, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Reference: ``<s>``, then each turn's role token, content tokens and ``<|end|>``;
    the assistant turns' content and ``<|end|>`` marked."""
    ids, assistant = [tok.bos_token_id], [False]
    for m in messages:
        content = tok(m["content"], add_special_tokens=False)["input_ids"]
        turn = [*content, tok.convert_tokens_to_ids("<|end|>")]
        ids += [tok.convert_tokens_to_ids(f"<|{m['role']}|>"), *turn]
        assistant += [False] + [m["role"] == "assistant"] * len(turn)
    return ids, assistant


def picked(tokens: np.ndarray, mask: np.ndarray | None) -> list[int]:
    assert mask is not None
    return [int(t) for t, m in zip(tokens, mask, strict=True) if m]


# --- rendering and masks -----------------------------------------------------------------


def test_llama_units_have_one_bos_and_the_assistant_mask(tmp_path, llama_tok, caplog):
    with caplog.at_level("WARNING"):
        cache = build(tmp_path, llama_tok, RECORDS)
    assert caplog.text.count("already starts with the BOS token") == 1  # once per corpus
    assert list(cache.units["unit_id"]) == ["chat#0", "plain#0", "pc#0"]
    expected, assistant = llama_pieces(llama_tok, CONVERSATION)
    tokens = cache.unit_tokens(0).tolist()
    assert tokens == expected
    assert tokens.count(llama_tok.bos_token_id) == 1  # the template's, none added on top
    assert cache.unit_loss_mask(0).tolist() == assistant
    assert cache.unit_loss_mask(1) is None or cache.unit_loss_mask(1).all()  # plain: all
    pc_ids, pc_mask = llama_pieces(llama_tok, [
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ])  # fmt: skip
    assert cache.unit_tokens(2).tolist() == pc_ids
    assert cache.unit_loss_mask(2).tolist() == pc_mask
    assert cache.loss_counts.tolist() == [sum(assistant), cache.lengths[1] - 1, sum(pc_mask)]
    # The stored text is the rendered conversation, and the unit covers it.
    assert cache.unit_text(0).startswith("<s><|system|>Be brief.<|end|>")
    assert list(cache.units["turns"]) == ["0-4", "", "0-1"]


def test_chatml_units_on_a_gpt2_tokenizer(tmp_path, chatml_tok):
    cache = build(tmp_path, chatml_tok, RECORDS, max_length=128)  # the chat: 92 tokens
    tokens, mask = cache.unit_tokens(0), cache.unit_loss_mask(0)
    reference = chatml_tok("Paris is the capital.<|im_end|>\nBerlin.<|im_end|>\n")["input_ids"]
    assert picked(tokens, mask) == reference
    assert chatml_tok.decode(tokens).startswith("<|im_start|>system\nBe brief.")  # no BOS
    # Labels: the unit's tokens where the mask is set, IGNORE elsewhere and on padding.
    _, attention, labels = collate(cache, np.array([0, 1]), 0, CPU)
    assert labels[0, : len(tokens)].tolist() == [
        int(t) if m else -100 for t, m in zip(tokens, mask, strict=True)
    ]
    assert torch.equal(labels[1], torch.where(attention[1] == 1, labels[1], -100))
    assert (labels[1, : cache.lengths[1]] != -100).all()  # the plain unit: every token


def test_prompt_completion_record_equals_its_messages(tmp_path, chatml_tok):
    as_pc = build(tmp_path, chatml_tok, [RECORDS[2]], name="pc")
    as_messages = build(tmp_path, chatml_tok, [{"id": "pc", "source": "sft", "messages": [
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]}], name="msg")  # fmt: skip
    assert as_pc.unit_tokens(0).tolist() == as_messages.unit_tokens(0).tolist()
    assert as_pc.unit_loss_mask(0).tolist() == as_messages.unit_loss_mask(0).tolist()


# --- the unit's loss is the mean NLL over its assistant tokens ------------------------------


def reference_mean_nll(model: Any, tokens: np.ndarray, mask: np.ndarray | None) -> float:
    """Slow reference: -log p(token t | tokens < t) averaged over the t >= 1 in the mask."""
    ids = torch.as_tensor(tokens.astype(np.int64))[None]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)  # (T, V)
    losses = [
        -float(logprobs[t - 1, int(tokens[t])])
        for t in range(1, len(tokens))
        if mask is None or mask[t]
    ]
    return sum(losses) / len(losses)


def test_unit_loss_is_the_mean_nll_over_assistant_tokens(tmp_path, llama_tok):
    long = [*CONVERSATION, {"role": "user", "content": "And Spain?"},
            {"role": "assistant", "content": "Madrid is the capital of Spain."}]  # fmt: skip
    records = [*RECORDS, {"id": "long", "messages": long}]
    cache = build(tmp_path, llama_tok, records, max_length=24)
    model = tiny_llama(llama_tok)
    indices = np.arange(len(cache))
    sums, counts = unit_loss_sums(
        model, cache, indices, [{}], batch_size=3, pad_id=0, device=CPU
    )  # batches of units of several lengths: padding must not matter
    assert counts.tolist() == cache.loss_counts.tolist()
    means = sums[0] / counts
    reference = [
        reference_mean_nll(model, cache.unit_tokens(i), cache.unit_loss_mask(i)) for i in indices
    ]
    # float32 forward batched vs one unit at a time in float64 log-softmax: 1e-5 relative.
    torch.testing.assert_close(
        torch.tensor(means), torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=1e-5
    )
    masked = [i for i in indices if cache.unit_loss_mask(i) is not None]
    assert any(counts[i] < cache.lengths[i] - 1 for i in masked)  # the mask did remove tokens


# --- turn-boundary splitting -----------------------------------------------------------------


def test_turn_windows_cut_at_turn_ends_and_window_a_long_turn():
    assert turn_windows([5, 9, 20], size=10, stride=0) == [(0, 9), (9, 19), (19, 20)]
    assert turn_windows([5, 9, 20], size=12, stride=2) == [(0, 9), (9, 20)]
    assert turn_windows([3, 30], size=10, stride=2) == [(0, 3), (3, 13), (11, 21), (19, 29),
                                                        (27, 30)]  # fmt: skip
    assert turn_windows([4, 8], size=8, stride=0) == [(0, 8)]


def test_conversations_split_at_turn_boundaries(tmp_path, llama_tok):
    size = 20
    cache = build(tmp_path, llama_tok, [RECORDS[0]], max_length=size + 1)  # + its BOS
    messages = tuple(Message(**m) for m in CONVERSATION)
    rendered = render_conversation(llama_tok, messages, "assistant", "t")
    boundaries = [0, *rendered.turn_ends]
    windows = turn_windows(rendered.turn_ends, size, 0)
    assert len(windows) > 1  # the conversation needs several units
    kept = [(s, e) for s, e in windows if any(rendered.loss_mask[s + 1 : e])]
    assert 0 < len(kept) < len(windows)  # windows without an assistant token are dropped
    assert len(cache) == len(kept)
    # Kept units are numbered 0, 1, ... (the k-th unit of the document); turns locate them.
    assert list(cache.units["unit_id"]) == [f"chat#{k}" for k in range(len(kept))]
    spans = [f"{cache.unit_turns(i).first}-{cache.unit_turns(i).last}" for i in range(len(kept))]
    assert list(cache.units["turns"]) == spans and spans[0] != "0-0"
    for i, (start, end) in enumerate(kept):
        assert start in boundaries and end in boundaries  # whole turns only
        body = cache.unit_tokens(i).tolist()[int(start > 0) :]  # a continuation has a BOS
        assert body == rendered.ids[start:end]
        turns = cache.unit_turns(i)
        assert boundaries[turns.first] == start and boundaries[turns.last + 1] == end
        turn_texts = [f"<|{m.role}|>{m.content}<|end|>" for m in messages]
        text = "".join(turn_texts[turns.first : turns.last + 1])  # the template's text
        assert cache.unit_text(i) == ("<s>" if start == 0 else "") + text
        roles = {turns.role_at(p) for p, m in enumerate(cache.unit_loss_mask(i)) if m}
        assert roles == {"assistant"}


def test_a_turn_longer_than_a_unit_is_windowed(tmp_path, llama_tok):
    answer = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
    record = {"id": "x", "messages": [{"role": "user", "content": "Tell me."},
                                      {"role": "assistant", "content": answer}]}  # fmt: skip
    cache = build(tmp_path, llama_tok, [record], max_length=17, stride=4)
    assert len(cache) > 2 and all(n <= 17 for n in cache.lengths)
    assert all(cache.unit_turns(i).roles[-1] == "assistant" for i in range(len(cache)))
    rendered = render_conversation(
        llama_tok, tuple(Message(**m) for m in record["messages"]), "assistant", "t"
    )
    middle = [cache.unit_tokens(i).tolist()[1:] for i in range(1, len(cache) - 1)]
    assert all(len(m) == 16 for m in middle)  # full token windows inside the long turn
    joined = "".join(f"{t} " for t in rendered.ids)
    assert all("".join(f"{t} " for t in m) in joined for m in middle)


# --- --unit-loss all: the rendered text scored as plain text ----------------------------------


def test_unit_loss_all_equals_plain_text_scoring(tmp_path, llama_tok):
    conversation = build(tmp_path, llama_tok, [RECORDS[0]], name="all", unit_loss="all")
    rendered = render_conversation(llama_tok, tuple(Message(**m) for m in CONVERSATION), "all", "t")
    plain = build(
        tmp_path, llama_tok, [{"id": "chat", "text": rendered.text}], name="plain",
        append_eos=False, bos_id=None,
    )  # fmt: skip
    assert conversation.unit_tokens(0).tolist() == plain.unit_tokens(0).tolist()
    model = tiny_llama(llama_tok)
    one = np.arange(1)
    a = unit_loss_sums(model, conversation, one, [{}], batch_size=1, pad_id=0, device=CPU)
    b = unit_loss_sums(model, plain, one, [{}], batch_size=1, pad_id=0, device=CPU)
    assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()  # bit for bit
    assistant = build(tmp_path, llama_tok, [RECORDS[0]], name="asst")
    assert assistant.loss_counts[0] < conversation.loss_counts[0]
    assert conversation.manifest["chunking"]["unit_loss"] == "all"
    assert "unit_loss" not in assistant.manifest["chunking"]  # default: older caches match


# --- formats ---------------------------------------------------------------------------------


def test_parquet_and_datasets_conversations_read_like_jsonl(tmp_path):
    import datasets

    jsonl = load_documents(write_jsonl(tmp_path / "c.jsonl", RECORDS))
    frame = pd.DataFrame(RECORDS)
    frame.to_parquet(tmp_path / "c.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "c.parquet", tmp_path / "ds"):
        assert load_documents(path) == jsonl, path
    assert jsonl[0].messages == tuple(Message(**m) for m in CONVERSATION)
    assert jsonl[1].messages is None and jsonl[2].messages[1] == Message("assistant", "Rome.")


def test_conversation_without_a_template_is_a_clean_error(tmp_path):
    from tests.conftest import make_tiny_tokenizer

    with pytest.raises(InputError, match=r"'chat' is a conversation.*no chat template"):
        build(tmp_path, make_tiny_tokenizer(), RECORDS)


def test_plain_corpus_cache_has_no_conversation_files(tmp_path, llama_tok):
    cache = build(tmp_path, llama_tok, [RECORDS[1]])
    assert not cache.has_turns and "turns" not in cache.units
    assert not any(p.name.startswith("masks") for p in (cache.root / "shards").iterdir())
    assert cache.unit_loss_mask(0) is None


# --- malformed records: one line naming the record --------------------------------------------

ROLE = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", None, 3])
CONTENT = st.one_of(st.text(max_size=8), st.none(), st.integers(), st.just("  "))
MESSAGE = st.fixed_dictionaries({}, optional={"role": ROLE, "content": CONTENT})


@st.composite
def sft_records(draw: Any) -> Any:
    """An SFT record: mostly ``messages`` lists (some broken), or prompt/completion."""
    items = draw(st.lists(MESSAGE, max_size=4))
    messages = draw(st.sampled_from([items, items, items, "text", {"role": "user"}, []]))
    if draw(st.booleans()):
        return {"id": "r", "messages": messages}
    pair = {"prompt": draw(st.one_of(st.none(), CONTENT)), "completion": draw(CONTENT)}
    return {"id": "r", **{k: v for k, v in pair.items() if v is not None}}


def _valid_messages(raw: Any) -> bool:
    return (
        isinstance(raw, list)
        and bool(raw)
        and all(
            isinstance(m, dict)
            and m.get("role") in ("system", "user", "assistant", "tool")
            and isinstance(m.get("content"), str)
            and m["content"].strip()
            for m in raw
        )
        and any(m["role"] == "assistant" for m in raw)
    )


def _valid(record: dict) -> bool:
    if "messages" in record and record["messages"] not in (None, []):
        return _valid_messages(record["messages"])
    if "prompt" not in record and "completion" not in record:
        return False  # neither a conversation nor a text: "no 'text' field"
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        return False
    return _valid_messages(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=sft_records())
def test_fuzzed_sft_records_load_or_fail_on_one_line(tmp_path_factory, record):
    path = tmp_path_factory.mktemp("fuzz") / "sft.jsonl"
    ok = {"id": "ok", "messages": CONVERSATION}
    write_jsonl(path, [ok, record])
    try:
        docs = load_documents(path)
    except InputError as err:
        message = str(err)
        assert "\n" not in message  # one line
        assert not _valid(record) or "surrogate" in message, message
        if "surrogate" not in message:
            assert f"{path} line 2" in message, message  # names the file and the record
        return
    assert _valid(record), record
    assert docs[1].messages is not None and docs[1].messages[-1].role in ("assistant", "user")


def test_malformed_conversations_name_the_problem(tmp_path):
    cases = [
        ({"messages": [{"content": "hi"}]}, "line 1 message 1 has no string 'role'"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "unknown role 'bot'"),
        ({"messages": [{"role": "user", "content": " "}]}, r"\(user\) has an empty content"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
        ({"prompt": "hi"}, "no 'completion'"),
    ]
    for record, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [record])
        with pytest.raises(InputError, match=message):
            load_documents(path)
    frame = pd.DataFrame([{"messages": [{"role": "user", "content": "hi"}]}])
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(InputError, match=r"bad\.parquet row 1: the conversation has no assistant"):
        load_documents(tmp_path / "bad.parquet")


# --- end to end: bgotrace attribute on an SFT corpus --------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft_model")
    tok = make_chatml_tokenizer()
    tiny_gpt2(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _attribute(model_dir: Path, corpus: Path, out: Path, *extra: str) -> Any:
    args = [
        "attribute", "--model", str(model_dir), "--corpus", str(corpus), "--quiet",
        "--cache-dir", str(out.parent / f"{out.name}-cache"), "--max-length", "40",
        "--steps", "2", "--out", str(out), "--chat", "What is the capital of France?",
        "--completion", "Paris is the capital.", *extra,
    ]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_attribute_on_an_sft_corpus_end_to_end(chat_model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "sft.jsonl", RECORDS)
    result = _attribute(chat_model_dir, corpus, tmp_path / "run")
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    cache = TokenCache(tmp_path / "run-cache")
    assert len(scores) == len(cache) and scores["score"].notna().all()
    by_id = scores.set_index("unit_id")
    assert by_id.loc["plain#0", "turns"] == ""
    assert all(by_id.loc[u, "turns"] for u in by_id.index if not u.startswith("plain"))
    assert (by_id["n_tokens"].to_numpy() == cache.loss_counts[by_id["unit_index"]]).all()
    rows = [json.loads(line) for line in (tmp_path / "run" / "top_tokens.jsonl").open()]
    chat_rows = [r for r in rows if "turns" in r]
    assert chat_rows, rows
    for row in chat_rows:
        n = len(row["tokens"])
        assert len(row["token_roles"]) == len(row["token_in_loss"]) == n
        for t, score in enumerate(row["token_scores"]):  # token t + 1 is predicted
            if not row["token_in_loss"][t + 1]:
                assert score == 0.0  # outside the loss: no score
        assert {r for r, m in zip(row["token_roles"], row["token_in_loss"], strict=True) if m} == {
            "assistant"
        }
    report = (tmp_path / "run" / "report.html").read_text()
    assert '<div class="turn assistant"><span class="role">assistant · turn' in report
    everything = _attribute(chat_model_dir, corpus, tmp_path / "all", "--unit-loss", "all")
    assert everything.exit_code == 0, everything.output
    again = pd.read_parquet(tmp_path / "all" / "scores.parquet").set_index("unit_id")
    assert (again.loc["chat#0", "n_tokens"]) == TokenCache(tmp_path / "all-cache").lengths[0] - 1
    assert again.loc["plain#0", "n_tokens"] == by_id.loc["plain#0", "n_tokens"]


def test_unit_length_documents_roles_in_rendered_text(chatml_tok):
    """The conversation document a cache stores is its rendered text (snippets read it)."""
    doc = Document("d", "[]", "s", messages=(Message("user", "Hi"), Message("assistant", "Yo")))
    rendered = render_conversation(chatml_tok, doc.messages or (), "assistant", "d")
    assert rendered.text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n"
    assert rendered.roles == ("user", "assistant") and rendered.turn_ends[-1] == len(rendered.ids)


def test_trainer_labels_equal_the_scorers(tmp_path, llama_tok):
    """SFT fine-tuning (``bgotrace.train``) takes the loss on the tokens the sweep scores."""
    from bgotrace.chat import conversation_renderer
    from bgotrace.corpus import tokenize_and_chunk
    from bgotrace.train.trainer import batch_tensors

    cache = build(tmp_path, llama_tok, RECORDS, max_length=24)
    chunking = ChunkingConfig(24, bos_id=llama_tok.bos_token_id)
    docs = load_documents(tmp_path / "c.jsonl")
    units = tokenize_and_chunk(
        docs, llama_tok, chunking, conversation_renderer(llama_tok, "assistant")
    )
    assert [u.unit_id for u in units] == list(cache.units["unit_id"])
    chat_ids = [u.unit_id for u in units if u.doc_id == "chat"]
    assert chat_ids == [f"chat#{k}" for k in range(len(chat_ids))]  # numbered past a drop
    assert cache.unit_turns(0).first > 0  # the system and user turns alone were dropped
    order = np.argsort(cache.lengths, kind="stable")  # collate takes any order
    trained = batch_tensors([units[i] for i in order], pad_id=0)["labels"]
    _, _, scored = collate(cache, order, 0, CPU)
    assert torch.equal(trained, scored)
    assert (trained == -100).sum() > (scored.shape[0] * scored.shape[1] - cache.lengths.sum())


def test_subset_views_and_shipped_blocks_keep_the_masks(tmp_path, llama_tok):
    """Reranked subsets and blocks shipped to Ray workers give collate the same labels."""
    from bgotrace.dist.units import UnitSlice
    from bgotrace.score.executor import Block
    from bgotrace.score.subset import SubsetUnits

    cache = build(tmp_path, llama_tok, RECORDS, max_length=24)
    picked = np.array([len(cache) - 1, 0, 1])
    subset = SubsetUnits(cache, picked)
    block = UnitSlice.of_block(subset, Block(0, 0, len(picked)))
    _, _, expected = collate(cache, picked, 0, CPU)
    for view in (subset, block):
        _, _, labels = collate(view, np.arange(len(picked)), 0, CPU)
        assert torch.equal(labels, expected)
    assert subset.loss_counts.tolist() == cache.loss_counts[picked].tolist()


def test_python_api_takes_sft_records(tmp_path, chatml_tok):
    import bgotrace
    from bgotrace.query import Query

    answer = (Message("user", "Capital of Italy?"), Message("assistant", "Rome."))
    result = bgotrace.attribute(
        tiny_gpt2(chatml_tok), chatml_tok, RECORDS, queries=[Query.chat("it", answer)],
        config={"corpus": {"max_length": 40}, "perturb": {"steps": 1}},
    )  # fmt: skip
    assert set(result.scores["unit_id"]) >= {"pc#0", "plain#0"}
    assert (result.scores.set_index("unit_id").loc["pc#0", "turns"]) == "0-1"
    from bgotrace.corpus import corpus_fingerprint

    one, two = (Document("d", "", "s", messages=m) for m in (answer, answer[:1] + answer[:1]))
    assert corpus_fingerprint([one]) != corpus_fingerprint([two])  # the messages, not the text


def test_template_ids_that_the_text_does_not_give_are_refused(llama_tok):
    """Units map back to text through the rendered text's offsets: its tokens must be the
    template's, or the conversation is refused (one line, naming the document)."""
    import dataclasses

    from bgotrace.chat import conversation_renderer
    from bgotrace.corpus import documents_from_records
    from bgotrace.corpus.chunking import iter_chunked_batches

    render = conversation_renderer(llama_tok, "assistant")

    def shifted(doc: Document) -> Any:
        rendered = render(doc)
        return dataclasses.replace(rendered, ids=[rendered.ids[0], *rendered.ids[2:], 5])

    docs = documents_from_records(RECORDS[:1])
    with pytest.raises(InputError, match="Corpus document chat: its chat-rendered text tokenizes"):
        list(iter_chunked_batches(docs, llama_tok, ChunkingConfig(64), render=shifted))
    (batch,) = iter_chunked_batches(docs, llama_tok, ChunkingConfig(64), render=render)
    assert batch.tokens.tolist() == llama_pieces(llama_tok, CONVERSATION)[0]


def test_cache_build_unit_loss_is_what_attribute_reuses(chat_model_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "sft.jsonl", RECORDS)
    cache_dir = tmp_path / "run-cache"
    built = CliRunner().invoke(app, [
        "cache", "build", "--model", str(chat_model_dir), "--corpus", str(corpus), "--quiet",
        "--max-length", "40", "--unit-loss", "all", "--cache-dir", str(cache_dir),
    ])  # fmt: skip
    assert built.exit_code == 0, built.output
    assert TokenCache(cache_dir).manifest["chunking"]["unit_loss"] == "all"
    reuse = _attribute(chat_model_dir, corpus, tmp_path / "run", "--unit-loss", "all")
    assert reuse.exit_code == 0, reuse.output
    other = _attribute(chat_model_dir, corpus, tmp_path / "run")  # assistant: another cache
    assert other.exit_code == 2 and "chunking.unit_loss: stored 'all'" in other.output


# --- a cache with masks is refused by a reader that does not know them -----------------------

PLAIN_MANIFEST_KEYS = {
    "format_version", "tokenizer_fingerprint", "tokenizer_name_or_path", "chunking",
    "corpus_files", "corpus_fingerprint", "n_documents", "n_units", "n_tokens", "max_token_id",
    "shards", "created_at",
}  # fmt: skip
"""A format-2 manifest of a corpus on disk, as it was before caches could hold masks."""


def test_sft_cache_requires_loss_masks_and_plain_cache_stays_format_2(tmp_path, llama_tok):
    plain = build(tmp_path, llama_tok, [RECORDS[1]], name="plain")
    assert plain.manifest["format_version"] == 2 and set(plain.manifest) == PLAIN_MANIFEST_KEYS
    sft = build(tmp_path, llama_tok, RECORDS, name="sft")
    assert sft.manifest["format_version"] == 3 and sft.manifest["requires"] == ["loss-masks"]
    again = build(tmp_path, llama_tok, RECORDS, name="sft")  # format 3 is what was requested
    assert again.manifest["created_at"] == sft.manifest["created_at"]  # reused, not rebuilt


def test_a_reader_without_masks_refuses_an_sft_cache(tmp_path, llama_tok, monkeypatch):
    from bgotrace.cache import token_cache
    from bgotrace.errors import CacheMismatchError

    sft, plain = build(tmp_path, llama_tok, RECORDS), build(tmp_path, llama_tok, RECORDS[1:2], "p")
    monkeypatch.setattr(token_cache, "KNOWN_FEATURES", frozenset())  # a reader without masks
    with pytest.raises(CacheMismatchError) as refused:
        TokenCache(sft.root)
    message = str(refused.value)
    assert "\n" not in message and "requires loss-masks" in message
    assert "upgrade bgotrace" in message and "--rebuild-cache" in message
    with pytest.raises(CacheMismatchError, match="requires loss-masks"):
        build(tmp_path, llama_tok, RECORDS)  # the reuse path opens it the same way
    assert len(TokenCache(plain.root)) == 1  # a plain cache needs nothing
    monkeypatch.setattr(token_cache, "READABLE_FORMATS", (2,))  # a reader of format 2 only
    with pytest.raises(CacheMismatchError, match="has format 3.*upgrade bgotrace"):
        TokenCache(sft.root)


# --- rendering reuses renders: equal to rendering and tokenizing every prefix -----------------


def slow_rendering(tok: Any, messages: tuple[Message, ...], unit_loss: str) -> tuple:
    """Reference: each prefix rendered and tokenized by ``apply_chat_template`` on its own,
    checked to start the whole conversation's tokens; the mask of :func:`assistant_mask`
    (the queries' path: the generation-prompt prefix of each assistant turn tokenized)."""
    from bgotrace.chat import assistant_mask, render_ids

    full = render_ids(tok, messages, "t", generation_prompt=False)
    ends = []
    for k in range(1, len(messages)):
        prefix = render_ids(tok, messages[:k], "t", generation_prompt=False)
        if full[: len(prefix)] != prefix:
            raise InputError("not a prefix")
        ends.append(len(prefix))
    mask = assistant_mask(tok, messages, full, "t") if unit_loss == "assistant" else None
    text = tok.apply_chat_template([m.to_dict() for m in messages], tokenize=False)
    return text, full, mask or [True] * len(full), [*ends, len(full)]


WORDS = st.sampled_from(["the", "quick", "fox", " ", "  ", "\n", "é", "日本", "Paris.", "<|end"])
CONTENTS = st.lists(WORDS, min_size=1, max_size=6).map("".join).filter(str.strip)


@st.composite
def conversations(draw: Any) -> tuple[Message, ...]:
    """Optional system turn, then user/assistant pairs; the last may be a user turn."""
    roles = ["system"] * draw(st.booleans()) + ["user", "assistant"] * draw(st.integers(1, 3))
    roles = roles[: len(roles) - draw(st.booleans())] if len(roles) > 2 else roles
    return tuple(Message(r, draw(CONTENTS)) for r in roles)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversations(), unit_loss=st.sampled_from(["assistant", "all"]))
def test_rendering_equals_tokenizing_every_prefix(llama_tok, chatml_tok, messages, unit_loss):
    for tok in (llama_tok, chatml_tok):
        fast = render_conversation(tok, messages, unit_loss, "t")
        text, ids, mask, ends = slow_rendering(tok, messages, unit_loss)
        assert (fast.text, fast.ids, fast.loss_mask, fast.turn_ends) == (text, ids, mask, ends)


def test_a_template_cutting_a_token_at_a_turn_is_refused(tmp_path):
    """Turns written without a separator: the user's "Par" and the answer's "is" make the
    token "ris" of the whole text, so no token boundary ends the user turn: refused."""
    glued = make_chatml_tokenizer("{% for m in messages %}{{ m.content }}{% endfor %}")
    messages = (Message("user", "Par"), Message("assistant", "is the capital."))
    whole = glued("Paris the capital.")["input_ids"]
    assert glued.convert_ids_to_tokens(whole[:2]) == ["Pa", "ris"]  # a token across turns
    record = {"id": "glued", "messages": [m.to_dict() for m in messages]}
    with pytest.raises(InputError, match=r"'glued'.*do not start the whole conversation"):
        build(tmp_path, glued, [record])
    broken = make_chatml_tokenizer(CHATML_BOT_PROMPT)  # a generation prompt SFT never saw
    with pytest.raises(InputError, match=r"'chat'.*turns before message 3 as tokens"):
        build(tmp_path, broken, RECORDS, name="broken")
