"""The report's figures as PNG data URIs: the page stays one file that needs no network.

matplotlib runs on the Agg backend (no display); each figure is closed once encoded
so that rendering many queries does not accumulate open figures.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: reports are rendered on headless machines

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SIZE = (4.6, 2.6)
"""Figure size in inches; at 100 dpi a figure is 460 px wide (two fit side by side)."""
DPI = 100


def _data_uri(fig: matplotlib.figure.Figure) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def score_distribution(scores: np.ndarray, shown: Sequence[float], unit: str) -> str:
    """Histogram of every unit's score, with the units the report lists marked."""
    fig, ax = plt.subplots(figsize=SIZE)
    finite = scores[np.isfinite(scores)]
    ax.hist(finite, bins=min(60, max(10, len(finite) // 5)), color="#8da0cb", log=True)
    for value in shown:
        ax.axvline(value, color="#1b9e77", linewidth=0.8, alpha=0.7)
    ax.axvline(0.0, color="#444", linewidth=0.8, linestyle=":")
    ax.set_xlabel(f"score ({unit}); green lines: units listed below")
    ax.set_ylabel("units")
    return _data_uri(fig)


def source_shares(positive_mass: pd.Series, top: int = 10) -> str:
    """Each source's share of the positive score mass (the sum of its units' scores > 0)."""
    total = float(positive_mass.sum())
    shares = (positive_mass / total if total > 0 else positive_mass * 0.0).sort_values()
    shares = shares.tail(top)
    fig, ax = plt.subplots(figsize=(SIZE[0], 0.35 * len(shares) + 0.9))
    labels = [str(s)[:30].replace("$", r"\$") for s in shares.index]  # "$" starts mathtext
    ax.barh(range(len(labels)), shares.to_numpy(), color="#66c2a5")
    ax.set_yticks(range(len(labels)), labels)  # positions: cut labels may coincide
    ax.set_xlabel("share of positive score mass")
    ax.set_xlim(0, 1)
    return _data_uri(fig)


def loss_trajectories(
    trajectories: dict[str, list[float]], spans: Sequence[dict[str, list[float]]] = ()
) -> str:
    """Query loss at each perturbation step, descent (θ+) and ascent (θ−); thin dashed
    lines: the same for each span's own loss."""
    fig, ax = plt.subplots(figsize=SIZE)
    colours = {"descent": "#1b9e77", "ascent": "#d95f02"}
    values = [v for t in (trajectories, *spans) for losses in t.values() for v in losses]
    for k, span in enumerate(spans):
        for direction, losses in sorted(span.items()):
            label = "spans" if k == 0 and direction == "ascent" else None
            ax.plot(losses, "--", linewidth=0.8, alpha=0.5, color="#777", label=label)
    for direction, losses in sorted(trajectories.items()):
        ax.plot(losses, marker="o", label=direction, color=colours.get(direction))
    if values and min(values) > 0 and max(values) / min(values) > 50:
        ax.set_yscale("log")  # ascent often grows by orders of magnitude
    ax.set_xlabel("step")
    ax.set_ylabel("query loss (nats)")
    ax.legend()
    return _data_uri(fig)
