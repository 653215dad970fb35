"""Retrieval metrics on hand-computed examples, trec_eval tie-breaking, correlations vs scipy."""

import math

import numpy as np
import pytest
import scipy.stats

from bixse_jax.eval import metrics

LOG2_3 = math.log2(3)

# q1: graded; q2: its only relevant doc at rank 3; q3: nothing relevant (scores 0, as in
# trec_eval); q4: relevant doc but absent from the run (scores 0).
QRELS = {
    "q1": {"d1": 3, "d2": 1, "d3": 0, "d4": 2},
    "q2": {"a": 1, "b": 0},
    "q3": {"x": 0},
    "q4": {"y": 2},
}
RUN = {
    "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d5": 0.6, "d4": 0.5},  # d1 d2 d3 d5 d4
    "q2": {"b": 2.0, "c": 1.0, "a": 0.5},  # b c a
    "q3": {"x": 1.0},
}
# Per-query values, written out by hand (q3 and q4 are 0 everywhere).
Q1_NDCG3 = (3 + 1 / LOG2_3) / (3 + 2 / LOG2_3 + 1 / 2)  # 3.63093 / 4.76186 = 0.762502
Q1_NDCG5 = (3 + 1 / LOG2_3 + 2 / math.log2(6)) / (3 + 2 / LOG2_3 + 1 / 2)  # 0.924982
Q2_NDCG3 = (1 / 2) / 1  # gain 1 at rank 3: 1 / log2(4).


def test_ndcg_hand_computed():
    assert metrics.ndcg_at_k(RUN, QRELS, 3) == pytest.approx((Q1_NDCG3 + Q2_NDCG3 + 0 + 0) / 4)
    assert metrics.ndcg_at_k(RUN, QRELS, 5) == pytest.approx((Q1_NDCG5 + Q2_NDCG3 + 0 + 0) / 4)
    assert metrics.ndcg_at_k(RUN, QRELS, 2) == pytest.approx(
        ((3 + 1 / LOG2_3) / (3 + 2 / LOG2_3) + 0 + 0 + 0) / 4
    )


def test_hand_worked_values_equal_trec_eval():
    """The per-query values written out above, against ir-measures, which shares no code with them
    (trec_eval's C code through pytrec_eval; RR@10 through MS MARCO's script)."""
    import ir_measures
    from ir_measures import AP, RR, R, nDCG

    theirs = {(m.query_id, str(m.measure)): m.value
              for m in ir_measures.iter_calc([nDCG @ 2, nDCG @ 3, nDCG @ 5, R @ 3, RR @ 10, AP], QRELS, RUN)}
    assert theirs[("q1", "nDCG@3")] == pytest.approx(Q1_NDCG3, abs=1e-12)
    assert theirs[("q1", "nDCG@5")] == pytest.approx(Q1_NDCG5, abs=1e-12)
    assert theirs[("q2", "nDCG@3")] == pytest.approx(Q2_NDCG3, abs=1e-12)
    assert theirs[("q1", "nDCG@2")] == pytest.approx((3 + 1 / LOG2_3) / (3 + 2 / LOG2_3), abs=1e-12)
    assert theirs[("q1", "R@3")] == pytest.approx(2 / 3) and theirs[("q2", "R@3")] == 1.0
    assert theirs[("q1", "RR@10")] == 1.0 and theirs[("q2", "RR@10")] == pytest.approx(1 / 3)
    assert theirs[("q1", "AP")] == pytest.approx((1 + 1 + 3 / 5) / 3) and theirs[("q2", "AP")] == pytest.approx(1 / 3)


def test_recall_mrr_map_hand_computed():
    assert metrics.recall_at_k(RUN, QRELS, 3) == pytest.approx((2 / 3 + 1 + 0 + 0) / 4)  # 5/12
    assert metrics.recall_at_k(RUN, QRELS, 1) == pytest.approx((1 / 3 + 0 + 0 + 0) / 4)
    # With grade >= 2 as relevant: q1 has {d1, d4} (1 of 2 in top 3); q2 and q3 have none (0), q4 is 0.
    assert metrics.recall_at_k(RUN, QRELS, 3, rel_threshold=2) == pytest.approx((1 / 2 + 0 + 0 + 0) / 4)
    assert metrics.mrr_at_k(RUN, QRELS, 10) == pytest.approx((1 + 1 / 3 + 0 + 0) / 4)  # 1/3
    assert metrics.mrr_at_k(RUN, QRELS, 2) == pytest.approx((1 + 0 + 0 + 0) / 4)
    # q1 hits at ranks 1, 2, 5: (1/1 + 2/2 + 3/5) / 3 = 0.8667; q2: (1/3) / 1; q3, q4: 0.
    assert metrics.average_precision(RUN, QRELS) == pytest.approx(0.3)


def test_query_without_relevant_docs_scores_0_like_trec_eval():
    base = metrics.evaluate_run(RUN, QRELS, ks=(3,))
    without_q3 = metrics.evaluate_run(RUN, {q: v for q, v in QRELS.items() if q != "q3"}, ks=(3,))
    assert base == pytest.approx({name: value * 3 / 4 for name, value in without_q3.items()})
    assert metrics.ndcg_at_k({"q": {"a": 1.0}}, {"q": {"a": 0}}, 10) == 0.0
    assert metrics.evaluate_run({}, {}) == {"ndcg@10": 0.0, "recall@10": 0.0, "ndcg@100": 0.0, "recall@100": 0.0,
                                            "mrr@10": 0.0, "map": 0.0}  # no judged query: nothing to average


def test_evaluate_run_keys_and_values():
    out = metrics.evaluate_run(RUN, QRELS, ks=(3, 5))
    assert set(out) == {"ndcg@3", "recall@3", "ndcg@5", "recall@5", "mrr@10", "map"}
    assert out["ndcg@3"] == pytest.approx((Q1_NDCG3 + Q2_NDCG3) / 4)
    assert out["recall@5"] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert out["map"] == pytest.approx(0.3)
    assert set(metrics.evaluate_run(RUN, QRELS)) >= {"ndcg@10", "recall@10", "recall@100"}


def test_ties_broken_by_doc_id_descending():
    qrels = {"q": {"a": 1}}
    assert metrics.mrr_at_k({"q": {"a": 1.0, "b": 1.0, "c": 1.0}}, qrels) == pytest.approx(1 / 3)
    assert metrics.mrr_at_k({"q": {"a": 1.0, "b": 1.0, "c": 1.0}}, {"q": {"c": 1}}) == 1.0
    # Only tied docs are reordered: a scores higher and stays first.
    assert metrics.mrr_at_k({"q": {"a": 2.0, "b": 1.0, "c": 1.0}}, {"q": {"b": 1}}) == pytest.approx(1 / 3)
    # String order like trec_eval's strcmp: "d9" > "d10", so d9 ranks first.
    assert metrics.mrr_at_k({"q": {"d10": 0.5, "d9": 0.5}}, {"q": {"d10": 1}}) == 0.5


def test_negative_grade_gives_no_gain_and_unjudged_docs_count_as_zero():
    run = {"q": {"a": 3.0, "z": 2.0, "b": 1.0}}  # z is unjudged.
    qrels = {"q": {"a": -1, "b": 1}}
    assert metrics.ndcg_at_k(run, qrels, 3) == pytest.approx(1 / 2)  # b at rank 3.
    assert metrics.ndcg_at_k(run, qrels, 2) == 0.0


def test_mrr_cutoff():
    run = {"q": {f"d{i:02d}": -i for i in range(20)}}
    assert metrics.mrr_at_k(run, {"q": {"d10": 1}}, 10) == 0.0  # Rank 11.
    assert metrics.mrr_at_k(run, {"q": {"d10": 1}}, 11) == pytest.approx(1 / 11)


@pytest.mark.parametrize("seed", range(4))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5, 30).astype(float)  # Many ties.
    y = x + rng.normal(0, 2, 30)
    assert metrics.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert metrics.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    y_tied = np.round(y)
    assert metrics.spearman(x, y_tied) == pytest.approx(
        scipy.stats.spearmanr(x, y_tied).statistic, abs=1e-12
    )


def test_correlation_hand_values():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # Average ranks: x -> [1.5, 1.5, 3], y -> [1, 2, 3]; Pearson of those = sqrt(3)/2.
    assert metrics.spearman([5, 5, 7], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)
    assert math.isnan(metrics.pearson([1, 1, 1], [1, 2, 3]))
