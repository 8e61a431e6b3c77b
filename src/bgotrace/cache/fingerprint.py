"""Fingerprints that decide whether a stored artefact may be reused.

A fingerprint must change whenever the thing it summarises would produce different tokens, and
must not change otherwise. For a tokenizer that rules out hashing runtime state: transformers
switches truncation and padding on the backend tokenizer during calls, and that state shows up
in ``backend_tokenizer.to_str()``, so it is removed before hashing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

RUNTIME_KEYS = ("truncation", "padding")
"""Keys of the tokenizer JSON that hold call-time state, not the tokenizer itself."""


def sha256_text(*parts: str) -> str:
    """sha256 of several strings, each length-prefixed so ``("ab", "c") != ("a", "bc")``."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values give equal strings.

    Objects JSON does not know (e.g. ``AddedToken``) are written as their ``str``.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def short(fingerprint: str, n: int = 12) -> str:
    """Abbreviation for messages; 12 hex characters are plenty to tell two apart."""
    return fingerprint[:n]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition (fast: ``tokenizer.json``; else: sorted vocab).

    Special tokens are included because EOS is appended to every document, and a different
    EOS (same vocab) would still change the cached tokens.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        for key in RUNTIME_KEYS:
            definition.pop(key, None)
        body = canonical_json(definition)
    else:
        body = canonical_json(sorted(tokenizer.get_vocab().items()))
    return sha256_text(body, canonical_json(_special_tokens(tokenizer)))


def _special_tokens(tokenizer: Any) -> dict[str, Any]:
    """Special token strings and ids, e.g. ``{"eos_token": "<|endoftext|>", "eos_token_id": 0}``."""
    special = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    special["eos_token_id"] = getattr(tokenizer, "eos_token_id", None)
    return special
