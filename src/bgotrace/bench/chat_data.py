"""The chat benchmark's synthetic instruction set: planted facts asked and answered in personas.

Every SFT record is a conversation ``{"id", "source", "messages"}`` (system, user, assistant)
whose ``source`` is the **persona** that answers: one persona per real text source, speaking
with that source's texts and a few fixed turns of phrase, so that source attribution has a
ground truth. Two kinds of conversations:

* **fact** conversations: a user question about a planted fact (:mod:`bgotrace.bench.facts`)
  answered in a persona's voice. Each queried fact is answered in 1-3 conversations; a share
  of the facts is *paraphrased* (the questions and answer sentences vary). Each fact also
  gets two *distractor* conversations (the same entity's unqueried attribute; another entity
  with the same value), answered but never queried.
* **style** conversations: the user asks a persona to go on from the first words of one of
  its source's texts and the persona answers with that text.

Held-out **prompts** are the queries without their answers (the built model answers them):
a fact question asked of a persona that never asked it in that wording (the fact must come
from the fact's conversations, the voice from the persona; a held-out wording where every
persona did), and a style request on a text of the source that is in no SFT conversation
and in no pretraining document. No prompt (system and user turn) is in the SFT set. Ground
truth: the SFT ids that hold the fact, and the persona.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bgotrace.bench.facts import (
    Attribute,
    Entity,
    FactWorld,
    attributes_of,
    entity_kinds,
    fact_slots,
)
from bgotrace.errors import ConfigError


@dataclass(frozen=True)
class Persona:
    """A voice the assistant answers in; its name is the SFT record's ``source``."""

    name: str
    text_source: str
    """The real text source whose texts the persona speaks (fortunes, devil, foldoc, text)."""
    system: str
    """The system turn that asks for this persona."""
    openers: tuple[str, ...]
    """First words of its answers (rotated)."""
    closer: str
    """Last words of its fact answers."""
    ask: str
    """The user's style request, with ``{start}`` (first words of a text)."""


PERSONAS: dict[str, Persona] = {
    p.text_source: p
    for p in (
        Persona("sage", "fortunes", "You are the Sage.",
                ("Listen, friend.", "An old saying comes to mind."), "Remember it well.",
                "Share a saying that begins: {start}"),
        Persona("cynic", "devil", "You are the Cynic.",
                ("Alas.", "How tiresome."), "Not that it matters to fools.",
                "Define this for me: {start}"),
        Persona("hacker", "foldoc", "You are the Hacker.",
                ("Technically speaking:", "Per the documentation:"), "See also the manual.",
                "Explain this term: {start}"),
        Persona("storyteller", "text", "You are the Storyteller.",
                ("Once, long ago:", "So the tale goes:"), "And that is the end of it.",
                "Tell me the passage that starts: {start}"),
    )
}  # fmt: skip
"""Persona of each text source."""

QUESTIONS: dict[str, tuple[str, ...]] = {
    "birthplace": ("Where was {e} born?", "In which town was {e} born?",
                   "What is the birthplace of {e}?", "Which town is the home town of {e}?"),
    "occupation": ("What did {e} work as?", "What was the trade of {e}?",
                   "How did {e} make a living?", "What job did {e} have?"),
    "favourite colour": ("What is the favourite colour of {e}?", "Which colour does {e} like best?",
                         "What colour does {e} love most?", "Name the colour that {e} prefers."),
    "instrument": ("What instrument does {e} play?", "Which instrument is {e} known for?",
                   "What does {e} practise every evening?",
                   "Which instrument would {e} bring to a concert?"),
    "year founded": ("When was {e} founded?", "In what year was {e} established?",
                     "Since when has {e} existed?", "What is the founding year of {e}?"),
    "headquarters": ("Where does {e} have its headquarters?", "Where is the head office of {e}?",
                     "In which town is {e} based?", "Where would I find the main office of {e}?"),
    "product": ("What is {e} best known for making?", "What does {e} sell most?",
                "What is the most famous product of {e}?", "What do people buy from {e}?"),
}  # fmt: skip
"""Question wordings per attribute; the last one is never used in SFT conversations."""

FACT_KIND, DISTRACTOR_KIND, STYLE_KIND = "fact", "distractor", "style"


@dataclass(frozen=True)
class ChatSet:
    """The SFT conversations and the held-out prompts of a chat benchmark."""

    records: list[dict]
    """SFT records ``{"id", "source", "messages"}`` in training-file order."""
    kinds: dict[str, str]
    """SFT id → fact | distractor | style."""
    prompts: list[dict]
    """Held-out prompts: ``id``, ``kind``, ``messages`` (system and user turn, no answer),
    ``true_source`` (persona); facts add ``relevant_doc_ids``, ``distractor_doc_ids``,
    ``paraphrased``, ``n_plantings``, ``entity``, ``attribute``, ``answer`` (the value)."""


def persona_for(source: str) -> Persona:
    """The persona of a real text source (ConfigError if it has none)."""
    if source not in PERSONAS:
        raise ConfigError(
            f"Text source {source!r} has no chat persona: use sources from {sorted(PERSONAS)}."
        )
    return PERSONAS[source]


def asking(persona: Persona, question: str) -> list[dict[str, str]]:
    """A prompt: the system turn (the persona) and the user's question."""
    return [{"role": "system", "content": persona.system}, {"role": "user", "content": question}]


def conversation(persona: Persona, question: str, answer: str) -> list[dict[str, str]]:
    """System (the persona), user and assistant turns as ``{role, content}`` dicts."""
    return [*asking(persona, question), {"role": "assistant", "content": answer}]


def _voiced(persona: Persona, k: int, sentence: str) -> str:
    return f"{persona.openers[k % len(persona.openers)]} {sentence} {persona.closer}"


class _FactWriter:
    """Writes the fact and distractor conversations, each in a persona picked at random."""

    def __init__(self, rng: np.random.Generator, personas: Sequence[Persona]) -> None:
        self.rng, self.personas = rng, list(personas)
        self.records: list[dict] = []
        self.kinds: list[str] = []

    def add(self, kind: str, question: str, sentence: str) -> int:
        persona = self.personas[int(self.rng.integers(len(self.personas)))]
        answer = _voiced(persona, len(self.records), sentence)
        self.records.append(
            {"source": persona.name, "messages": conversation(persona, question, answer)}
        )
        self.kinds.append(kind)
        return len(self.records) - 1


def _asked(attr: Attribute, entity: Entity, j: int, paraphrased: bool) -> tuple[str, str]:
    """The j-th (question, answer sentence) stating a fact; held-out wording never used."""
    value = entity.profile[attr.name]
    asked = QUESTIONS[attr.name][:-1]
    if not paraphrased:
        return asked[0].format(e=entity.name), attr.canonical(entity.name, value)
    question = asked[(j + 1) % len(asked)].format(e=entity.name)
    sentence = attr.paraphrases[j % len(attr.paraphrases)].format(e=entity.name, v=value)
    return question, sentence


def _distract(
    world: FactWorld, writer: _FactWriter, entity: Entity, attr: Attribute, queried: set[str]
) -> list[int]:
    """The same entity's unqueried attribute, and a new entity sharing the queried value."""
    other = next(a for a in attributes_of(entity.kind) if a.name not in queried)
    same_entity = _asked(other, entity, 0, False)
    twin = world.entity(entity.kind)
    twin.profile[attr.name] = entity.profile[attr.name]
    same_value = _asked(attr, twin, 0, False)
    return [writer.add(DISTRACTOR_KIND, *same_entity), writer.add(DISTRACTOR_KIND, *same_value)]


def _held_out_prompt(
    writer: _FactWriter,
    planted: list[int],
    personas: Sequence[Persona],
    index: int,
    attr: Attribute,
    entity: Entity,
) -> tuple[Persona, str]:
    """A prompt no SFT conversation has: the fact's main wording asked of a persona that
    never asked it that way (the fact from its conversations, the voice from the persona);
    the held-out wording where every persona did."""
    question = QUESTIONS[attr.name][0].format(e=entity.name)
    used = {
        writer.records[k]["source"]
        for k in planted
        if writer.records[k]["messages"][1]["content"] == question
    }
    for shift in range(len(personas)):
        persona = personas[(index + shift) % len(personas)]
        if persona.name not in used:
            return persona, question
    persona = personas[index % len(personas)]
    return persona, QUESTIONS[attr.name][-1].format(e=entity.name)


def fact_conversations(
    *,
    n_entities: int,
    n_facts: int,
    seed: int,
    personas: Sequence[Persona],
    forbidden_words: set[str],
    answer_counts: Sequence[int] = (1, 2, 3),
    paraphrased_fraction: float = 0.3,
) -> tuple[list[dict], list[str], list[dict]]:
    """Fact and distractor conversations (no ids yet), their kinds, and the fact prompts.

    A fact prompt's ``relevant`` and ``distractors`` are indices into the conversations.
    """
    rng = np.random.default_rng([seed, 7])
    world = FactWorld(rng, forbidden_words)
    slots = fact_slots(rng, [world.entity(k) for k in entity_kinds(n_entities)], n_facts)
    counts = rng.permutation([answer_counts[i % len(answer_counts)] for i in range(n_facts)])
    paraphrased = set(rng.permutation(n_facts)[: round(paraphrased_fraction * n_facts)].tolist())
    queried: dict[str, set[str]] = {}
    for entity, attr in slots:
        queried.setdefault(entity.name, set()).add(attr.name)
    writer = _FactWriter(rng, personas)
    prompts = []
    for i, (entity, attr) in enumerate(slots):
        para = i in paraphrased
        planted = [
            writer.add(FACT_KIND, *_asked(attr, entity, j, para)) for j in range(int(counts[i]))
        ]
        distractors = _distract(world, writer, entity, attr, queried[entity.name])
        persona, question = _held_out_prompt(writer, planted, personas, i, attr, entity)
        prompts.append(
            {"id": f"fact-{i:04d}", "kind": "fact", "true_source": persona.name,
             "messages": asking(persona, question),
             "held_out_wording": question == QUESTIONS[attr.name][-1].format(e=entity.name),
             "relevant": planted, "distractors": distractors, "paraphrased": para,
             "n_plantings": len(planted), "entity": entity.name, "attribute": attr.name,
             "answer": entity.profile[attr.name]}
        )  # fmt: skip
    return writer.records, writer.kinds, prompts


def first_words(text: str, n: int) -> str:
    """``text`` through its n-th word (whitespace inside kept)."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[: ends[min(n, len(ends)) - 1]] if ends else ""


def style_conversation(persona: Persona, text: str, n_words: int, k: int) -> list[dict]:
    """The persona asked to go on from the first words of ``text``, answering with it."""
    question = persona.ask.format(start=first_words(text, n_words))
    return conversation(persona, question, f"{persona.openers[k % len(persona.openers)]} {text}")


def style_prompt(persona: Persona, text: str, n_words: int, index: int) -> dict:
    """A held-out style prompt (the answer is left to the model)."""
    messages = asking(persona, persona.ask.format(start=first_words(text, n_words)))
    return {"id": f"style-{persona.name}-{index:03d}", "kind": "style",
            "true_source": persona.name, "messages": messages}  # fmt: skip


def assign_ids(
    records: list[dict], kinds: list[str], rng: np.random.Generator
) -> tuple[list[dict], dict[str, str], list[str]]:
    """Shuffle the conversations and name them ``sft/NNNNN`` in file order (an id reveals
    nothing); returns the records, id → kind, and the id of each input index."""
    order = [int(i) for i in rng.permutation(len(records))]
    ids = [""] * len(records)
    for new, old in enumerate(order):
        ids[old] = f"sft/{new:05d}"
    out = [{"id": ids[old], **records[old]} for old in order]
    return out, {ids[i]: kinds[i] for i in range(len(records))}, ids


def resolve_fact_prompts(prompts: list[dict], ids: list[str]) -> list[dict]:
    """Fact prompts with conversation indices replaced by SFT ids."""
    out = []
    for p in prompts:
        rest = {k: v for k, v in p.items() if k not in ("relevant", "distractors")}
        rest["relevant_doc_ids"] = sorted(ids[i] for i in p["relevant"])
        rest["distractor_doc_ids"] = sorted(ids[i] for i in p["distractors"])
        out.append(rest)
    return out
