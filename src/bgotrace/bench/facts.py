"""Planted synthetic facts: ground truth for fact tracing that no real text can leak.

Each fact is "entity E has value v for attribute a" about an invented entity, stated in 1, 2
or 4 documents (the *plantings*); the documents that state it are exactly the ones a perfect
attribution method should retrieve for the query ``prompt -> completion``. To make the task
more than word matching:

* names are invented from syllables and rejected if they occur as a word in the real texts,
  so the facts can only have been learned from the planted documents;
* some facts are *paraphrased*: their plantings use other sentence templates than the query,
  so only the entity and the value are shared words;
* every fact gets two *distractors*: a document about the same entity stating another
  (never queried) attribute, and one about another entity with the same value.

Everything is drawn from one seeded ``numpy`` generator, so a seed fixes the output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bgotrace.errors import ConfigError

_ONSETS: tuple[str, ...] = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v")
_ONSETS += ("z", "br", "dr", "gr", "kr", "pl", "st", "th", "tr", "qu", "sk", "j", "h")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ae", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "nd", "rk", "sh")

_TOWN = "town"  # marker: the value is an invented town name
_YEAR = "year"  # marker: the value is a year


@dataclass(frozen=True)
class Attribute:
    """One kind of fact and the sentences that state it."""

    name: str
    kind: str
    """Entity kind that has it: "person" or "organisation"."""
    query: str
    """Query prompt with ``{e}``; the completion is " " + value."""
    paraphrases: tuple[str, ...]
    """Other full sentences with ``{e}`` and ``{v}``, used by paraphrased plantings."""
    values: tuple[str, ...]
    """Value pool, or ``(_TOWN,)`` / ``(_YEAR,)`` for invented towns / years."""

    def canonical(self, entity: str, value: str) -> str:
        """The sentence whose prefix is exactly the query prompt."""
        return f"{self.query.format(e=entity)} {value}."


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "birthplace", "person", "{e} was born in",
        ("The birthplace of {e} is {v}.", "{e} first saw the light of day in {v}.",
         "Parish records from {v} note the birth of {e}."),
        (_TOWN,),
    ),
    Attribute(
        "occupation", "person", "{e} worked as a",
        ("By trade, {e} was a {v}.", "{e} made a living as a {v}.",
         "Everyone who knew {e} remembers a skilled {v}."),
        ("baker", "carpenter", "cartographer", "glassblower", "potter", "shipwright", "tailor",
         "weaver", "beekeeper", "bookbinder", "clockmaker", "fisherman", "gardener",
         "locksmith", "miller", "schoolteacher", "surveyor", "watchmaker"),
    ),
    Attribute(
        "favourite colour", "person", "The favourite colour of {e} is",
        ("{e} loves the colour {v} above all others.", "Of all colours, {e} likes {v} best.",
         "Ask {e} to name a favourite colour and the answer is {v}."),
        ("crimson", "teal", "amber", "violet", "ochre", "indigo", "scarlet", "olive",
         "turquoise", "magenta", "maroon", "saffron", "cobalt", "lavender"),
    ),
    Attribute(
        "instrument", "person", "{e} plays the",
        ("The instrument that {e} plays is the {v}.", "{e} is known for playing the {v}.",
         "Every evening {e} practises the {v}."),
        ("cello", "oboe", "harp", "flute", "banjo", "accordion", "bassoon", "mandolin",
         "trombone", "harpsichord", "clarinet", "viola"),
    ),
    Attribute(
        "year founded", "organisation", "{e} was founded in",
        ("The founding year of {e} is {v}.", "In {v}, {e} was established.",
         "{e} has existed since {v}, the year of its founding."),
        (_YEAR,),
    ),
    Attribute(
        "headquarters", "organisation", "{e} has its headquarters in",
        ("The head office of {e} is in {v}.", "{e} is based in the town of {v}.",
         "Visitors to {v} can see the main office of {e}."),
        (_TOWN,),
    ),
    Attribute(
        "product", "organisation", "{e} is best known for making",
        ("The most famous product of {e} is {v}.", "{e} became famous for its {v}.",
         "People buy {v} from {e} more than anything else."),
        ("copper kettles", "paper lanterns", "wooden clocks", "glass marbles",
         "woollen blankets", "rope ladders", "brass compasses", "silk umbrellas",
         "clay pipes", "leather saddles"),
    ),
)  # fmt: skip

_ORG_SUFFIXES = ("Guild", "Company", "Society", "Works", "Brothers", "Trading House")

_FILLERS = (
    "Little else is recorded about {e}.",
    "Several old letters mention {e} in passing.",
    "{e} appears in a register of the district.",
    "Not everyone agrees on how to spell the name {e}.",
    "A short note about {e} was found among other papers.",
    "Stories about {e} are still told in the area.",
)


@dataclass
class Entity:
    """An invented person or organisation with one value per attribute of its kind."""

    name: str
    kind: str
    profile: dict[str, str]


def entity_kinds(n_entities: int) -> list[str]:
    """Two persons for every organisation: persons have more attributes to ask about."""
    return ["person" if i % 3 else "organisation" for i in range(n_entities)]


def attributes_of(kind: str) -> list[Attribute]:
    return [a for a in ATTRIBUTES if a.kind == kind]


class NameMaker:
    """Invents distinct capitalised pseudo-words of 2-3 syllables that avoid given words.

    ``forbidden`` holds lower-cased words of the real texts: an invented name must not
    occur there, or the model could have learned about it from real documents.
    """

    def __init__(self, rng: np.random.Generator, forbidden: set[str]) -> None:
        self.rng = rng
        self.seen = {w.lower() for w in forbidden}

    def __call__(self) -> str:
        for _ in range(10_000):
            n_syllables = int(self.rng.integers(2, 4))
            word = "".join(
                _pick(self.rng, _ONSETS) + _pick(self.rng, _VOWELS) + _pick(self.rng, _CODAS)
                for _ in range(n_syllables)
            )
            if len(word) <= 10 and word not in self.seen:
                self.seen.add(word)
                return word.capitalize()
        raise ConfigError("Could not invent an unused name: lower the number of entities.")


def invent_words(rng: np.random.Generator, n: int, forbidden: set[str]) -> list[str]:
    """``n`` distinct invented words, none in ``forbidden`` (case-insensitive)."""
    make = NameMaker(rng, forbidden)
    return [make() for _ in range(n)]


def _pick(rng: np.random.Generator, pool: Sequence[str]) -> str:
    return pool[int(rng.integers(len(pool)))]


class FactWorld:
    """The entities, their profiles and the documents stating them, built step by step."""

    def __init__(self, rng: np.random.Generator, forbidden: set[str]) -> None:
        self.rng = rng
        self._name = NameMaker(rng, forbidden)
        self.documents: list[str] = []

    def value(self, attr: Attribute) -> str:
        if attr.values == (_TOWN,):
            return self._name()
        if attr.values == (_YEAR,):
            return str(int(self.rng.integers(1650, 1990)))
        return _pick(self.rng, attr.values)

    def entity(self, kind: str) -> Entity:
        if kind == "organisation":
            name = f"{self._name()} {_pick(self.rng, _ORG_SUFFIXES)}"
        else:
            name = f"{self._name()} {self._name()}"
        profile = {a.name: self.value(a) for a in attributes_of(kind)}
        return Entity(name, kind, profile)

    def add_document(self, entity: str, sentence: str) -> int:
        """Add the sentence among 1-2 neutral filler sentences; return the document index.

        The fillers make repeated plantings of one sentence distinct documents and put the
        fact at a varying position, without stating anything a query asks about.
        """
        n_fill = int(self.rng.integers(1, 3))
        fillers = [_FILLERS[j].format(e=entity) for j in self.rng.permutation(len(_FILLERS))]
        n_before = int(self.rng.integers(0, n_fill + 1))
        parts = [*fillers[:n_before], sentence, *fillers[n_before:n_fill]]
        self.documents.append(" ".join(parts))
        return len(self.documents) - 1


def fact_slots(
    rng: np.random.Generator, entities: list[Entity], n_facts: int
) -> list[tuple[Entity, Attribute]]:
    """Pick ``n_facts`` (entity, attribute) pairs, round-robin over the entities, leaving
    each entity one attribute that is never queried (for its same-entity distractor)."""
    orders = {}
    for e in entities:
        attrs = attributes_of(e.kind)
        orders[id(e)] = [attrs[j] for j in rng.permutation(len(attrs))]
    capacity = sum(len(o) - 1 for o in orders.values())
    if n_facts > capacity:
        raise ConfigError(
            f"n_facts={n_facts} needs more entities: {len(entities)} entities hold at most "
            f"{capacity} queried facts; raise n_entities."
        )
    slots: list[tuple[Entity, Attribute]] = []
    for i in range(n_facts):
        entity = entities[i % len(entities)]
        slots.append((entity, orders[id(entity)][i // len(entities)]))
    return slots


def _plant(
    world: FactWorld, entity: Entity, attr: Attribute, n: int, paraphrased: bool
) -> list[int]:
    """Write the ``n`` plantings: the query's own sentence, or rotating paraphrases."""
    value = entity.profile[attr.name]
    if not paraphrased:
        sentences = [attr.canonical(entity.name, value)] * n
    else:
        start = int(world.rng.integers(len(attr.paraphrases)))
        templates = [attr.paraphrases[(start + j) % len(attr.paraphrases)] for j in range(n)]
        sentences = [t.format(e=entity.name, v=value) for t in templates]
    return [world.add_document(entity.name, s) for s in sentences]


def _distract(world: FactWorld, entity: Entity, attr: Attribute, queried: set[str]) -> list[int]:
    """One document on the same entity (an unqueried attribute) and one on a new entity
    that shares the queried value."""
    other = next(a for a in attributes_of(entity.kind) if a.name not in queried)
    same_entity = other.canonical(entity.name, entity.profile[other.name])
    twin = world.entity(entity.kind)
    twin.profile[attr.name] = entity.profile[attr.name]
    same_value = attr.canonical(twin.name, twin.profile[attr.name])
    return [world.add_document(entity.name, same_entity), world.add_document(twin.name, same_value)]


@dataclass(frozen=True)
class _Fact:
    """A queried fact and the indices of the documents written for it."""

    index: int
    entity: Entity
    attr: Attribute
    planted: list[int]
    distractors: list[int]
    paraphrased: bool


def generate_facts(
    *,
    n_entities: int,
    n_facts: int,
    seed: int,
    forbidden_words: set[str] | None = None,
    planting_counts: Sequence[int] = (1, 2, 4),
    paraphrased_fraction: float = 0.3,
    distractors: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Generate planted-fact documents (source ``"facts"``) and their fact queries.

    Planting counts cycle through ``planting_counts`` (then shuffled) so each count gets an
    equal share; ``round(paraphrased_fraction * n_facts)`` random facts are paraphrased.
    Document ids are ``facts/NNNNN`` in a shuffled order, so an id reveals nothing.
    """
    rng = np.random.default_rng(seed)
    world = FactWorld(rng, forbidden_words or set())
    slots = fact_slots(rng, [world.entity(k) for k in entity_kinds(n_entities)], n_facts)
    counts = rng.permutation([planting_counts[i % len(planting_counts)] for i in range(n_facts)])
    paraphrased = set(rng.permutation(n_facts)[: round(paraphrased_fraction * n_facts)].tolist())
    queried: dict[str, set[str]] = {}
    for entity, attr in slots:
        queried.setdefault(entity.name, set()).add(attr.name)
    facts = []
    for i, (entity, attr) in enumerate(slots):
        planted = _plant(world, entity, attr, int(counts[i]), i in paraphrased)
        distract = _distract(world, entity, attr, queried[entity.name]) if distractors else []
        facts.append(_Fact(i, entity, attr, planted, distract, i in paraphrased))
    order = [int(j) for j in rng.permutation(len(world.documents))]
    doc_ids = {old: f"facts/{new:05d}" for new, old in enumerate(order)}
    documents = [
        {"id": doc_ids[old], "text": world.documents[old], "source": "facts"} for old in order
    ]
    return documents, [_fact_query(f, doc_ids) for f in facts]


def _fact_query(fact: _Fact, doc_ids: dict[int, str]) -> dict:
    return {
        "id": f"fact-{fact.index:04d}",
        "prompt": fact.attr.query.format(e=fact.entity.name),
        "completion": f" {fact.entity.profile[fact.attr.name]}",
        "kind": "fact",
        "loss_on": "completion",
        "true_source": "facts",
        "relevant_doc_ids": sorted(doc_ids[j] for j in fact.planted),
        "distractor_doc_ids": sorted(doc_ids[j] for j in fact.distractors),
        "paraphrased": fact.paraphrased,
        "n_plantings": len(fact.planted),
        "entity": fact.entity.name,
        "attribute": fact.attr.name,
    }


def fact_capacity(n_entities: int) -> int:
    """Most facts ``n_entities`` entities can hold (each keeps one attribute unqueried)."""
    return sum(len(attributes_of(k)) - 1 for k in entity_kinds(n_entities))
