"""Hard-negative mining (`bixse-jax mine --num-negatives`): every mined negative meets every filter.

The filters are checked against an independent computation: the real MiniLM's embeddings of a
SciFact subset, ranked here with numpy; the selection rules (teacher scores, random sampling) on
small arrays whose answer is known.
"""

import json

import numpy as np
import pytest
import tiny_data

import bixse_jax
from bixse_jax import cli, experiment
from bixse_jax.commands import mine as mine_cmd
from bixse_jax.data import sources
from bixse_jax.default_config import base_config
from bixse_jax.eval import mining

MAX_LEN = 64  # SciFact abstracts cut short: the filters, not the model, are under test


@pytest.fixture(scope="module")
def scifact_subset(shared_data, tmp_path_factory):
    """20 SciFact train queries, their positives and 160 other abstracts, as a BEIR folder."""
    return tiny_data.scifact_subset(shared_data / "scifact", tmp_path_factory.mktemp("scifact_subset"), "train", 20, 160)


@pytest.fixture(scope="module")
def reference(scifact_subset, minilm_path):
    """(query ids, doc ids, cosine matrix, positives) computed here, apart from the command."""
    queries, corpus, qrels = sources.read_beir_eval(scifact_subset, "train")
    model = bixse_jax.load_encoder(minilm_path)
    qids, dids = list(queries), list(corpus)
    q = bixse_jax.encode(model, [queries[i] for i in qids], query=True, max_len=MAX_LEN)
    d = bixse_jax.encode(model, [corpus[i] for i in dids], max_len=MAX_LEN)
    return qids, dids, q @ d.T, {k: {d for d, g in v.items() if g > 0} for k, v in qrels.items()}


def _mine(capsys, folder, minilm_path, out, *flags) -> dict:
    mine_cmd.main(["bixse-jax mine", "--model", str(minilm_path), "--beir", str(folder), "--max-len", str(MAX_LEN),
                   "--matmul-dtype", "float32", "--out", str(out), *flags])  # against float32 reference scores
    text = capsys.readouterr().out
    return json.loads(text[text.index("{"):])


def test_every_mined_negative_meets_the_filters(scifact_subset, reference, minilm_path, tmp_path, capsys):
    qids, dids, cos, positives = reference
    out = tmp_path / "mined.jsonl"
    info = _mine(capsys, scifact_subset, minilm_path, out, "--num-negatives", "4", "--range-min", "2",
                 "--range-max", "40", "--max-score", "0.55", "--absolute-margin", "0.02", "--relative-margin", "0.1")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    negatives = [r for r in rows if r["kind"] == "negative"]
    assert info["negatives"] == len(negatives) > 20 and info["queries"] == 20
    assert info["skipped_max_score"] + info["skipped_relative_margin"] + info["skipped_absolute_margin"] > 0
    col = {d: j for j, d in enumerate(dids)}
    for r in negatives:
        i = qids.index(r["query_id"])
        s = cos[i, col[r["doc_id"]]]
        assert r["doc_id"] not in positives[r["query_id"]]
        assert abs(r["retrieval_score"] - s) < 1e-4
        others = np.array([cos[i, j] for j in range(len(dids)) if dids[j] not in positives[r["query_id"]]])
        # The model's rank among the documents that are not the query's positives (ties within float noise).
        assert 1 + np.sum(others > s + 1e-5) <= r["rank"] <= 1 + np.sum(others > s - 1e-5)
        assert 2 < r["rank"] <= 40 and s <= 0.55 + 1e-5
        p = min(cos[i, col[d]] for d in positives[r["query_id"]])
        assert abs(r["positive_score"] - p) < 1e-4
        assert s <= p - 0.02 + 1e-5 and s <= p - abs(p) * 0.1 + 1e-5
        assert r["score"] == 0.0
    for qid in qids:  # top sampling: each query's best survivors, best first, at most 4
        mine = [r["retrieval_score"] for r in negatives if r["query_id"] == qid]
        assert mine == sorted(mine, reverse=True) and len(mine) <= 4
    # Positives carry grade / top grade; train reads the file as it is.
    assert {r["score"] for r in rows if r["kind"] == "positive"} == {1.0}
    data = base_config().data
    data.kind, data.path = "jsonl", str(out)
    assert len(experiment.load_train_pairs(data)) == len(rows)


def test_teacher_scores_random_sampling_and_a_beir_folder(scifact_subset, reference, minilm_path, tmp_path, capsys):
    qids, dids, cos, positives = reference
    rng = np.random.default_rng(0)
    teacher = {(q, d): float(rng.uniform()) for q in qids for j, d in enumerate(dids) if j % 3}  # a third unscored
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps({"query_id": q, "doc_id": d, "score": s}) + "\n" for (q, d), s in teacher.items()))
    out = tmp_path / "mined_beir"
    info = _mine(capsys, scifact_subset, minilm_path, out, "--num-negatives", "3", "--range-max", "60",
                 "--max-score", "0.9", "--absolute-margin", "0.05", "--sampling", "random", "--seed", "1",
                 "--teacher-scores", str(path), "--format", "beir")
    assert info["skipped_no_teacher_score"] > 0
    qrels = [line.split("\t") for line in (out / "qrels" / "train.tsv").read_text().splitlines()[1:]]
    negatives = [(q, d) for q, d, g in qrels if g == "0"]
    assert len(negatives) == info["negatives"] > 20
    for q, d in negatives:
        assert d not in positives[q] and (q, d) in teacher  # never an unscored pair
        scored = [teacher[(q, p)] for p in positives[q] if (q, p) in teacher]  # no margin without one
        assert scored and teacher[(q, d)] <= 0.9 and teacher[(q, d)] <= min(scored) - 0.05
    data = base_config().data
    data.kind, data.path, data.split = "beir", str(out), "train"
    pairs = experiment.load_train_pairs(data)
    assert len(pairs) == len(qrels) and sum(p.grade == 0.0 for p in pairs) == len(negatives)


def _toy():
    """One query; documents d0..d5 ranked by the model 0.9 .. 0.4; d1 is its positive (0.8)."""
    dids = [f"d{j}" for j in range(6)]
    ranked = np.arange(6)[None, :]
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    return dids, ranked, scores, {"q": {"d1": 1.0}}, {"q": {"d1": 0.8}}


def test_window_and_margins_on_known_scores():
    dids, ranked, scores, pos, pos_scores = _toy()
    f = mining.Filters(num_negatives=5, range_max=5)
    got, _ = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f)
    assert [(n.doc_id, n.rank) for n in got["q"]] == [("d0", 1), ("d2", 2), ("d3", 3), ("d4", 4), ("d5", 5)]
    f = mining.Filters(num_negatives=2, range_min=1, range_max=5, absolute_margin=0.15)
    got, counts = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f)
    assert [n.doc_id for n in got["q"]] == ["d3", "d4"]  # d0 by range, d2 (0.7 > 0.8 - 0.15) by margin
    assert (counts["skipped_range"], counts["skipped_absolute_margin"]) == (1, 1)
    f = mining.Filters(num_negatives=3, range_max=5, relative_margin=0.2, min_score=0.45)
    got, _ = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f)
    assert [n.doc_id for n in got["q"]] == ["d3", "d4"]  # <= 0.8 - 0.16 and >= 0.45


def test_teacher_scores_reorder_and_random_samples_the_survivors_only():
    dids, ranked, scores, pos, pos_scores = _toy()
    teacher = {"q": {"d0": 0.1, "d1": 0.6, "d2": 0.5, "d3": 0.2, "d5": 0.55}}  # d4 unscored
    f = mining.Filters(num_negatives=2, range_max=5)
    got, counts = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f, teacher)
    assert [(n.doc_id, n.score, n.rank) for n in got["q"]] == [("d5", 0.55, 5), ("d2", 0.5, 2)]
    assert counts["skipped_no_teacher_score"] == 1
    f = mining.Filters(num_negatives=2, range_max=5, absolute_margin=0.1)  # teacher's positive 0.6: s <= 0.5
    got, _ = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f, teacher)
    assert [n.doc_id for n in got["q"]] == ["d2", "d3"]
    picks = set()
    for seed in range(20):
        f = mining.Filters(num_negatives=2, range_max=5, sampling="random", seed=seed)
        got, _ = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f)
        chosen = [n.doc_id for n in got["q"]]
        assert len(set(chosen)) == 2 and set(chosen) <= {"d0", "d2", "d3", "d4", "d5"}
        assert [n.score for n in got["q"]] == sorted((n.score for n in got["q"]), reverse=True)
        picks |= set(chosen)
    assert len(picks) > 2  # not always the top two
    again, _ = mining.mine(["q"], dids, ranked, scores, pos, pos_scores, f)
    assert [n.doc_id for n in again["q"]] == chosen  # seeded


def test_teacher_files_and_bad_input_name_file_and_line(tmp_path, capsys):
    run = tmp_path / "ce.trec"
    run.write_text("q1 Q0 d1 1 3.5 ce\nq1 Q0 d2 2 -1.25 ce\n")
    assert mining.read_teacher_scores(run) == {"q1": {"d1": 3.5, "d2": -1.25}}
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"query_id": "q1", "doc_id": "d1", "score": 0.5}\n{"query_id": "q1", "doc_id": "d2"}\n')
    with pytest.raises(sources.DataError, match=r't.jsonl:2: field "score": missing'):
        mining.read_teacher_scores(bad)
    run.write_text("q1 Q0 d1 1 x ce\n")
    with pytest.raises(sources.DataError, match=r'ce.trec:1: field "score": not a number'):
        mining.read_teacher_scores(run)
    with pytest.raises(ValueError, match="leave fewer than num_negatives = 5"):
        mining.Filters(num_negatives=5, range_min=3, range_max=6).check()
    with pytest.raises(SystemExit) as e:
        cli.main(["bixse-jax", "mine", "--model", "m", "--beir", "b", "--num-negatives", "2", "--k", "3", "--out", "o"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a filter would be silently ignored by the unfiltered --k
        cli.main(["bixse-jax", "mine", "--model", "m", "--beir", "b", "--k", "3", "--max-score", "0.5", "--out", "o"])
    assert e.value.code == 2 and "go with --num-negatives, not --k" in capsys.readouterr().err
    # range_max defaults as sentence-transformers': the negatives, ten times over with a score filter.
    assert mining.Filters(num_negatives=3).window() == 3
    assert mining.Filters(num_negatives=3, range_min=2, max_score=0.9).window() == 32
