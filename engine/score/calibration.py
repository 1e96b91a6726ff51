"""Calibration of a preference model: does P(better) = sigmoid(score gap) mean what it says?

For every evaluation pair the model prefers the higher-scored response with confidence

    p = sigmoid(|r_i - r_j|)  in [0.5, 1)

and is right when that response is the better one (a pair scored exactly equal is half
right: p = 0.5, outcome 0.5). Pairs are binned by p into ``bins`` equal-width bins over
[0.5, 1]; per bin we report the mean confidence and the observed frequency, and

    ECE = sum_b (n_b / N) |frequency_b - confidence_b|

(the expected calibration error). ``gaps`` are always r_better - r_worse, so the outcome
is ``gap > 0``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class CalibrationBin:
    lo: float
    hi: float
    count: int
    confidence: float  # mean p in the bin (nan when empty)
    frequency: float  # observed fraction right (nan when empty)


@dataclass
class Calibration:
    pairs: int
    ece: float
    bins: list[CalibrationBin]

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "ece": self.ece, "bins": [asdict(b) for b in self.bins]}


def confidence_and_outcome(gaps) -> tuple[np.ndarray, np.ndarray]:
    gaps = np.asarray(gaps, dtype=np.float64)
    if not np.all(np.isfinite(gaps)):
        raise ValueError(f"calibration: {int((~np.isfinite(gaps)).sum())} score gaps are not finite")
    confidence = 1.0 / (1.0 + np.exp(-np.abs(gaps)))  # exp of a non-positive number: no overflow
    outcome = np.where(gaps > 0, 1.0, np.where(gaps < 0, 0.0, 0.5))
    return confidence, outcome


def calibration(gaps, bins: int = 10) -> Calibration:
    if bins < 1:
        raise ValueError(f"calibration: bins={bins}, expected >= 1")
    confidence, outcome = confidence_and_outcome(gaps)
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.floor((confidence - 0.5) / (0.5 / bins)).astype(np.int64), 0, bins - 1)
    out, ece, n = [], 0.0, confidence.size
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        conf = float(confidence[inside].mean()) if count else float("nan")
        freq = float(outcome[inside].mean()) if count else float("nan")
        if count:
            ece += count / n * abs(freq - conf)
        out.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), count, conf, freq))
    return Calibration(pairs=n, ece=ece if n else float("nan"), bins=out)


def reliability_plot(result: Calibration, path, title: str = "Calibration") -> None:
    """Observed frequency against confidence per bin (marker area ~ pair count), PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    full = [b for b in result.bins if b.count]
    ax.plot([0.5, 1.0], [0.5, 1.0], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    if full:
        sizes = np.array([b.count for b in full], dtype=float)
        ax.plot([b.confidence for b in full], [b.frequency for b in full], color="C0", linewidth=1)
        ax.scatter([b.confidence for b in full], [b.frequency for b in full],
                   s=20 + 200 * sizes / sizes.max(), color="C0", zorder=3, label="model")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("predicted P(higher-scored is better) = sigmoid(|gap|)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{title}\nECE = {result.ece:.3f} over {result.pairs} pairs", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
