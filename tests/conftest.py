"""Shared fixtures: a tiny tokenizer and corpus, built offline in well under a second."""

from __future__ import annotations

import pytest

from bgotrace.corpus import Document

EOS = "<|endoftext|>"

TOKENIZER_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat.
A language model predicts the next token from the tokens before it, one step at a time.
Training data attribution asks which documents taught the model a given completion.
Gradients point uphill; a small step against the gradient lowers the loss of a query.
Rivers carry sand to the sea, mountains rise slowly, and forests grow back after fire.
Paris is the capital of France, Berlin of Germany, Madrid of Spain and Rome of Italy.
Numbers like 1, 2, 3, 42 and 2024 appear in text, as do dates such as 14 July 1789.
Cafés serve crème brûlée; naïve façades hide Zürich's old streets. Ünïcödé matters.
def add(a, b): return a + b  # code shows up in corpora too, with symbols {}[]()<>=
Water boils at one hundred degrees, ice melts at zero, and steam rises from the pot.
"""


def make_tiny_tokenizer(vocab_size: int = 400):
    """Byte-level BPE trained on the inline text; different sizes give different tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TOKENIZER_TRAINING_TEXT.splitlines() * 3, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=EOS
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A fast GPT-2-style tokenizer (byte-level BPE, ``<|endoftext|>`` as EOS/BOS/PAD/UNK)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def tok():
    """A tiny tokenizer of the test module's own (module scope: no state shared across files)."""
    return make_tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny random GPT-2 (``tests.models.tiny_gpt2``, seed 0) of the test module's own."""
    from tests.models import tiny_gpt2

    return tiny_gpt2(tok)


@pytest.fixture(scope="module")
def llama_tok():
    """A Llama-style tokenizer with a chat template built in code (tests/test_chat.py)."""
    from tests.test_chat import make_llama_chat_tokenizer

    return make_llama_chat_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    """A GPT-2-style tokenizer with a ChatML template (tests/test_chat.py)."""
    from tests.test_chat import make_chatml_tokenizer

    return make_chatml_tokenizer()


@pytest.fixture(scope="session")
def other_tiny_tokenizer():
    """Like ``tiny_tokenizer`` but with a smaller vocabulary: for must-differ checks."""
    return make_tiny_tokenizer(vocab_size=300)


@pytest.fixture
def tiny_documents() -> list[Document]:
    """Six short documents from three sources; one is long enough to need several windows."""
    long_text = " ".join(
        ["The quick brown fox jumps over the lazy dog."] * 6
        + ["Paris is the capital of France, and Rome of Italy."] * 4
    )
    return [
        Document("fox", "The quick brown fox jumps over the lazy dog.", "animals"),
        Document("cat", "The cat sleeps on a warm mat while rivers carry sand.", "animals"),
        Document("paris", "Paris is the capital of France.", "geography"),
        Document("long", long_text, "geography"),
        Document("code", "def add(a, b): return a + b", "code"),
        Document("cafe", "Cafés serve crème brûlée in Zürich.", "code"),
    ]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny test models run far faster on one thread than on two contended ones."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
