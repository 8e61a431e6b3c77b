"""The shipped demo: a small public-domain corpus and a model trained on it by bgotrace.

Because bgotrace trained the model itself (``scripts/build_demo_assets.py``), every
text it produces can be traced to training data that is known exactly. The corpus
holds entries of Ambrose Bierce's *The Devil's Dictionary* and of the Jargon File,
one document per entry (id = headword, source = the book); ``assets/LICENSE.md``
gives their provenance.
"""

from __future__ import annotations

from pathlib import Path

from bgotrace.errors import InputError, ModelLoadError

DEMO_PROMPT_DOCS: dict[str, str] = {
    "DIPLOMACY, n.": "DIPLOMACY",
    "BORE, n.": "BORE",
    "PATIENCE, n.": "PATIENCE",
    "LAWYER, n.": "LAWYER",
    "APPLAUSE, n.": "APPLAUSE",
}
"""Each demo prompt and the corpus document it comes from: the expected top attribution."""

DEMO_PROMPTS: tuple[str, ...] = tuple(DEMO_PROMPT_DOCS)
"""Headword lines of Devil's Dictionary entries; the demo model continues each with the
beginning of that entry's definition (checked by the tests)."""

DEMO_MAX_LENGTH = 128
"""Tokens per unit the demo model was trained with; score with the same to rank its units."""

_REBUILD = "reinstall bgotrace or run scripts/build_demo_assets.py"


def assets_dir() -> Path:
    """The folder holding the shipped corpus, its licence and the demo model."""
    return Path(__file__).resolve().parent / "assets"


def demo_corpus_path() -> Path:
    """``corpus.jsonl``: fields ``id``, ``text``, ``source``."""
    path = assets_dir() / "corpus.jsonl"
    if not path.is_file():
        raise InputError(f"The demo corpus {path} is missing: {_REBUILD}.")
    return path


def demo_model_path() -> Path:
    """The demo model directory, loadable with ``AutoModelForCausalLM.from_pretrained``."""
    path = assets_dir() / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"The demo model {path} is missing: {_REBUILD}.")
    return path
