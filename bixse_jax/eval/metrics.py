"""Retrieval and correlation metrics (host side, numpy).

Conventions follow trec_eval so numbers are comparable with published BEIR /
MS MARCO tables: gain = raw grade, score ties broken by doc id descending, and
the ideal DCG built from all judged docs of the query (judged docs the run could
not rank, e.g. ones without text, included). Every query the qrels judge enters
the mean: one missing from the run scores 0 (trec_eval -c), so a run that drops
queries cannot look better, and one with no relevant doc scores 0 as in trec_eval
(and ir-measures, which these functions are tested against).
"""

import math
from typing import Callable, Iterable, Sequence

import numpy as np

Qrels = dict[str, dict[str, float]]  # query id -> doc id -> graded relevance (raw grade).
Run = dict[str, dict[str, float]]  # query id -> doc id -> score.
Rankings = dict[str, list[str]]  # query id -> doc ids, best first.
PerQuery = Callable[[list[str], dict[str, float]], float]


def _rankings(run: Run) -> Rankings:
    """Doc ids of each query by (score desc, doc id desc): trec_eval's tie-breaking."""
    return {
        qid: [d for d, _ in sorted(scores.items(), key=lambda x: (x[1], x[0]), reverse=True)]
        for qid, scores in run.items()
    }


def _mean_over_queries(rankings: Rankings, qrels: Qrels, per_query: PerQuery) -> float:
    """Mean of per_query(ranking, judgements) over the judged queries of qrels."""
    values = [per_query(rankings.get(qid, []), judged) for qid, judged in qrels.items() if judged]
    return float(np.mean(values)) if values else 0.0


def _n_relevant(judged: dict[str, float], rel_threshold: float) -> int:
    return sum(g >= rel_threshold for g in judged.values())


def _ndcg(rankings: Rankings, qrels: Qrels, k: int) -> float:
    def dcg(gains: Iterable[float]) -> float:
        return sum(g / math.log2(r + 2) for r, g in enumerate(gains))

    def per_query(ranking: list[str], judged: dict[str, float]) -> float:
        gains = [max(judged.get(d, 0.0), 0.0) for d in ranking[:k]]
        ideal = dcg(sorted((max(g, 0.0) for g in judged.values()), reverse=True)[:k])
        return dcg(gains) / ideal if ideal > 0 else 0.0

    return _mean_over_queries(rankings, qrels, per_query)


def _recall(rankings: Rankings, qrels: Qrels, k: int, rel_threshold: float) -> float:
    def per_query(ranking: list[str], judged: dict[str, float]) -> float:
        relevant = _n_relevant(judged, rel_threshold)
        hits = sum(judged.get(d, 0.0) >= rel_threshold for d in ranking[:k])
        return hits / relevant if relevant else 0.0

    return _mean_over_queries(rankings, qrels, per_query)


def _mrr(rankings: Rankings, qrels: Qrels, k: int, rel_threshold: float) -> float:
    def per_query(ranking: list[str], judged: dict[str, float]) -> float:
        for rank, d in enumerate(ranking[:k], start=1):
            if judged.get(d, 0.0) >= rel_threshold:
                return 1.0 / rank
        return 0.0

    return _mean_over_queries(rankings, qrels, per_query)


def _map(rankings: Rankings, qrels: Qrels, rel_threshold: float) -> float:
    def per_query(ranking: list[str], judged: dict[str, float]) -> float:
        hits, total = 0, 0.0
        for rank, d in enumerate(ranking, start=1):
            if judged.get(d, 0.0) >= rel_threshold:
                hits += 1
                total += hits / rank
        relevant = _n_relevant(judged, rel_threshold)
        return total / relevant if relevant else 0.0

    return _mean_over_queries(rankings, qrels, per_query)


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """nDCG@k with gain = raw grade (grades <= 0 give no gain), discount 1/log2(rank+1).

    Queries whose judged docs all have grade <= 0 have no ideal DCG and score 0 (trec_eval).
    """
    return _ndcg(_rankings(run), qrels, k)


def recall_at_k(run: Run, qrels: Qrels, k: int, rel_threshold: float = 1) -> float:
    """Fraction of the query's relevant docs (grade >= rel_threshold) found in the top k."""
    return _recall(_rankings(run), qrels, k, rel_threshold)


def mrr_at_k(run: Run, qrels: Qrels, k: int = 10, rel_threshold: float = 1) -> float:
    """Mean reciprocal rank of the first relevant doc within the top k (0 if none)."""
    return _mrr(_rankings(run), qrels, k, rel_threshold)


def average_precision(run: Run, qrels: Qrels, rel_threshold: float = 1) -> float:
    """MAP over the full ranking: sum of precision at each relevant hit / #relevant."""
    return _map(_rankings(run), qrels, rel_threshold)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their mean rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Start index of each run of equal values, and the run each element falls in.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_of = np.repeat(np.arange(len(starts)), ends - starts)
    ranks = np.empty(len(x), np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[run_of]
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either input is constant (like scipy)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    return float(np.dot(xc, yc) / denom) if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman correlation: Pearson on average ranks (matches scipy.stats.spearmanr)."""
    return pearson(
        _average_ranks(np.asarray(x, np.float64)), _average_ranks(np.asarray(y, np.float64))
    )


def evaluate_run(run: Run, qrels: Qrels, ks: Sequence[int] = (10, 100)) -> dict[str, float]:
    """The standard table: ndcg@k and recall@k for each k, plus mrr@10 and map."""
    rankings = _rankings(run)  # Sort once; every metric reads the same rankings.
    out: dict[str, float] = {}
    for k in ks:
        out[f"ndcg@{k}"] = _ndcg(rankings, qrels, k)
        out[f"recall@{k}"] = _recall(rankings, qrels, k, 1)
    out["mrr@10"] = _mrr(rankings, qrels, 10, 1)
    out["map"] = _map(rankings, qrels, 1)
    return out
