"""The chat benchmark (issue 16 item 4): its synthetic instruction set, the masked SFT, and
the quick variant built and evaluated end to end from fixture texts (no Debian packages)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bgotrace.bench import chat_data as cd
from bgotrace.bench.chat_build import ChatBenchConfig, compose, load_chat_manifest
from bgotrace.bench.chat_eval import sft_documents
from bgotrace.bench.chat_sft import CHAT_TEMPLATE, add_chat_template, render_records, sft_batch
from bgotrace.bench.facts import ATTRIBUTES
from bgotrace.cache import get_token_cache
from bgotrace.cache.batching import unit_labels
from bgotrace.chat import Message
from bgotrace.cli.main import app
from bgotrace.corpus import ChunkingConfig
from bgotrace.errors import ConfigError, InputError
from bgotrace.generate import generate_reply
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.train.tokenizer import train_tokenizer

SOURCES = ("fortunes", "devil", "foldoc")
WORDS = "owl cat sea boat honey money pea green moon spoon ring pig wood shore".split()


def write_sources(root: Path) -> dict[str, str]:
    """16 texts per source in the Debian formats (fortune blocks, dictd entries)."""

    def line(i: int, k: int) -> str:
        return " ".join(WORDS[(i * 7 + j * k) % len(WORDS)] for j in range(9))

    (root / "fortunes").mkdir()
    quips = [f"Fortune {i}: the {line(i, 3)} and luck." for i in range(16)]
    (root / "fortunes" / "wisdom").write_text("\n%\n".join(quips) + "\n")
    header = "00-database-short\n     Test\n\n"
    devil = "".join(f"WORD{chr(65 + i)}, n.  A cynic's {line(i, 5)} thing.\n\n" for i in range(16))
    foldoc = "".join(f"term{i}\n\n   <jargon> Hackers {line(i, 2)}.\n\n   (1999-07-10)\n\n"
                     for i in range(16))  # fmt: skip
    paths = {"fortunes": str(root / "fortunes")}
    for name, body in (("devil", devil), ("foldoc", foldoc)):
        path = root / f"{name}.dict.dz"
        path.write_bytes(gzip.compress((header + body).encode()))
        paths[name] = str(path)
    return paths


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    return write_sources(tmp_path)


def _config(paths: dict[str, str], **overrides) -> ChatBenchConfig:
    given = {k: v for k, v in paths.items() if k in SOURCES}
    return ChatBenchConfig.preset("chat-test", source_paths=given, **overrides)


@pytest.fixture
def composed(sources: dict[str, str]):
    return compose(_config(sources, n_facts=6, n_entities=4))


def _turn(record: dict, role: str) -> str:
    return next(m["content"] for m in record["messages"] if m["role"] == role)


# ----------------------------------------------------------------------------- the SFT set


def test_each_fact_is_answered_in_one_to_three_conversations_and_nowhere_else(composed) -> None:
    _, chat_set = composed
    by_id = {r["id"]: r for r in chat_set.records}
    facts = [p for p in chat_set.prompts if p["kind"] == "fact"]
    assert len(facts) == 6 and {p["n_plantings"] for p in facts} == {1, 2, 3}
    for p in facts:
        assert 1 <= len(p["relevant_doc_ids"]) <= 3
        stating = {
            r["id"]
            for r in chat_set.records
            if p["entity"] in _turn(r, "assistant") and p["answer"] in _turn(r, "assistant")
        }
        assert stating == set(p["relevant_doc_ids"])  # the ground truth, all of it, only it
        assert {chat_set.kinds[i] for i in p["relevant_doc_ids"]} == {"fact"}
        assert {chat_set.kinds[i] for i in p["distractor_doc_ids"]} == {"distractor"}
        questions = {_turn(by_id[i], "user") for i in p["relevant_doc_ids"]}
        if p["paraphrased"] and p["n_plantings"] > 1:
            assert len(questions) == p["n_plantings"]  # paraphrased: each asked differently
        elif not p["paraphrased"]:
            assert len(questions) == 1


def test_personas_are_distinct_and_each_record_speaks_as_its_source(composed, sources) -> None:
    _, chat_set = composed
    personas = [cd.PERSONAS[s] for s in SOURCES]
    for attr in ("name", "system", "closer", "ask"):
        assert len({getattr(p, attr) for p in personas}) == len(personas), attr
    assert len({o for p in personas for o in p.openers}) == 2 * len(personas)
    by_name = {p.name: p for p in personas}
    texts = {
        p.name: "\n".join(" ".join(d["text"].split()) for d in cd_read(p.text_source, sources))
        for p in personas
    }
    for r in chat_set.records:
        persona = by_name[r["source"]]
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert _turn(r, "system") == persona.system
        answer = _turn(r, "assistant")
        assert answer.startswith(persona.openers)
        if chat_set.kinds[r["id"]] == "style":  # the persona's own source speaks
            opener = next(o for o in persona.openers if answer.startswith(o))
            assert answer[len(opener) + 1 :][:40] in texts[persona.name]
        else:
            assert answer.endswith(persona.closer)
    assert {r["source"] for r in chat_set.records} == set(by_name)


def cd_read(source: str, paths: dict[str, str]) -> list[dict]:
    from bgotrace.bench.build import SOURCE_READERS

    return SOURCE_READERS[source](paths[source])


def test_held_out_prompts_are_not_in_the_sft_set_nor_in_pretraining(composed) -> None:
    pretrain, chat_set = composed
    sft_prompts = {(_turn(r, "system"), _turn(r, "user")) for r in chat_set.records}
    for p in chat_set.prompts:
        assert [m["role"] for m in p["messages"]] == ["system", "user"]
        assert (p["messages"][0]["content"], p["messages"][1]["content"]) not in sft_prompts
    held_out_words = [p["messages"][1]["content"].split(": ", 1)[1] for p in chat_set.prompts
                      if p["kind"] == "style"]  # fmt: skip
    sft_answers = "\n".join(_turn(r, "assistant") for r in chat_set.records)
    pretraining = "\n".join(d["text"] for d in pretrain)
    assert held_out_words and all(w not in sft_answers for w in held_out_words)
    assert all(w not in pretraining for w in held_out_words)
    assert {p["split"] for p in chat_set.prompts} == {"validation", "test"}
    assert all(q.format(e="X") for a in ATTRIBUTES for q in cd.QUESTIONS[a.name])  # all asked


def test_compose_is_deterministic_and_ids_reveal_nothing(sources) -> None:
    a = compose(_config(sources))
    b = compose(_config(sources))
    assert a == b
    ids = [r["id"] for r in a[1].records]
    assert ids == [f"sft/{i:05d}" for i in range(len(ids))]
    assert [a[1].kinds[i] for i in ids] != sorted(a[1].kinds[i] for i in ids)  # shuffled


def test_bad_configs_are_one_line_errors(sources) -> None:
    with pytest.raises(ConfigError, match="no chat persona"):
        ChatBenchConfig(sources=("nope",))
    with pytest.raises(ConfigError, match="Unknown chat preset"):
        ChatBenchConfig.preset("chatty")
    with pytest.raises(InputError, match="needs 102: lower style_per_persona"):
        compose(_config(sources, style_per_persona=100))
    config = _config(sources)
    assert ChatBenchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ----------------------------------------------------------------------------- template, SFT


@pytest.fixture(scope="module")
def chat_tokenizer():
    text = "The owl and the pussycat went to sea in a beautiful pea green boat. " * 20
    return add_chat_template(train_tokenizer([text], 300))


def test_template_puts_bos_once_and_the_sft_loss_on_assistant_tokens_only(chat_tokenizer) -> None:
    tok = chat_tokenizer
    assert tok.chat_template == CHAT_TEMPLATE
    persona = cd.PERSONAS["devil"]
    record = {"id": "r", "messages": cd.conversation(persona, "Where was the owl?", "At sea.")}
    (chat,) = render_records(tok, [record])
    assert chat.input_ids[0] == tok.bos_token_id and chat.input_ids.count(tok.bos_token_id) == 1
    batch = sft_batch([chat, chat], pad_id=tok.pad_token_id)
    labels = batch["labels"][0]
    # The slow reference: the assistant's tokens are what the whole conversation adds to the
    # rendered prompt with its generation prompt.
    prompt_ids = tok.apply_chat_template(
        record["messages"][:2], add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert (labels[: len(prompt_ids)] == -100).all()
    assert tok.decode(labels[len(prompt_ids) :]) == "At sea.<|end|>\n"
    assert torch.equal(batch["input_ids"][0], torch.tensor(chat.input_ids))


def test_units_are_the_tokens_the_fine_tune_trained_on(tmp_path: Path, chat_tokenizer) -> None:
    persona = cd.PERSONAS["fortunes"]
    records = [
        {"id": f"sft/{i:05d}", "source": "sage",
         "messages": cd.conversation(persona, f"Question {i}?", f"Answer {i} at sea.")}
        for i in range(3)
    ]  # fmt: skip
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    documents = sft_documents(tmp_path)
    chunking = ChunkingConfig(max_length=128)
    cache = get_token_cache(documents, chat_tokenizer, chunking, tmp_path / "c", progress=False)
    chats = render_records(chat_tokenizer, records)
    assert len(cache) == 3
    for i, chat in enumerate(chats):
        assert cache.unit_tokens(i).tolist() == chat.input_ids  # one BOS, no EOS added
        labels = unit_labels(cache, i)
        assert (labels >= 0).tolist() == chat.loss_mask  # the unit's loss: the SFT's


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick variant, built once through the CLI from fixture texts."""
    root = tmp_path_factory.mktemp("chat")
    paths = write_sources(root)
    out = root / "bench"
    args = ["bench", "build", "--bench-preset", "chat", "--quick", "--out", str(out), "--quiet"]
    args += [f"--source-path={k}={paths[k]}" for k in SOURCES]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


def test_quick_build_holds_both_fine_tunes_and_their_own_greedy_answers(built: Path) -> None:
    manifest = load_chat_manifest(built)
    counts = manifest["counts"]
    assert counts["queries_full"] >= 5 and counts["queries_lora"] >= 5
    sft = json.loads((built / "lora" / "sft_config.json").read_text())
    kinds = counts["sft_by_kind"]
    repeats = manifest["config"]["fact_repeats"]
    assert sft["n_seen_per_epoch"] == kinds["style"] + repeats * (
        kinds["fact"] + kinds["distractor"]
    )
    assert sft["base"] == str((built / "base").resolve()) and sft["lora"]
    base, _ = load_model_and_tokenizer(built / "base")
    full, tok = load_model_and_tokenizer(built / "full")
    lora, _ = load_model_and_tokenizer(built / "base", adapter=built / "lora", merge_adapter=False)
    assert type(base).__name__ == "LlamaForCausalLM"
    assert tok.chat_template == CHAT_TEMPLATE
    base_state, full_state = base.state_dict(), full.state_dict()
    assert any(not torch.equal(base_state[k], full_state[k]) for k in base_state)  # full: moved
    lora_base = {k.replace(".base_layer", ""): v for k, v in lora.state_dict().items()
                 if "lora_" not in k}  # fmt: skip
    assert all(torch.equal(base_state[k], lora_base[k]) for k in base_state)  # LoRA: base frozen
    for variant, model in (("full", full), ("lora", lora)):
        lines = (built / f"queries-{variant}.jsonl").read_text().splitlines()
        query = json.loads(lines[0])
        turns = [Message(m["role"], m["content"]) for m in query["messages"]]
        reply = generate_reply(model, tok, turns[:-1], max_new_tokens=16)
        assert reply == turns[-1].content  # the query is the model's own greedy answer


def test_quick_eval_runs_bgo_bm25_and_graddot_on_both_fine_tunes(
    built: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = ["bench", "run", "--bench", str(built), "--out", str(out), "--split", "all", "--quiet",
            "--methods", "bgo,bm25,graddot", "--option", "tail_patch.ks=[1,2]"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for variant in ("full", "lora"):
        record = json.loads((out / variant / "eval.json").read_text())
        assert record["model"]["params"] == ("adapter" if variant == "lora" else "all")
        table = (out / variant / "results.csv").read_text()
        for method in ("bgo", "bm25", "graddot"):
            for metric in ("mrr", "recall@10", "precision@10", "tail_patch_vs_random@2"):
                assert re.search(rf"^{method},{metric},|,{method},{metric},", table, re.M), (
                    method, metric, variant)  # fmt: skip
        scores = np.load(out / variant / "scores.npz")
        n_sft = len((built / "sft.jsonl").read_text().splitlines())
        assert scores["scores/bgo"].shape[1] == n_sft  # ranked: the SFT conversations
    assert (
        "## lora fine-tune (params adapter; unit loss assistant" in (out / "results.md").read_text()
    )
    bad = CliRunner().invoke(app, [*args[:9], "--methods", "bm25", "--metrics", "lds",
                                   "--overwrite"])  # fmt: skip
    assert bad.exit_code != 0 and "not available on a chat benchmark" in bad.output
    other = CliRunner().invoke(app, [*args, "--model", str(built / "full"), "--overwrite"])
    assert other.exit_code != 0 and "drop --model" in other.output


@pytest.mark.slow
def test_quick_eval_runs_all_ten_methods_on_both_fine_tunes(built: Path, tmp_path: Path) -> None:
    """Every method (LoRA: adapter weights, TrackStar on the adapter's AdamW moments)."""
    from bgotrace.baselines import available_methods
    from bgotrace.bench.chat_eval import run_chat_bench

    results = run_chat_bench(built, tmp_path / "all", split="all", command="test",
                             options={"tail_patch": {"ks": (1,)}})  # fmt: skip
    for variant, result in results.items():
        table = result.table
        for method in available_methods():
            rows = table[(table["method"] == method) & (table["metric"] == "mrr")]
            assert len(rows) == 1 and np.isfinite(rows["mean"].iloc[0]), (variant, method)
        assert result.scores["trackstar"].shape == result.scores["bgo"].shape
    options = results["lora"].record["options"]
    assert options["params"] == "adapter"
    state = options["method_options"]["trackstar"]["optimizer_state"]
    assert state == str(built / "lora" / "optimizer_state.safetensors")
