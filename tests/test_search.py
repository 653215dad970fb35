"""Blocked exact top-k search, TREC run files, and our metrics against ir-measures (trec_eval)."""

import jax
import numpy as np
import pytest

from bixse_jax import parallel
from bixse_jax.data.sources import DataError
from bixse_jax.eval import metrics, run_files
from bixse_jax.eval.search import top_k_run, top_k_search


def _brute_force(q: np.ndarray, c: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, sorted by (score desc, corpus index asc)."""
    s = q.astype(np.float64) @ c.astype(np.float64).T
    idx = np.array([np.lexsort((np.arange(len(c)), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, axis=1), idx


def _integer_vectors(rng, n, dim=6):
    """Small integers: every dot product is exact in float32, and many are tied."""
    return rng.integers(-2, 3, size=(n, dim)).astype(np.float32)


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("k,query_block,corpus_block", [
    (5, 8, 16),      # several blocks of each
    (50, 8, 16),     # k larger than a corpus block (and than each device's slice of it)
    (500, 10, 64),   # k larger than the corpus: all documents, ranked
    (10, 1000, 10**6),  # one block of each
    (7, 3, 9),       # block sizes that do not divide anything
])
def test_top_k_equals_brute_force_with_ties(devices, k, query_block, corpus_block):
    rng = np.random.default_rng(k + query_block)
    q, c = _integer_vectors(rng, 37), _integer_vectors(rng, 203)
    mesh = parallel.make_mesh(devices)
    scores, ids = top_k_search(q, c, k, mesh=mesh, query_block=query_block, corpus_block=corpus_block)
    want_scores, want_ids = _brute_force(q, c, min(k, len(c)))
    assert scores.shape == ids.shape == (37, min(k, 203))
    assert len(np.unique(want_scores)) < want_scores.size / 3  # ties really occur
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(scores, want_scores.astype(np.float32))


def test_top_k_float_embeddings_and_run():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    c = rng.normal(size=(1000, 16)).astype(np.float32)
    scores, ids = top_k_search(q, c, 20, corpus_block=128, query_block=16)
    want_scores, want_ids = _brute_force(q, c, 20)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    run = top_k_run([f"q{i}" for i in range(50)], [f"d{j}" for j in range(1000)], scores, ids)
    assert len(run) == 50 and all(len(r) == 20 for r in run.values())
    assert run["q3"][f"d{want_ids[3, 0]}"] == pytest.approx(want_scores[3, 0], abs=1e-5)


def test_top_k_input_errors():
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match="expected"):
        top_k_search(x, np.zeros((3, 5), np.float32), 2)
    with pytest.raises(ValueError, match="k must be"):
        top_k_search(x, x, 0)
    assert top_k_search(np.zeros((0, 4), np.float32), x, 2)[0].shape == (0, 2)


def test_top_k_scores_stay_on_blocks():
    """Each device scores its own slice of a block: 16 x 32 here, never 16 x 256 or queries x corpus."""
    from bixse_jax.eval import search
    mesh = parallel.make_mesh(8)
    step = search._merge_step(mesh, 5, 5)
    spec = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct(shape, dtype)
    text = step.lower(spec(16, 8), spec(256, 8), spec(dtype=np.int32), spec(dtype=np.int32),
                      spec(16, 5), spec(16, 5, dtype=np.int32)).as_text()
    assert "16x32xf32" in text  # local scores
    assert "16x40xf32" in text  # 8 devices x 5 gathered candidates
    assert "16x256xf32" not in text


# ----------------------------------------------------------------------------
# TREC run files.
# ----------------------------------------------------------------------------


def test_run_file_round_trip_and_trec_order(tmp_path):
    run = {"q2": {"d1": 0.5, "d3": 0.5, "d2": 0.25}, "q1": {"d9": -1.0, "d8": 3.0}}
    path = run_files.write_run(tmp_path / "sub" / "run.trec", run, tag="mine")
    lines = path.read_text().splitlines()
    assert lines[0] == "q2 Q0 d3 1 0.5 mine"  # tie at 0.5: doc id descending, like trec_eval
    assert lines[1].split()[2:4] == ["d1", "2"]
    assert [line.split()[0] for line in lines] == ["q2"] * 3 + ["q1"] * 2
    assert run_files.read_run(path) == run
    scores = {"a": np.float32(0.1234567).item()}
    run_files.write_run(tmp_path / "p.trec", {"q": scores})
    assert run_files.read_run(tmp_path / "p.trec")["q"]["a"] == scores["a"]  # full precision


@pytest.mark.parametrize("line,match", [
    ("q1 Q0 d1 1 0.5", r"bad.trec:2: expected 6 fields"),
    ("q1 Q0 d1 1 high run", r'bad.trec:2: field "score": must be a number'),
    ("q1 Q0 d1 first 0.5 run", r'bad.trec:2: field "rank": must be an integer'),
    ("q1 Q0 d1 1 nan run", r'bad.trec:2: field "score": must be finite'),
    ("q0 Q0 d0 2 0.1 run", r'bad.trec:2: field "doc-id": .*twice'),
])
def test_run_file_errors_name_file_and_line(tmp_path, line, match):
    path = tmp_path / "bad.trec"
    path.write_text("q0 Q0 d0 1 0.9 run\n" + line + "\n")
    with pytest.raises(DataError, match=match):
        run_files.read_run(path)


def test_run_file_empty_and_missing(tmp_path):
    (tmp_path / "empty.trec").write_text("\n")
    with pytest.raises(DataError, match="no run lines"):
        run_files.read_run(tmp_path / "empty.trec")
    with pytest.raises(DataError, match="file not found"):
        run_files.read_run(tmp_path / "nope.trec")
    with pytest.raises(ValueError, match="without spaces"):
        run_files.write_run(tmp_path / "x.trec", {"q 1": {"d": 1.0}})


# ----------------------------------------------------------------------------
# Metrics against ir-measures (pytrec_eval, i.e. trec_eval's C code).
# ----------------------------------------------------------------------------


def _random_graded(seed: int, n_queries: int = 150):
    """Graded qrels (0-3, each query with a relevant doc) and a run with many tied scores."""
    rng = np.random.default_rng(seed)
    docs = [f"d{j:03d}" for j in range(400)]
    qrels, run = {}, {}
    for i in range(n_queries):
        qid = f"q{i}"
        judged = rng.choice(docs, size=int(rng.integers(1, 30)), replace=False)
        grades = rng.integers(0, 4, size=len(judged))
        grades[0] = max(grades[0], 1)
        qrels[qid] = {d: int(g) for d, g in zip(judged, grades)}
        retrieved = rng.choice(docs, size=int(rng.integers(50, 200)), replace=False)
        retrieved = np.union1d(retrieved, rng.choice(judged, size=len(judged) // 2, replace=False))
        # Scores from a coarse grid: many ties, which trec_eval breaks by doc id descending.
        run[qid] = {d: float(rng.integers(0, 20)) / 4 for d in retrieved}
    return qrels, run


def test_metrics_equal_ir_measures_on_random_graded_run():
    import ir_measures
    from ir_measures import AP, RR, R, nDCG

    qrels, run = _random_graded(0)
    run.pop("q7")  # a judged query the run misses counts 0 in both
    qrels["q8"] = dict.fromkeys(qrels["q8"], 0)  # so does one with nothing relevant (trec_eval)
    qrels["q9"] = {d: min(g, 1) for d, g in qrels["q9"].items()}  # only grade 1: relevant, gain 1
    measures = [nDCG @ 10, nDCG @ 100, R @ 100, AP]
    theirs = ir_measures.calc_aggregate(measures, qrels, run)
    ours = metrics.evaluate_run(run, qrels, ks=(10, 100))
    assert ours["ndcg@10"] == pytest.approx(theirs[nDCG @ 10], abs=1e-9)
    assert ours["ndcg@100"] == pytest.approx(theirs[nDCG @ 100], abs=1e-9)
    assert ours["recall@100"] == pytest.approx(theirs[R @ 100], abs=1e-9)
    # ir-measures computes RR@10 with MS MARCO's script, which breaks ties by doc id *ascending*;
    # trec_eval (and we) break them descending. Full-depth RR comes from trec_eval itself:
    rr_full = ir_measures.calc_aggregate([RR], qrels, run)[RR]
    assert rr_full > 0 and metrics.mrr_at_k(run, qrels, 10**6) == pytest.approx(rr_full, abs=1e-9)
    # ... and on a tie-free run both cut-off conventions agree.
    distinct = {q: {d: s + int(d[1:]) * 1e-6 for d, s in docs.items()} for q, docs in run.items()}
    assert metrics.mrr_at_k(distinct, qrels, 10) == pytest.approx(
        ir_measures.calc_aggregate([RR @ 10], qrels, distinct)[RR @ 10], abs=1e-9)
    assert ours["map"] == pytest.approx(theirs[AP], abs=1e-9)
    # Per query too, so errors cannot cancel out in the mean.
    per_query = {(m.query_id, str(m.measure)): m.value for m in ir_measures.iter_calc([nDCG @ 10, AP], qrels, run)}
    for qid in list(qrels)[:40]:
        one = {qid: run.get(qid, {})}
        assert metrics.ndcg_at_k(one, {qid: qrels[qid]}, 10) == pytest.approx(per_query[(qid, "nDCG@10")], abs=1e-9)
        assert metrics.average_precision(one, {qid: qrels[qid]}) == pytest.approx(per_query[(qid, "AP")], abs=1e-9)
