"""Conversations as queries: rendered with the tokenizer's chat template as in fine-tuning.

Two tokenizers built in code, each given a small Jinja chat template: a Llama-style one
(Metaspace BPE whose post-processor adds ``<s>``, template starting with ``{{ bos_token }}``)
and the GPT-2-style test tokenizer with a ChatML template. The reference for every mask is
the obvious one: the template's pieces tokenized one by one (special tokens split the text,
so the pieces' tokens concatenate to the conversation's) and the assistant pieces marked.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bgotrace.chat import Message, parse_messages, render_chat
from bgotrace.cli.main import app
from bgotrace.corpus.bos import would_double_bos
from bgotrace.errors import InputError
from bgotrace.generate import generate_reply
from bgotrace.query import Query, encode_query, load_queries
from tests.conftest import TOKENIZER_TRAINING_TEXT, make_tiny_tokenizer
from tests.models import tiny_gpt2

LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}{% else %}{{ m.content }}"
    "<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SHORT = (
    Message("user", "Capital of France?"),
    Message("assistant", "Paris."),
    Message("user", "Germany?"),
    Message("assistant", "Berlin."),
)
"""A conversation that fits the tiny test model's 64 positions."""
CONVERSATION = (
    Message("system", "Be brief."),
    Message("user", "What is the capital of France?"),
    Message("assistant", "Paris is the capital."),
    Message("user", "And Germany?"),
    Message("assistant", "Berlin."),
)


def make_llama_chat_tokenizer(template: str = LLAMA_TEMPLATE):
    """Metaspace BPE adding ``<s>`` in front (as Llama's), with role tokens and a template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    backend.train_from_iterator(TOKENIZER_TRAINING_TEXT.splitlines() * 3, trainer=trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
    )
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    tok.add_special_tokens({"additional_special_tokens": roles})
    tok.chat_template = template
    return tok


def make_chatml_tokenizer(template: str = CHATML):
    tok = make_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def _pieces(tok: Any, head: list[int]) -> tuple[list[int], list[bool]]:
    """Reference: the Llama template's pieces tokenized one by one, assistant ones marked."""
    ids, assistant = list(head), [False] * len(head)
    for m in CONVERSATION:
        role = tok.convert_tokens_to_ids(f"<|{m.role}|>")
        content = tok(m.content, add_special_tokens=False)["input_ids"]
        turn = [*content, tok.convert_tokens_to_ids("<|end|>")]
        ids += [role, *turn]
        assistant += [False] + [m.role == "assistant"] * len(turn)
    return ids, assistant


def test_llama_template_has_bos_once_and_masks_the_assistant(llama_tok, caplog):
    bos = llama_tok.bos_token_id
    expected, assistant = _pieces(llama_tok, [bos])
    with caplog.at_level(logging.WARNING):
        chat = render_chat(llama_tok, CONVERSATION, "assistant", "q")
    assert chat.input_ids == expected
    assert chat.input_ids.count(bos) == 1  # the template's BOS, none added on top
    assert chat.loss_mask == assistant
    assert "already starts with the BOS token" in caplog.text  # the doubled-BOS diagnosis
    # The prompt ends with the generation prompt; the completion is the last turn + <|end|>.
    answer = llama_tok("Berlin.", add_special_tokens=False)["input_ids"]
    last = len(expected) - len(answer) - 1  # the answer's tokens, then <|end|>
    assert chat.prompt_length == last
    assert llama_tok.convert_ids_to_tokens(expected[last - 1]) == "<|assistant|>"
    completion = render_chat(llama_tok, CONVERSATION, "completion", "q")
    assert completion.loss_mask == [i >= last for i in range(len(expected))]
    assert render_chat(llama_tok, CONVERSATION, "all", "q").loss_mask == [True] * len(expected)


def test_template_without_bos_gets_none_and_no_warning(caplog):
    tok = make_llama_chat_tokenizer(LLAMA_TEMPLATE.removeprefix("{{ bos_token }}"))
    with caplog.at_level(logging.WARNING):
        chat = render_chat(tok, CONVERSATION, "completion", "q")
    assert chat.input_ids == _pieces(tok, [])[0]  # the template decides: no BOS
    assert not would_double_bos(tok, chat.text) and "BOS" not in caplog.text


def test_chatml_on_a_gpt2_tokenizer(chatml_tok):
    tok = chatml_tok
    chat = render_chat(tok, CONVERSATION, "completion", "q")
    decoded = tok.decode([i for i, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m])
    assert decoded == "Berlin.<|im_end|>\n"
    assert chat.text.startswith(chat.prompt_text)
    assert chat.prompt_text.endswith("<|im_start|>assistant\n")
    assistant = render_chat(tok, CONVERSATION, "assistant", "q")
    picked = [i for i, m in zip(assistant.input_ids, assistant.loss_mask, strict=True) if m]
    reference = tok("Paris is the capital.<|im_end|>\nBerlin.<|im_end|>\n")["input_ids"]
    assert picked == reference


def test_generation_markers_give_the_assistant_mask():
    tok = make_chatml_tokenizer(CHATML_GENERATION)
    chat = render_chat(tok, CONVERSATION, "assistant", "q")
    picked = [i for i, m in zip(chat.input_ids, chat.loss_mask, strict=True) if m]
    # The markers leave out the newline after each turn, as SFT with them trains.
    assert tok.decode(picked) == "Paris is the capital.<|im_end|>Berlin.<|im_end|>"


def test_encoded_chat_query_labels_and_text(chatml_tok):
    query = Query.chat("c1", CONVERSATION, loss_on="assistant")
    encoded = encode_query(query, chatml_tok, max_context=128, bos_id=0)  # bos_id: unused
    chat = render_chat(chatml_tok, CONVERSATION, "assistant", "q")
    assert encoded.input_ids[0].tolist() == chat.input_ids
    pairs = zip(chat.input_ids, chat.loss_mask, strict=True)
    expected = torch.tensor([i if m else -100 for i, m in pairs])
    assert torch.equal(encoded.labels[0], expected)
    assert encoded.query.prompt == chat.prompt_text
    assert encoded.query.completion == "Berlin.<|im_end|>\n"
    assert encoded.query.messages == CONVERSATION
    assert encoded.query.messages_record()["messages"][2] == CONVERSATION[2].to_dict()
    with pytest.raises(InputError, match="has 92 tokens but the model reads at most 64"):
        encode_query(query, chatml_tok, max_context=64)


def test_template_problems_are_clean_errors(chatml_tok):
    bare = make_tiny_tokenizer()  # no chat template
    with pytest.raises(
        InputError, match=r"no chat template.*tokenizer\.chat_template = .*--prompt"
    ):
        encode_query(Query.chat("c", CONVERSATION), bare, None)
    broken = make_chatml_tokenizer(CHATML.replace("assistant\n{% endif", "bot\n{% endif"))
    with pytest.raises(InputError, match="do not start the whole conversation"):
        render_chat(broken, CONVERSATION, "completion", "q")
    strict = make_chatml_tokenizer(
        "{% if messages[0].role == 'system' %}{{ raise_exception('no system turn') }}"
        "{% endif %}" + CHATML
    )
    with pytest.raises(InputError, match="refused this conversation.*no system turn"):
        render_chat(strict, CONVERSATION, "completion", "q")
    with pytest.raises(InputError, match="loss_on=assistant needs a conversation"):
        Query("q", "Paris is", " the capital.", loss_on="assistant")


def test_query_file_with_messages(tmp_path, chatml_tok):
    path = tmp_path / "q.jsonl"
    rows = [
        {"id": "chat", "messages": [m.to_dict() for m in CONVERSATION]},
        {"id": "text", "prompt": "Paris is", "completion": " the capital."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chat, text = load_queries(path, loss_on="completion")
    assert chat.messages == CONVERSATION and text.messages is None
    assert encode_query(chat, chatml_tok, None).n_loss_tokens == len(
        chatml_tok("Berlin.<|im_end|>\n")["input_ids"]
    )


ROLE = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", None, 3])
CONTENT = st.one_of(st.text(max_size=12), st.none(), st.integers(), st.just("  "))


@st.composite
def message_records(draw: Any) -> Any:
    """A ``messages`` value: mostly lists of role/content objects, some broken."""
    items = draw(
        st.lists(st.fixed_dictionaries({}, optional={"role": ROLE, "content": CONTENT}), max_size=4)
    )
    return draw(st.sampled_from([items, items, items, "text", {"role": "user"}, None]))


def _valid(raw: Any) -> bool:
    if not isinstance(raw, list) or len(raw) < 2 or raw[-1].get("role") != "assistant":
        return False
    return all(
        m.get("role") in ("system", "user", "assistant", "tool")
        and isinstance(m.get("content"), str)
        and m["content"].strip()
        for m in raw
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=message_records())
def test_fuzzed_message_records_load_or_fail_cleanly(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "q.jsonl"
    path.write_text("\n" + json.dumps({"id": "x", "messages": raw}) + "\n")
    try:
        (query,) = load_queries(path)
    except InputError as err:
        assert "\n" not in str(err)  # one line
        # Names the record; half an emoji is caught by the query itself, naming its id.
        assert ("line 2" in str(err) and not _valid(raw)) or "surrogate" in str(err)
        return
    assert _valid(raw)
    assert query.messages == parse_messages(raw, "x")


def test_parse_messages_names_the_problem():
    cases = [
        ([{"role": "user"}], "message 1 has no string 'content'"),
        ([{"content": "hi"}], "message 1 has no string 'role'"),
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot'"),
        ([{"role": "user", "content": " "}], r"message 1 \(user\) has an empty content"),
        ([], "non-empty list"),
    ]
    for raw, message in cases:
        with pytest.raises(InputError, match=message):
            parse_messages(raw, "Query file q.jsonl line 3")
    with pytest.raises(InputError, match="last message is a user turn"):
        Query.chat("q", (Message("user", "hi"),))


# --- end to end: generate --messages and attribute --queries chat.jsonl -------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_model")
    tok = make_chatml_tokenizer()
    tiny_gpt2(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _greedy_reference(model: Any, ids: list[int], n: int, stop: int) -> list[int]:
    """Slow reference: argmax of the next-token logits, one token at a time."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == stop:
                break
    return out


def test_generate_messages_end_to_end(chat_model_dir, tmp_path):
    from bgotrace.chat import render_ids
    from bgotrace.modeling.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(chat_model_dir), device="cpu")
    turns = (Message("user", "What is the capital of France?"),)
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps({"messages": [m.to_dict() for m in turns]}))
    result = CliRunner().invoke(
        app, ["generate", "--model", str(chat_model_dir), "--messages", str(path),
              "--max-new-tokens", "6"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    reply = generate_reply(model, tok, turns, max_new_tokens=6)
    assert result.stdout.strip() == reply.strip()
    prompt = render_ids(tok, turns, "t", generation_prompt=True)
    expected = _greedy_reference(model, prompt, 6, tok.eos_token_id)
    assert reply == tok.decode(expected, skip_special_tokens=True)
    chat = CliRunner().invoke(
        app, ["generate", "--model", str(chat_model_dir), "--chat", turns[0].content,
              "--max-new-tokens", "6"]
    )  # fmt: skip
    assert chat.exit_code == 0 and chat.stdout.strip() == reply.strip()
    both = CliRunner().invoke(
        app, ["generate", "--model", str(chat_model_dir), "--chat", "a", "--prompt", "b"]
    )
    assert both.exit_code != 0 and "exactly one of" in both.output


def _attribute(model_dir: Any, tmp_path: Any, *query_args: str) -> Any:
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.jsonl"
    texts = ["Paris is the capital of France.", "Berlin is in Germany.", "Water boils."]
    corpus.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    args = ["attribute", "--model", str(model_dir), "--corpus", str(corpus), "--quiet",
            "--cache-dir", str(tmp_path / "cache"), "--max-length", "12", "--steps", "2",
            "--out", str(tmp_path / "run"), *query_args]  # fmt: skip
    return CliRunner().invoke(app, args)


def test_attribute_chat_queries_end_to_end(chat_model_dir, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {"id": "fr", "messages": [m.to_dict() for m in SHORT[:2]]},
        {"id": "de", "messages": [m.to_dict() for m in SHORT], "loss_on": "assistant"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = _attribute(chat_model_dir, tmp_path, "--queries", str(path))
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    fr, de = summary["queries"]
    assert fr["messages"] == rows[0]["messages"] and de["loss_on"] == "assistant"
    assert fr["completion"] == "Paris.<|im_end|>\n"
    assert fr["prompt"].endswith("<|im_start|>assistant\n")
    tok = make_chatml_tokenizer()
    n_de = sum(render_chat(tok, SHORT, "assistant", "q").loss_mask)
    assert de["n_loss_tokens"] == n_de
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<dt>user</dt><dd>Capital of France?</dd>" in report  # the turns with their roles
    assert "<dt>assistant</dt><dd><b>Berlin.</b></dd>" in report


def test_attribute_chat_flag_equals_the_messages_file(chat_model_dir, tmp_path):
    user, answer = SHORT[0].content, SHORT[1].content
    flag = _attribute(chat_model_dir, tmp_path / "a", "--chat", user, "--completion", answer)
    assert flag.exit_code == 0, flag.output
    path = tmp_path / "conversation.jsonl"
    path.write_text("".join(json.dumps(m.to_dict()) + "\n" for m in SHORT[:2]))
    file = _attribute(chat_model_dir, tmp_path / "b", "--messages", str(path))
    assert file.exit_code == 0, file.output
    scores = [
        json.loads((tmp_path / d / "run" / "summary.json").read_text())["queries"][0]
        for d in ("a", "b")
    ]
    assert scores[0]["top_units"] == scores[1]["top_units"]
    assert scores[0]["messages"] == scores[1]["messages"]


def test_python_api_takes_chat_queries(tmp_path):
    import bgotrace
    from bgotrace.corpus import Document

    tok = make_chatml_tokenizer()
    docs = [Document("fr", "Paris is the capital of France.", "geo"),
            Document("de", "Berlin is in Germany.", "geo")]  # fmt: skip
    cfg = {"corpus": {"max_length": 12, "cache_dir": str(tmp_path / "cache")},
           "perturb": {"steps": 2}}  # fmt: skip
    query = Query.chat("de", [m.to_dict() for m in SHORT], loss_on="assistant")
    result = bgotrace.attribute(tiny_gpt2(tok), tok, docs, queries=[query], config=cfg)
    (entry,) = result.summary["queries"]
    assert entry["messages"] == [m.to_dict() for m in SHORT]
    assert entry["n_loss_tokens"] == sum(render_chat(tok, SHORT, "assistant", "q").loss_mask)
    assert len(result.top(2)) == 2
