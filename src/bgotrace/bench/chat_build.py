"""``bench build --bench-preset chat``: a known-data benchmark for chat attribution.

A small Llama-style model with a chat template is pretrained on real public-domain texts
(the ``cpu`` benchmark's), then fine-tuned twice on a synthetic instruction set
(:mod:`bgotrace.bench.chat_data`) with the loss on assistant tokens only
(:mod:`bgotrace.bench.chat_sft`): every weight (``full``) and a LoRA adapter (``lora``).
Each fine-tune answers the held-out prompts greedily; its answers are its queries.
Directory layout (written to ``<out>.part`` and renamed when complete)::

    manifest.json         format, config, counts, sha256 of the data files, wall times
    pretrain.jsonl        pretraining documents: id, text, source
    sft.jsonl             the SFT corpus: {"id", "source" (the persona), "messages"}
    sft_kinds.json        SFT id -> fact | distractor | style
    prompts.jsonl         held-out prompts with their ground truth (no answers)
    queries-full.jsonl    the full fine-tune's greedy answers as conversation queries
    queries-lora.jsonl    the same for the LoRA fine-tune
    base/  full/  lora/   pretrained model, fully fine-tuned model, LoRA adapter over base/

A query record: ``id``, ``kind`` (fact | style), ``messages`` (system, user, the model's
answer), ``loss_on`` ("completion": the answer), ``true_source`` (persona), ``split``; fact
queries add ``relevant_doc_ids`` (the SFT conversations stating the fact),
``distractor_doc_ids``, ``paraphrased``, ``n_plantings``, ``entity``, ``attribute`` and
``answer`` (the true value; ``correct`` says whether the model's answer holds it).

CPU (the quick variant takes seconds; ``chat`` about 10 CPU-minutes)::

    bgotrace bench build --bench-preset chat --quick --out bench/chat-quick
    bgotrace bench build --bench-preset chat --out bench/chat
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from bgotrace.bench import chat_data as cd
from bgotrace.bench.build import (
    BenchConfig,
    load_source,
    sample_source,
    stage_rng,
    truncate_text,
    vocabulary_of,
)
from bgotrace.bench.chat_sft import (
    SFT_RECORD,
    SFTConfig,
    add_chat_template,
    fine_tune,
    render_records,
    stop_at_end_of_turn,
)
from bgotrace.chat import Message
from bgotrace.corpus import documents_from_records
from bgotrace.errors import ConfigError, InputError, RunDirectoryError
from bgotrace.generate import generate_reply
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.train import TrainConfig, train_model
from bgotrace.train.presets import get_preset
from bgotrace.train.tokenizer import train_tokenizer

log = logging.getLogger(__name__)

CHAT_FORMAT = "bgotrace-chat-benchmark"
CHAT_FORMAT_VERSION = 1
VARIANTS = ("full", "lora")
"""The two fine-tunes: every weight, and a LoRA adapter over the frozen base."""
DATA_FILES = ("pretrain.jsonl", "sft.jsonl", "sft_kinds.json", "prompts.jsonl")


@dataclass(frozen=True)
class ChatBenchConfig:
    """Everything a chat benchmark is built from (stored in its manifest)."""

    sources: tuple[str, ...] = ("fortunes", "devil", "foldoc")
    """Real text sources; each gives a persona (fortunes: sage, devil: cynic, foldoc:
    hacker, text: storyteller)."""
    source_paths: dict[str, str] = field(default_factory=dict)
    """Path per source, overriding the Debian location."""
    pretrain_documents_per_source: int = 150
    """Pretraining documents per source (the ``cpu`` benchmark's sample)."""
    max_chars_per_document: int = 600
    """Pretraining documents are cut to this length."""
    n_entities: int = 16
    """Invented entities the facts are about."""
    n_facts: int = 24
    """Queried facts; each is answered in answer_counts SFT conversations."""
    answer_counts: tuple[int, ...] = (1, 2, 3)
    """Conversations answering a fact, cycled over the facts."""
    fact_repeats: int = 4
    """Times each fact and distractor conversation is seen per SFT epoch (a small model
    memorises little it sees once); it stays one ranked conversation."""
    paraphrased_fraction: float = 0.3
    """Share of facts whose conversations vary question and answer wording."""
    style_per_persona: int = 60
    """Style conversations per persona (texts not in pretraining)."""
    held_out_per_persona: int = 8
    """Held-out style prompts per persona (texts in neither pretraining nor SFT)."""
    max_answer_chars: int = 180
    """Texts of style answers (white space runs made one space) are cut to this length, so
    that a conversation fits the context."""
    style_prompt_words: int = 4
    """Words of a text the user quotes in a style request."""
    validation_fraction: float = 0.5
    """Share of prompts (per kind and persona) in the validation split; the rest is test."""
    model_preset: str = "demo"
    """Model shape (bgotrace.train.PRESETS), trained as a Llama."""
    pretrain_epochs: int = 10
    """Pretraining epochs."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Fine-tuning (both the full and the LoRA run)."""
    max_new_tokens: int = 48
    """Longest greedy answer to a held-out prompt."""
    seed: int = 0
    """Seeds every choice; the same config gives the same benchmark."""

    def __post_init__(self) -> None:
        for name in self.sources:
            cd.persona_for(name)
        for name in ("pretrain_documents_per_source", "n_entities", "style_per_persona",
                     "held_out_per_persona", "pretrain_epochs", "max_new_tokens",
                     "style_prompt_words", "fact_repeats"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ConfigError(f"Invalid chat benchmark config: {name} must be at least 1.")
        if not 1 <= self.n_facts or not min(self.answer_counts, default=0) >= 1:
            raise ConfigError("Invalid chat benchmark config: n_facts and answer_counts >= 1.")
        if self.max_answer_chars < 40:
            raise ConfigError("Invalid chat benchmark config: max_answer_chars must be >= 40.")
        get_preset(self.model_preset)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChatBenchConfig:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        if set(data) - known:
            raise ConfigError(f"Unknown chat benchmark fields {sorted(set(data) - known)}.")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        if isinstance(data.get("sft"), dict):
            values["sft"] = SFTConfig(**data["sft"])
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ChatBenchConfig:
        if name not in CHAT_PRESETS:
            raise ConfigError(f"Unknown chat preset {name!r}: use one of {sorted(CHAT_PRESETS)}.")
        return cls(**{**CHAT_PRESETS[name], **overrides})

    def text_config(self) -> BenchConfig:
        """The text benchmark config whose sample is the pretraining corpus."""
        return BenchConfig(
            sources=self.sources, source_paths=self.source_paths, n_facts=0,
            max_documents_per_source=self.pretrain_documents_per_source,
            max_chars_per_document=self.max_chars_per_document, seed=self.seed,
        )  # fmt: skip


CHAT_PRESETS: dict[str, dict[str, Any]] = {
    "chat": {},
    # The quick variant (tests, CI): seconds on one CPU thread.
    "chat-test": {
        "pretrain_documents_per_source": 8, "max_chars_per_document": 300, "n_entities": 4,
        "n_facts": 4, "style_per_persona": 3, "held_out_per_persona": 2, "max_answer_chars": 90,
        "model_preset": "test", "pretrain_epochs": 4, "max_new_tokens": 16, "fact_repeats": 2,
        "sft": SFTConfig(epochs=20, lr=5e-3, lora_lr=1e-2, batch_size=4, warmup_steps=2),
    },
}  # fmt: skip


# --------------------------------------------------------------------------- texts


def _texts(config: ChatBenchConfig) -> tuple[list[dict], dict[str, list[str]], set[str]]:
    """Pretraining documents, the remaining texts per source (shuffled), all words seen."""
    text_config = config.text_config()
    pretrain, rest, vocabulary = [], {}, set()
    for name in config.sources:
        docs = load_source(text_config, name)
        vocabulary |= vocabulary_of(docs)
        sample = sample_source(docs, text_config, name)
        taken = {d["id"] for d in sample}
        others = [d for d in docs if d["id"] not in taken]
        order = stage_rng(config.seed, f"chat-texts/{name}").permutation(len(others))
        flat = (" ".join(others[int(i)]["text"].split()) for i in order)  # chat answers flow
        rest[name] = [truncate_text(text, config.max_answer_chars) for text in flat]
        pretrain += sample
    return pretrain, rest, vocabulary


def _style(config: ChatBenchConfig, rest: dict[str, list[str]]) -> tuple[list[dict], list[dict]]:
    """Style conversations and held-out style prompts of every persona."""
    records, prompts = [], []
    need = config.style_per_persona + config.held_out_per_persona
    for name in config.sources:
        persona, texts = cd.persona_for(name), rest[name]
        usable = [t for t in texts if len(t.split()) > config.style_prompt_words]
        if len(usable) < need:
            raise InputError(
                f"Text source {name!r} has {len(usable)} texts beyond the pretraining sample, "
                f"but the chat benchmark needs {need}: lower style_per_persona or "
                "pretrain_documents_per_source."
            )
        for k, text in enumerate(usable[: config.style_per_persona]):
            messages = cd.style_conversation(persona, text, config.style_prompt_words, k)
            records.append({"source": persona.name, "messages": messages})
        for k, text in enumerate(usable[config.style_per_persona : need]):
            prompts.append(cd.style_prompt(persona, text, config.style_prompt_words, k))
    return records, prompts


def _assign_splits(prompts: list[dict], config: ChatBenchConfig) -> None:
    """validation_fraction of each (kind, persona) group in validation, the rest test."""
    groups: dict[str, list[dict]] = {}
    for p in prompts:
        groups.setdefault(f"{p['kind']}/{p['true_source']}", []).append(p)
    for key, members in sorted(groups.items()):
        order = stage_rng(config.seed, f"chat-split/{key}").permutation(len(members))
        n_val = round(config.validation_fraction * len(members))
        for rank, i in enumerate(order):
            members[int(i)]["split"] = "validation" if rank < n_val else "test"


def compose(config: ChatBenchConfig) -> tuple[list[dict], cd.ChatSet]:
    """The pretraining documents and the SFT set with its held-out prompts (in memory)."""
    pretrain, rest, vocabulary = _texts(config)
    personas = [cd.persona_for(n) for n in config.sources]
    fact_records, kinds, fact_prompts = cd.fact_conversations(
        n_entities=config.n_entities, n_facts=config.n_facts, seed=config.seed,
        personas=personas, forbidden_words=vocabulary, answer_counts=config.answer_counts,
        paraphrased_fraction=config.paraphrased_fraction,
    )  # fmt: skip
    style_records, style_prompts = _style(config, rest)
    records = fact_records + style_records
    kinds = kinds + [cd.STYLE_KIND] * len(style_records)
    shuffled, kind_of, ids = cd.assign_ids(records, kinds, stage_rng(config.seed, "chat-order"))
    prompts = cd.resolve_fact_prompts(fact_prompts, ids) + style_prompts
    _assign_splits(prompts, config)
    return pretrain, cd.ChatSet(shuffled, kind_of, prompts)


# --------------------------------------------------------------------------- models


def chat_tokenizer(
    config: ChatBenchConfig, documents: list[dict], records: list[dict]
) -> PreTrainedTokenizerBase:
    """BPE trained on the pretraining texts and the SFT turns (short sequences for a small
    model), with the chat tokens and template."""
    preset = get_preset(config.model_preset)
    turns = [m["content"] for r in records for m in r["messages"]]
    tokenizer = train_tokenizer([*(d["text"] for d in documents), *turns], preset.vocab_size)
    tokenizer.model_max_length = preset.context_length
    return add_chat_template(tokenizer)


def check_context(config: ChatBenchConfig, tokenizer: Any, records: list[dict]) -> None:
    """Every SFT conversation must fit the model's context in one unit."""
    context = get_preset(config.model_preset).context_length
    longest = max(len(c.input_ids) for c in render_records(tokenizer, records))
    if longest > context:
        raise ConfigError(
            f"An SFT conversation has {longest} tokens, more than the {context}-token context: "
            "lower max_answer_chars or pick a model preset with a longer context."
        )


def pretrain(
    config: ChatBenchConfig, documents: list[dict], tokenizer: Any, out: Path, progress: bool
) -> Path:
    """Pretrain the Llama-style base on the texts; greedy replies stop at the end of turn."""
    train = TrainConfig(preset=config.model_preset, arch="llama", epochs=config.pretrain_epochs,
                        seed=config.seed)  # fmt: skip
    train_model(documents_from_records(documents), train, out, tokenizer=tokenizer,
                progress=progress, overwrite=True)  # fmt: skip
    model, tokenizer = load_model_and_tokenizer(out)
    stop_at_end_of_turn(model, tokenizer)
    model.generation_config.save_pretrained(out)
    return out


def answer_prompts(model_dir: Path, prompts: list[dict], config: ChatBenchConfig,
                   adapter: Path | None = None) -> tuple[list[dict], int]:  # fmt: skip
    """The model's greedy answers as conversation queries; prompts answered with blank text
    are dropped (counted in the second value)."""
    model, tokenizer = load_model_and_tokenizer(model_dir, adapter=adapter, merge_adapter=False)
    queries, dropped = [], 0
    for p in prompts:
        turns = [Message(m["role"], m["content"]) for m in p["messages"]]
        answer = generate_reply(model, tokenizer, turns, max_new_tokens=config.max_new_tokens)
        if not answer.strip():
            dropped += 1
            continue
        query = {**p, "messages": [*p["messages"], {"role": "assistant", "content": answer}],
                 "loss_on": "completion"}  # fmt: skip
        if p["kind"] == "fact":
            query["correct"] = p["answer"].lower() in answer.lower()
        queries.append(query)
    return queries, dropped


# --------------------------------------------------------------------------- build


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_data(tmp: Path, pretrain_docs: list[dict], chat_set: cd.ChatSet) -> None:
    (tmp / "pretrain.jsonl").write_text(_jsonl(pretrain_docs), encoding="utf-8")
    (tmp / "sft.jsonl").write_text(_jsonl(chat_set.records), encoding="utf-8")
    kinds = json.dumps(chat_set.kinds, indent=1, sort_keys=True) + "\n"
    (tmp / "sft_kinds.json").write_text(kinds, encoding="utf-8")
    (tmp / "prompts.jsonl").write_text(_jsonl(chat_set.prompts), encoding="utf-8")


def _counts(chat_set: cd.ChatSet, n_pretrain: int) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for kind in chat_set.kinds.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    personas: dict[str, int] = {}
    for r in chat_set.records:
        personas[r["source"]] = personas.get(r["source"], 0) + 1
    return {"pretrain_documents": n_pretrain, "sft_conversations": len(chat_set.records),
            "sft_by_kind": kinds, "sft_by_persona": personas,
            "prompts": len(chat_set.prompts)}  # fmt: skip


def build_chat_bench(
    config: ChatBenchConfig, out_dir: str | Path, *, overwrite: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Build the whole chat benchmark into ``out_dir``; returns its manifest."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise RunDirectoryError(
            f"Benchmark directory {out} exists: use --overwrite or another --out."
        )
    started, wall = time.perf_counter(), {}
    pretrain_docs, chat_set = compose(config)
    tmp = out.with_name(f".{out.name}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_data(tmp, pretrain_docs, chat_set)
    t0 = time.perf_counter()
    tokenizer = chat_tokenizer(config, pretrain_docs, chat_set.records)
    check_context(config, tokenizer, chat_set.records)
    base = pretrain(config, pretrain_docs, tokenizer, tmp / "base", progress)
    wall["pretrain"] = round(time.perf_counter() - t0, 1)
    counts = _counts(chat_set, len(pretrain_docs))
    for variant in VARIANTS:
        t0 = time.perf_counter()
        lora = variant == "lora"
        repeats = [config.fact_repeats if chat_set.kinds[r["id"]] != cd.STYLE_KIND else 1
                   for r in chat_set.records]  # fmt: skip
        fine_tune(base, chat_set.records, config.sft, tmp / variant, lora=lora, repeats=repeats)
        model_dir, adapter = (base, tmp / variant) if lora else (tmp / variant, None)
        queries, dropped = answer_prompts(model_dir, chat_set.prompts, config, adapter)
        (tmp / f"queries-{variant}.jsonl").write_text(_jsonl(queries), encoding="utf-8")
        counts[f"queries_{variant}"] = len(queries)
        counts[f"blank_answers_dropped_{variant}"] = dropped
        counts[f"correct_fact_answers_{variant}"] = sum(bool(q.get("correct")) for q in queries)
        wall[f"fine_tune_{variant}"] = round(time.perf_counter() - t0, 1)
    wall["total"] = round(time.perf_counter() - started, 1)
    files = [*DATA_FILES, *(f"queries-{v}.jsonl" for v in VARIANTS)]
    manifest = {"format": CHAT_FORMAT, "format_version": CHAT_FORMAT_VERSION,
                "config": config.to_dict(), "counts": counts, "wall_time_s": wall,
                "sha256": {name: _sha256(tmp / name) for name in files}}  # fmt: skip
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _record_final_paths(out)
    log.info("chat benchmark %s built in %.0fs", out, wall["total"])
    return manifest


def _record_final_paths(out: Path) -> None:
    """Name the base's final path in the fine-tunes (they were written under ``.part``)."""
    base = str((out / "base").resolve())
    for variant in VARIANTS:
        for name, key in ((SFT_RECORD, "base"), ("adapter_config.json", "base_model_name_or_path")):
            path = out / variant / name
            if path.is_file():
                settings = json.loads(path.read_text(encoding="utf-8"))
                path.write_text(json.dumps({**settings, key: base}, indent=2) + "\n", "utf-8")


def is_chat_bench(path: str | Path) -> bool:
    """Whether ``path`` holds a chat benchmark (its manifest says so)."""
    manifest = Path(path) / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == CHAT_FORMAT
    except ValueError:
        return False


def load_chat_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a chat benchmark, its files checked against their hashes."""
    root = Path(path)
    if not is_chat_bench(root):
        raise InputError(f"{root} is not a chat benchmark: build it with "
                         "`bgotrace bench build --bench-preset chat`.")  # fmt: skip
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    if manifest.get("format_version") != CHAT_FORMAT_VERSION:
        raise InputError(f"Chat benchmark {root} has another format version: rebuild it.")
    for name, digest in manifest["sha256"].items():
        if not (root / name).is_file() or _sha256(root / name) != digest:
            raise InputError(f"Chat benchmark {root}: {name} is missing or altered: rebuild it.")
    return manifest
