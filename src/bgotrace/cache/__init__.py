"""Cache stage: the tokenized corpus as memory-mapped units, refused when stale.

``get_token_cache`` builds a cache directory once and reopens it on later runs as long as the
tokenizer, chunking and corpus are unchanged.
"""

from __future__ import annotations

from bgotrace.cache.fingerprint import tokenizer_fingerprint
from bgotrace.cache.token_cache import TokenCache, get_token_cache

__all__ = ["TokenCache", "get_token_cache", "tokenizer_fingerprint"]
