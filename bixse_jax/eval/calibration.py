"""Are predicted relevance probabilities calibrated? ECE, Brier score, reliability diagram, Platt scaling.

BiXSE's `predict_relevance` returns p = sigmoid(exp(t) cos + b), which claims to be the probability
that a (query, document) pair is relevant; judged pairs with grades test the claim. The target of
a pair is its grade / max grade in [0, 1] (TREC-DL's 0-3 as g/3, STS-B's 0-5 as s/5), the quantity
BiXSE's loss regresses p onto, so a calibrated model has mean target = mean p within every bin of p.

  ECE   = sum over 15 equal-width bins of p in [0, 1] of (n_bin / N) |mean p - mean target|
  Brier = mean (p - target)^2

A model without meaningful t and b (InfoNCE's t is a softmax temperature and its b is never
trained) gets the classical baseline instead: Platt scaling, p = sigmoid(a cos + c) with (a, c)
fitted by logistic regression of the targets on the cosines of held-out dev pairs.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np

from bixse_jax.data.sources import GradedPair
from bixse_jax.logit_init import fit_logistic

BINS = 15


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))  # no overflow


def relevance_probability(scores: np.ndarray, log_temperature: float, bias: float) -> np.ndarray:
    """The model's own probability of relevance, sigmoid(exp(t) cos + b), as BiXSE trains it."""
    return sigmoid(np.exp(log_temperature) * np.asarray(scores, np.float64) + bias)


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per equal-width bin of p ([k/bins, (k+1)/bins), the last closed): count, mean p, mean target."""
    p, y = np.asarray(probs, np.float64), np.asarray(targets, np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for k in range(bins):
        sel = index == k
        n = int(sel.sum())
        out.append({"low": k / bins, "high": (k + 1) / bins, "count": n,
                    "mean_probability": float(p[sel].mean()) if n else None,
                    "mean_target": float(y[sel].mean()) if n else None})
    return out


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> float:
    """Count-weighted mean over the bins of |mean p - mean target| (empty bins weigh nothing)."""
    n = len(probs)
    return float(sum(b["count"] / n * abs(b["mean_probability"] - b["mean_target"])
                     for b in reliability(probs, targets, bins) if b["count"]))


def brier_score(probs: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean((np.asarray(probs, np.float64) - np.asarray(targets, np.float64)) ** 2))


def report(probs: np.ndarray, targets: np.ndarray, bins: int = BINS) -> dict:
    """ECE, Brier score, the means, and the reliability bins of one set of predictions."""
    return {"ece": expected_calibration_error(probs, targets, bins), "brier": brier_score(probs, targets),
            "pairs": int(len(probs)), "mean_probability": float(np.mean(probs)),
            "mean_target": float(np.mean(targets)), "bins": reliability(probs, targets, bins)}


def fit_platt(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(a, c) of Platt scaling sigmoid(a * score + c), by logistic regression on (score, target) pairs
    (soft targets allowed; float64 Newton, logit_init.fit_logistic, which keeps a > 0: a score that
    ranks against relevance gets no calibration map)."""
    a, c, _ = fit_logistic(scores, targets, init_scale=1.0, init_bias=0.0)
    return a, c


def pair_scores(enc, pairs: Sequence[GradedPair]) -> np.ndarray:
    """The score training uses for each pair: query side (with its prefix and length) against the
    document side, dot product (the cosine for a normalised model). Every distinct text is encoded once."""
    queries = list(dict.fromkeys(p.query for p in pairs))
    docs = list(dict.fromkeys(p.document for p in pairs))
    q = np.asarray(enc.queries(queries), np.float64)
    d = np.asarray(enc.documents(docs), np.float64)
    qi = {t: i for i, t in enumerate(queries)}
    di = {t: i for i, t in enumerate(docs)}
    return np.array([q[qi[p.query]] @ d[di[p.document]] for p in pairs])


def plot(path: str | pathlib.Path, results: dict[str, dict], title: str) -> None:
    """Reliability diagram PNG: per method, mean target against mean p per bin (marker area ~ count),
    the diagonal of perfect calibration, and the histogram of p below."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for name, r in results.items():
        full = [b for b in r["bins"] if b["count"]]
        x = [b["mean_probability"] for b in full]
        y = [b["mean_target"] for b in full]
        line, = top.plot(x, y, marker="o", label=f"{name}: ECE {r['ece']:.3f}, Brier {r['brier']:.3f}")
        centers = [(b["low"] + b["high"]) / 2 for b in r["bins"]]
        bottom.bar(centers, [b["count"] for b in r["bins"]], width=1 / len(r["bins"]), alpha=0.4,
                   color=line.get_color(), edgecolor="none")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="mean target (grade / max grade)")
    top.set_title(title, fontsize=8)
    top.legend(fontsize=8, loc="upper left")
    bottom.set(xlabel="predicted probability", ylabel="pairs")
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
