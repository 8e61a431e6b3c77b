"""SFT cache build speed: conversations rendered by a chat template vs the same text as plain.

    python benchmarks/bench_sft_cache.py               # 2,000 five-turn conversations
    python benchmarks/bench_sft_cache.py --n 500       # quicker

The tokenizer is the tests' GPT-2-style byte-level BPE with the ChatML template
(``tests/test_chat.py``); each conversation is system, user, assistant, user, assistant with
random words. Three token caches are built from JSONL in a temporary folder (``--max-length
128``, best of ``--rounds`` wall-clock runs each): the conversations (``messages`` records,
``--unit-loss assistant``); the same with ``--unit-loss all``; and their rendered texts as
plain ``text`` records (no EOS), which is what tokenizing alone costs. Also timed: the
renderer alone (:func:`bgotrace.chat.conversation_renderer`) over the conversations.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the tokenizer

from tests.conftest import TOKENIZER_TRAINING_TEXT  # noqa: E402
from tests.test_chat import make_chatml_tokenizer  # noqa: E402

from bgotrace.cache.token_cache import get_token_cache  # noqa: E402
from bgotrace.chat import Message, conversation_renderer  # noqa: E402
from bgotrace.corpus import ChunkingConfig, CorpusFiles, Document  # noqa: E402

ROLES = ("system", "user", "assistant", "user", "assistant")


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    words = TOKENIZER_TRAINING_TEXT.split()
    rng = random.Random(seed)
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    lengths = {"system": 5, "user": 12, "assistant": 20}
    return [[{"role": r, "content": say(lengths[r])} for r in ROLES] for _ in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> CorpusFiles:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return CorpusFiles(str(path))


def best_build(corpus: CorpusFiles, tok, chunking: ChunkingConfig, root: Path, rounds: int):
    times = []
    for r in range(rounds):
        start = time.perf_counter()
        get_token_cache(corpus, tok, chunking, root / f"r{r}", progress=False)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="conversations")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tok = make_chatml_tokenizer()
    chats = conversations(args.n)
    messages = [tuple(Message(**m) for m in chat) for chat in chats]
    start = time.perf_counter()
    render = conversation_renderer(tok, "assistant")  # as a cache build renders
    docs = [Document(f"c{i}", "", "s", messages=m) for i, m in enumerate(messages)]
    rendered = [render(doc) for doc in docs]
    render_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sft = write_jsonl(root / "sft.jsonl", [{"id": f"c{i}", "messages": c}
                                               for i, c in enumerate(chats)])  # fmt: skip
        plain = write_jsonl(root / "plain.jsonl", [{"id": f"c{i}", "text": r.text}
                                                   for i, r in enumerate(rendered)])  # fmt: skip
        runs = {
            "sft (assistant)": (sft, ChunkingConfig(128)),
            "sft (all)": (sft, ChunkingConfig(128, unit_loss="all")),
            "plain text": (plain, ChunkingConfig(128, append_eos=False)),
        }
        seconds = {
            name: best_build(corpus, tok, chunking, root / name.replace(" ", "_"), args.rounds)
            for name, (corpus, chunking) in runs.items()
        }
    n_tokens = sum(len(r.ids) for r in rendered)
    print(f"{args.n} conversations, {n_tokens} tokens; best of {args.rounds} builds:")
    print(f"  rendering alone: {render_s:.2f} s ({args.n / render_s:,.0f} conv/s)")
    for name, s in seconds.items():
        ratio = s / seconds["plain text"]
        print(f"  {name:16s} {s:6.2f} s  {args.n / s:8,.0f} conv/s  {ratio:4.1f}x plain")


if __name__ == "__main__":
    main()
