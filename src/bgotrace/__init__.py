"""bgotrace: training data attribution for causal LMs by bidirectional gradient optimization."""

from __future__ import annotations

__version__ = "0.1.0"
