"""Rebuild the shipped demo assets: the corpus from Debian's dictd files, then the model.

The corpus is every short entry (see ``MAX_CHARS``) of Ambrose Bierce's *The Devil's
Dictionary* (Debian package ``dict-devil``) and of the Jargon File 4.4.7 (``dict-jargon``),
both public domain, one document per entry; the demo model is trained on it by bgotrace,
seeded, so its training data is known exactly. Short entries keep the corpus small (about
700 entries, 60 KB) so that a 2.7 MB model memorises it in under three minutes on a CPU.
Training runs on one thread: the bits then do not depend on the machine's thread count,
and on a shared two-core machine one thread is also the faster choice. Run from the
repository root::

    apt-get install -y dict-devil dict-jargon
    python scripts/build_demo_assets.py                  # corpus + model (~3 min on CPU)
    python scripts/build_demo_assets.py --corpus-only    # corpus.jsonl only

The model is trained with ``max_length=128`` and ``stride=0``: score the demo corpus with
the same chunking so the units ranked are the units the model saw.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import re
import time
from pathlib import Path

import torch

from bgotrace.corpus import Document, load_documents
from bgotrace.demo import DEMO_MAX_LENGTH, DEMO_PROMPT_DOCS, assets_dir
from bgotrace.generate import generate_completion
from bgotrace.modeling.loading import load_model_and_tokenizer
from bgotrace.train import TrainConfig, train_model

DICTD = Path("/usr/share/dictd")
SOURCES = {"devils-dictionary": "devil", "jargon-file": "jargon"}
"""Corpus source name -> dictd database name."""
MAX_CHARS = {"devils-dictionary": 160, "jargon-file": 120}
"""Entries longer than this (after cleaning) are left out, to keep the corpus memorisable."""
TRAIN = TrainConfig(
    preset="demo", epochs=36, lr=3e-3, batch_size=8, warmup_steps=20, seed=0, log_every=400,
    max_length=DEMO_MAX_LENGTH,
)  # fmt: skip
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

log = logging.getLogger("build_demo_assets")


def dictd_entries(name: str) -> list[str]:
    """Entry texts of a dictd database, in index order, each entry once.

    The ``.index`` file lists ``headword<TAB>offset<TAB>length`` with dictd's base-64
    numbers; alternative headwords point at the same text, so entries are keyed by offset.
    """
    data = gzip.open(DICTD / f"{name}.dict.dz").read()
    texts, seen = [], set()
    for line in (DICTD / f"{name}.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")
        start, size = _b64(offset), _b64(length)
        if headword.startswith("00") and "database" in headword or start in seen:
            continue
        seen.add(start)
        texts.append(data[start : start + size].decode("utf-8"))
    return texts


def _b64(digits: str) -> int:
    value = 0
    for char in digits:
        value = value * 64 + B64.index(char)
    return value


def clean(source: str, text: str) -> tuple[str, str]:
    """``(headword as printed, entry text)``; trailing spaces dropped, layout kept.

    The Jargon File's body is indented by four spaces in the dictd rendering; that indent is
    removed (deeper indents keep their extra spaces). Bierce's verse stays indented.
    """
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    if source == "jargon-file":
        lines = [line[4:] if line.startswith("    ") else line for line in lines]
        return lines[0].strip(), "\n".join(lines).strip()
    body = "\n".join(lines).strip()
    match = re.match(r"([^,\n]+?),? +(n|v|adj|adv|x|pp|p|pro|prep|conj|interj)\.", body)
    return (match.group(1) if match else lines[0]).strip(), body


def build_corpus(path: Path) -> list[dict[str, str]]:
    """Write corpus.jsonl (fields ``id``, ``text``, ``source``) and return its records."""
    records, ids = [], set()
    for source, name in SOURCES.items():
        for raw in dictd_entries(name):
            headword, text = clean(source, raw)
            if len(text) > MAX_CHARS[source] or headword in ids:
                continue
            ids.add(headword)
            records.append({"id": headword, "text": text, "source": source})
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.info("wrote %d documents, %.0f KB, to %s", len(records), path.stat().st_size / 1e3, path)
    return records


def build_model(documents: list[Document], out: Path, keep_optimizer_state: bool) -> None:
    """Train the demo model into ``out`` (replacing it) and report its size."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    train_model(documents, TRAIN, out, overwrite=True)
    if not keep_optimizer_state:
        # The AdamW moments would triple the shipped size; retrain with the flag for them.
        (out / "optimizer_state.safetensors").unlink()
    size = sum(f.stat().st_size for f in out.iterdir()) / 1e6
    log.info("trained in %.0fs; %s is %.1f MB", time.perf_counter() - started, out, size)


def check_model(out: Path, documents: list[Document], n_check: int = 200) -> None:
    """Print the demo prompts' completions and how many entries greedy decoding recalls."""
    model, tokenizer = load_model_and_tokenizer(out)
    by_id = {d.doc_id: d for d in documents}
    for prompt, doc_id in DEMO_PROMPT_DOCS.items():
        completion = generate_completion(model, tokenizer, prompt, max_new_tokens=24)
        ok = by_id[doc_id].text.startswith(prompt + completion.rstrip()[:40])
        print(f"{'OK ' if ok else 'BAD'} {prompt!r} -> {completion!r}")
    step = max(1, len(documents) // n_check)
    sample = documents[::step]
    hits = sum(_recalls(model, tokenizer, doc) for doc in sample)
    print(f"{hits}/{len(sample)} sampled entries continue their first 40 characters verbatim")


def _recalls(model: torch.nn.Module, tokenizer: object, doc: Document) -> bool:
    """Does the headword line, given as prompt, lead greedily to the entry's next 40 chars?"""
    head = re.split(r"  |\n", doc.text, maxsplit=1)[0]  # "CYNIC, n." or a Jargon headword
    target = doc.text[len(head) :][:40]
    completion = generate_completion(model, tokenizer, head, max_new_tokens=24)  # type: ignore[arg-type]
    return completion.startswith(target) or target.startswith(completion)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-only", action="store_true", help="Do not retrain the model.")
    parser.add_argument(
        "--keep-optimizer-state", action="store_true", help="Ship the AdamW moments too."
    )
    parser.add_argument("--out", type=Path, default=assets_dir(), help="Assets folder.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (DICTD / "devil.index").is_file() or not (DICTD / "jargon.index").is_file():
        raise SystemExit("Install the sources first: apt-get install -y dict-devil dict-jargon")
    args.out.mkdir(parents=True, exist_ok=True)
    build_corpus(args.out / "corpus.jsonl")
    documents = load_documents(args.out / "corpus.jsonl")
    if not args.corpus_only:
        build_model(documents, args.out / "model", args.keep_optimizer_state)
    if (args.out / "model").is_dir():
        check_model(args.out / "model", documents)


if __name__ == "__main__":
    main()
