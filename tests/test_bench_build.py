"""Benchmark building from small fixture texts in the Debian formats (no Debian packages needed)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from bgotrace.bench.build import BenchConfig, build_benchmark, load_benchmark
from bgotrace.bench.facts import ATTRIBUTES, generate_facts, invent_words
from bgotrace.bench.textsources import (
    read_devil,
    read_foldoc,
    read_fortunes,
    read_text_folder,
    split_fortunes,
)
from bgotrace.errors import ConfigError, InputError

# A dictfmt header as in /usr/share/dictd/*.dict.dz: meta entries, then the info page.
DICTD_HEADER = (
    "00-database-dictfmt-1.13.0\nhttp://example.org/dict.txt\n00-database-short\n"
    "     A Test Dictionary\nThe original data is available from:\n     http://example.org\n\n"
)

DEVIL_TEXT = DICTD_HEADER + (
    "                              PREFACE\n\nA preface that is part of the info page.\n\n"
    "ABASEMENT, n.  A decent and customary mental attitude in the presence\n"
    "of wealth of power.\n\n"
    "ABRACADABRA.\n\n    By _Abracadabra_ we signify\n        An infinite number of things.\n\n"
    "BABE or BABY, n.  A misshapen creature of no particular age, sex, or\ncondition.\n\n"
    "W (double U) has, of all the letters in our alphabet, the only\ncumbrous name.\n\n"
    "ZEUS, n.  The chief of Grecian gods.\n\n"
    " abcdefghijklmnopqrstuvwxyz\n"
)

FOLDOC_TEXT = DICTD_HEADER + (
    "Test Dictionary%%%this dictionary\n\n   <introduction> Part of the info page.\n\n"
    "(TM)\n\n   <legal> An {ASCII} rendition of the trademark\n   superscript symbol.\n\n"
    "   (2014-11-27)\n\n"
    "*LISP\nStarLISP\n\n   <language> A {data-parallel} extension of {Common LISP}.\n\n"
    "   {Manual\n(http://example.org/starlisp.html)}.\n\n   (2014-12-17)\n"
    "flood\n\n   <chat> To send a huge amount of data to another user.\n\n   (1994-10-20)\n\n"
    "zero assignment\n\n   <programming> A property of a {programming language}.\n\n"
    " \n!\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_abcdefghijklmnopqrstuvwxyz{|}~\n"
)


def _write_gzip(path: Path, text: str) -> Path:
    path.write_bytes(gzip.compress(text.encode("utf-8")))
    return path


@pytest.fixture
def sources(tmp_path: Path) -> dict[str, str]:
    """Fixture texts in the three Debian formats plus a plain-text folder, 14-20 docs each."""
    fortunes = tmp_path / "fortunes"
    fortunes.mkdir()
    quips = [f"Quip {i}: a small saying about kettles and luck number {i}." for i in range(20)]
    (fortunes / "wisdom").write_text("\n%\n".join(quips[:12]) + "\n%\n")
    (fortunes / "work").write_text("\n%\n".join([*quips[12:], quips[0]]) + "\n")  # 1 repeat
    (fortunes / "wisdom.dat").write_bytes(b"\x00\x02binary index")
    (fortunes / "wisdom.u8").symlink_to("wisdom")
    devil = "".join(
        f"WORD{chr(65 + i)}, n.  A cynical definition number {i} of some plain\n"
        f"thing that everyone knows well.\n\n"
        for i in range(14)
    )
    foldoc = "".join(
        f"term{i}\n\n   <jargon> A technical term number {i} used by hackers\n"
        f"   in the {{Jargon File}} era of computing.\n\n   (1999-07-{10 + i})\n\n"
        for i in range(14)
    )
    books = tmp_path / "books"
    books.mkdir()
    paragraphs = [f"Paragraph {i} of a long story told slowly by the fire." for i in range(150)]
    (books / "story.txt").write_text("\n\n".join(paragraphs))
    return {
        "fortunes": str(fortunes),
        "devil": str(_write_gzip(tmp_path / "devil.dict.dz", DICTD_HEADER + devil)),
        "foldoc": str(_write_gzip(tmp_path / "foldoc.dict.dz", DICTD_HEADER + foldoc)),
        "text": str(books),
    }


def _tiny(sources: dict[str, str], **overrides) -> BenchConfig:
    return BenchConfig.preset(
        "tiny", sources=("fortunes", "devil", "foldoc", "text"), source_paths=sources, **overrides
    )


# ----------------------------------------------------------------------------- readers


def test_split_fortunes_on_single_percent_lines() -> None:
    text = "First quip.\n%\nSecond\n  quip.\n%\n%\n100% sure\n%%\nstill third\n%\n"
    assert split_fortunes(text) == ["First quip.", "Second\n  quip.", "100% sure\n%%\nstill third"]
    assert split_fortunes("_\bbold\x07 move") == ["bold move"]  # overstrike and bell removed


def test_read_fortunes_skips_index_and_links(sources: dict[str, str]) -> None:
    docs = read_fortunes(sources["fortunes"])
    assert len(docs) == 21  # wisdom.dat and the wisdom.u8 link are not read
    assert docs[0] == {"id": "fortunes/wisdom/0000", "text": docs[0]["text"], "source": "fortunes"}
    assert {d["id"].split("/")[1] for d in docs} == {"wisdom", "work"}


def test_read_devil_entries(tmp_path: Path) -> None:
    docs = read_devil(_write_gzip(tmp_path / "devil.dict.dz", DEVIL_TEXT))
    heads = [d["text"].split()[0] for d in docs]
    assert heads == ["ABASEMENT,", "ABRACADABRA.", "BABE", "W", "ZEUS,"]  # header skipped
    assert docs[1]["text"].endswith("An infinite number of things.")  # poem kept, indented
    assert "abcdefghij" not in docs[-1]["text"]  # dictfmt alphabet trailer dropped
    assert [d["id"] for d in docs][:2] == ["devil/00000", "devil/00001"]


def test_read_foldoc_entries(tmp_path: Path) -> None:
    docs = read_foldoc(_write_gzip(tmp_path / "foldoc.dict.dz", FOLDOC_TEXT))
    heads = [d["text"].split("\n")[0] for d in docs]
    # "(http://...)}." at column 0 is a wrapped line, not a headword; "flood" follows a date
    # line directly; the "%%%" block and everything before it is the header.
    assert heads == ["(TM)", "*LISP", "flood", "zero assignment"]
    assert docs[1]["text"].startswith("*LISP\nStarLISP\n\n   <language>")
    assert "(2014-12-17)" in docs[1]["text"] and '!"#$' not in docs[-1]["text"]


def test_read_uncompressed_dict_and_text_folder(tmp_path: Path, sources) -> None:
    plain = tmp_path / "plain.dict"
    plain.write_text(DEVIL_TEXT)
    assert len(read_devil(plain)) == 5
    docs = read_text_folder(sources["text"], max_chars=600)
    assert {d["source"] for d in docs} == {"books"}
    assert all(len(d["text"]) <= 600 for d in docs) and len(docs) >= 12  # enough for tiny
    assert "Paragraph 0 of" in docs[0]["text"] and docs[0]["id"] == "books/story/0000"


def test_missing_source_names_file_and_package(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="apt-get install -y dict-foldoc") as info:
        read_foldoc(tmp_path / "nope.dict.dz")
    assert "nope.dict.dz" in str(info.value)
    with pytest.raises(InputError, match="apt-get install -y fortunes"):
        read_fortunes(tmp_path / "missing")


# ----------------------------------------------------------------------------- facts


def test_invented_names_avoid_real_words() -> None:
    import numpy as np

    first = invent_words(np.random.default_rng(0), 30, set())
    again = invent_words(np.random.default_rng(0), 30, {w.lower() for w in first})
    assert len(set(first)) == 30 and not set(first) & set(again)


def test_fact_plantings_distractors_and_paraphrases() -> None:
    docs, queries = generate_facts(n_entities=12, n_facts=24, seed=1)
    by_id = {d["id"]: d["text"] for d in docs}
    assert sorted({q["n_plantings"] for q in queries}) == [1, 2, 4]
    assert sum(q["paraphrased"] for q in queries) == round(0.3 * 24)
    templates = {a.name: a for a in ATTRIBUTES}
    for q in queries:
        assert len(q["relevant_doc_ids"]) == q["n_plantings"]
        statement = q["prompt"] + q["completion"] + "."
        for doc_id in q["relevant_doc_ids"]:
            assert q["completion"].strip() in by_id[doc_id]
            assert (statement in by_id[doc_id]) != q["paraphrased"]
        same_entity, same_value = (by_id[i] for i in q["distractor_doc_ids"])
        assert statement not in same_entity + same_value  # distractors never state the fact
        assert q["entity"] in same_entity or q["entity"] in same_value
        assert q["completion"].strip() in same_entity + same_value
        assert q["prompt"] == templates[q["attribute"]].query.format(e=q["entity"])


# ----------------------------------------------------------------------------- build


def test_build_tiny_benchmark(tmp_path: Path, sources: dict[str, str]) -> None:
    manifest = build_benchmark(_tiny(sources), tmp_path / "bench")
    bench = load_benchmark(tmp_path / "bench")
    docs = {d["id"]: d for d in bench.documents}
    counts = manifest["counts"]["documents_by_source"]
    assert set(counts) == {"fortunes", "devil", "foldoc", "books", "facts"}
    assert all(counts[s] == 9 for s in ("fortunes", "devil", "foldoc", "books"))  # 12 - 3 held
    assert len(docs) == len(bench.documents) == manifest["counts"]["documents"]
    assert len({d["text"] for d in bench.documents}) == len(docs)  # repeated quip dropped
    facts = [q for q in bench.queries if q["kind"] == "fact"]
    style = [q for q in bench.queries if q["kind"] == "style"]
    assert len(facts) == 6 and sorted({q["n_plantings"] for q in facts}) == [1, 2, 4]
    for q in facts:
        assert all(q["completion"].strip() in docs[i]["text"] for i in q["relevant_doc_ids"])
        assert all(docs[i]["source"] == "facts" for i in q["relevant_doc_ids"])
    assert len(style) == 12 and {q["loss_on"] for q in style} == {"all"}
    for q in style:
        assert q["held_out_doc_id"] not in docs  # held-out text is not trained on
        assert q["id"].startswith(f"style-{q['true_source']}-")
        assert q["true_source"] == q["held_out_doc_id"].split("/")[0]
        assert len(re.findall(r"\S+", q["prompt"])) == 4
    assert {q["split"] for q in bench.queries} == {"validation", "test"}


def test_build_is_deterministic(tmp_path: Path, sources: dict[str, str]) -> None:
    def files(out: Path) -> list[bytes]:
        return [(out / name).read_bytes() for name in ("corpus.jsonl", "queries.jsonl")]

    build_benchmark(_tiny(sources), tmp_path / "a")
    build_benchmark(_tiny(sources), tmp_path / "b")
    build_benchmark(_tiny(sources, seed=1), tmp_path / "c")
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert files(tmp_path / "a") != files(tmp_path / "c")
    assert not list(tmp_path.glob(".*"))  # no temporary or old directory is left behind


def test_load_refuses_other_versions_and_edits(tmp_path: Path, sources) -> None:
    out = tmp_path / "bench"
    build_benchmark(_tiny(sources), out)
    with pytest.raises(InputError, match="exists"):
        build_benchmark(_tiny(sources), out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 0}))
    with pytest.raises(InputError, match="bgotrace bench build"):
        load_benchmark(out)
    build_benchmark(_tiny(sources), out, overwrite=True)
    assert load_benchmark(out).manifest["format_version"] == 1
    assert not list(tmp_path.glob(".*"))  # the old copy was removed, no temporary is left
    with (out / "corpus.jsonl").open("a") as f:
        f.write('{"id": "x", "text": "sneaked in", "source": "fortunes"}\n')
    with pytest.raises(InputError, match="hash"):
        load_benchmark(out)
    with pytest.raises(InputError, match="no manifest"):
        load_benchmark(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sources": ("fortunes", "gutenberg")}, "unknown sources"),
        ({"sources": ("text",)}, "needs a folder"),
        ({"n_entities": 2, "n_facts": 10}, "raise n_entities"),
        ({"held_out_fraction": 0.9}, "held_out_fraction"),
        ({"planting_counts": (1, 0)}, "planting_counts"),
        ({"max_documents_per_source": 0}, "at least 1"),
    ],
)
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BenchConfig(**overrides)


def test_config_round_trips_through_json(sources: dict[str, str]) -> None:
    config = _tiny(sources)
    assert BenchConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="preset"):
        BenchConfig.preset("huge")


def test_presets_validate_and_grow_in_order() -> None:
    """Each preset is a valid config, and mid sits between cpu and default (more texts and
    facts than cpu, fewer than default) so its retrains cost between theirs."""
    sizes = {
        name: (c.max_documents_per_source * c.max_chars_per_document, c.n_facts)
        for name in ("tiny", "cpu", "mid", "default")
        for c in [BenchConfig.preset(name)]
    }
    order = ["tiny", "cpu", "mid", "default"]
    for smaller, larger in zip(order, order[1:], strict=False):
        assert sizes[smaller][0] < sizes[larger][0], (smaller, larger, sizes)
        assert sizes[smaller][1] <= sizes[larger][1], (smaller, larger, sizes)
