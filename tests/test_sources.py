"""Readers: happy paths, every validation error (file, line, field), and the real data."""

import json
import pathlib
import time

import pytest

from bixse_jax.data import sources
from bixse_jax.data.sources import DataError, GradedPair


def _write(path: pathlib.Path, lines: list[str]) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl(path: pathlib.Path, records: list[dict]) -> pathlib.Path:
    return _write(path, [json.dumps(r) for r in records])


# ---------------------------------------------------------------------------
# JSONL pairs.
# ---------------------------------------------------------------------------


def test_jsonl_pairs_defaults_ids_to_text_and_skips_blank_lines(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [
        json.dumps({"query": "q1", "document": "d1", "score": 1}),
        "",
        "   ",
        json.dumps({"query": "q1", "document": "d2", "score": 0.25, "query_id": 7,
                    "doc_id": "D2", "instruction": "Represent: "}),
    ])
    pairs = sources.read_jsonl_pairs(path)
    assert pairs == [
        GradedPair("q1", "d1", 1.0, query_id="q1", doc_id="d1"),
        GradedPair("q1", "d2", 0.25, query_id="7", doc_id="D2", instruction="Represent: "),
    ]


@pytest.mark.parametrize("line, field, fragment", [
    ('{"query": "q", "document": "d", "score": 1.3}', "score", "must be in [0, 1], got 1.3"),
    ('{"query": "q", "document": "d", "score": -0.1}', "score", "must be in [0, 1]"),
    ('{"query": "q", "document": "d", "score": NaN}', "score", "must be finite"),
    ('{"query": "q", "document": "d", "score": Infinity}', "score", "must be finite"),
    ('{"query": "q", "document": "d", "score": "0.5"}', "score", "must be a number"),
    ('{"query": "q", "document": "d", "score": true}', "score", "must be a number"),
    ('{"query": "q", "document": "d"}', "score", "missing"),
    ('{"document": "d", "score": 0.5}', "query", "missing"),
    ('{"query": 3, "document": "d", "score": 0.5}', "query", "must be a string"),
    ('{"query": "q", "document": "  \\t", "score": 0.5}', "document", "empty"),
    ('{"query": "", "document": "d", "score": 0.5}', "query", "empty"),
    ('{"query": "q", "document": "d", "score": 0.5, "doc_id": null}', "doc_id", "null"),
    ('{"query": "q", "document": "d", "score": 0.5', None, "malformed JSON"),
    ('["q", "d", 0.5]', None, "expected a JSON object"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, line, field, fragment):
    good = json.dumps({"query": "q", "document": "d", "score": 0.5})
    path = _write(tmp_path / "pairs.jsonl", [good, "", line])
    with pytest.raises(DataError) as info:
        sources.read_jsonl_pairs(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), 3, field)
    assert str(err).startswith(f"{path}:3: ")
    assert fragment in str(err)


def test_error_message_format(tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"query": "q", "document": "d", "score": 1.3}'])
    with pytest.raises(DataError) as info:
        sources.read_jsonl_pairs(path)
    assert str(info.value) == f'{path}:1: field "score": must be in [0, 1], got 1.3'


def test_jsonl_empty_or_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="contains no pairs"):
        sources.read_jsonl_pairs(_write(tmp_path / "empty.jsonl", ["", " "]))
    with pytest.raises(DataError, match="file not found"):
        sources.read_jsonl_pairs(tmp_path / "absent.jsonl")


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"query": "q", "document": "d", "score": 0}\n{"query": "\xff"}\n')
    with pytest.raises(DataError, match=r":2: not valid UTF-8"):
        sources.read_jsonl_pairs(path)


# ---------------------------------------------------------------------------
# BEIR.
# ---------------------------------------------------------------------------


def _beir(folder: pathlib.Path, qrels: list[str], split: str = "train") -> pathlib.Path:
    _jsonl(folder / "corpus.jsonl", [
        {"_id": "d1", "title": "Title one", "text": "text one"},
        {"_id": "d2", "title": "", "text": "text two"},
        {"_id": "d3", "text": "text three"},
    ])
    _jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "query one"},
                                      {"_id": "q2", "text": "query two"},
                                      {"_id": "q3", "text": "never judged"}])
    _write(folder / "qrels" / f"{split}.tsv", ["query-id\tcorpus-id\tscore", *qrels])
    return folder


def test_beir_maps_grades_by_max_grade_in_file(tmp_path):
    folder = _beir(tmp_path, ["q1\td1\t3", "q1\td2\t0", "q2\td3\t1"])
    pairs = sources.read_beir(folder)
    assert [(p.query_id, p.doc_id, p.grade) for p in pairs] == [
        ("q1", "d1", 1.0), ("q1", "d2", 0.0), ("q2", "d3", pytest.approx(1 / 3))]
    assert pairs[0].document == "Title one text one"
    assert pairs[1].document == "text two"  # Empty title adds no space.
    assert pairs[0].query == "query one"


def test_beir_max_grade_grade_map_and_keep_zero(tmp_path):
    folder = _beir(tmp_path, ["q1\td1\t2", "q1\td2\t0", "q2\td3\t1"])
    assert [p.grade for p in sources.read_beir(folder, max_grade=4)] == [0.5, 0.0, 0.25]
    mapped = sources.read_beir(folder, grade_map={0: 0.1, 1: 0.6, 2: 0.9})
    assert [p.grade for p in mapped] == [0.9, 0.1, 0.6]
    assert [p.doc_id for p in sources.read_beir(folder, keep_zero=False)] == ["d1", "d3"]
    with pytest.raises(DataError, match=r"train.tsv:2: field \"score\": grade 2 exceeds"):
        sources.read_beir(folder, max_grade=1)
    with pytest.raises(DataError, match=r"train.tsv:4: field \"score\": grade 1 is not in"):
        sources.read_beir(folder, grade_map={0: 0.0, 2: 1.0})


@pytest.mark.parametrize("row, line, field, fragment", [
    ("q1\td1\t-1", 3, "score", "must be >= 0"),
    ("q1\td1\tabc", 3, "score", "must be a number"),
    ("q1\td1\tnan", 3, "score", "must be finite"),
    ("q9\td1\t1", 3, "query-id", "'q9' is not in queries.jsonl"),
    ("q1\td9\t1", 3, "corpus-id", "'d9' is not in corpus.jsonl"),
    ("q1\td1", 3, None, "expected 3 tab-separated fields"),
])
def test_beir_qrels_errors(tmp_path, row, line, field, fragment):
    folder = _beir(tmp_path, ["q1\td2\t1", row])
    with pytest.raises(DataError) as info:
        sources.read_beir(folder)
    err = info.value
    assert (pathlib.Path(err.path).name, err.line, err.field) == ("train.tsv", line, field)
    assert fragment in str(err)


def test_beir_corpus_errors(tmp_path):
    folder = _beir(tmp_path, ["q1\td1\t1"])
    _jsonl(folder / "corpus.jsonl", [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    with pytest.raises(DataError, match=r'corpus.jsonl:2: field "_id": duplicate'):
        sources.read_beir(folder)
    _jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": " ", "text": ""}])
    with pytest.raises(DataError, match=r"corpus.jsonl:1: .*both empty"):
        sources.read_beir(folder)
    _jsonl(folder / "corpus.jsonl", [{"_id": "d1", "title": "t"}])
    with pytest.raises(DataError, match=r'corpus.jsonl:1: field "text": missing'):
        sources.read_beir(folder)


def test_beir_skip_missing_docs(tmp_path):
    folder = _beir(tmp_path, ["q1\td1\t1", "q1\td9\t2", "q2\td8\t1"])
    with pytest.raises(DataError, match="skip_missing_docs"):
        sources.read_beir(folder)
    pairs = sources.read_beir(folder, skip_missing_docs=True)
    # max_grade is the file's (2), skipped judgments included.
    assert [(p.doc_id, p.grade) for p in pairs] == [("d1", 0.5)]
    queries, corpus, qrels = sources.read_beir_eval(folder, "train", skip_missing_docs=True)
    assert qrels == {"q1": {"d1": 1.0}} and list(queries) == ["q1"]
    assert len(corpus) == 3
    # For evaluation the qrels stay as given by default (trec_eval's convention).
    queries, corpus, qrels = sources.read_beir_eval(folder, "train")
    assert qrels == {"q1": {"d1": 1.0, "d9": 2.0}, "q2": {"d8": 1.0}} and list(queries) == ["q1", "q2"]
    assert sources.judged_without_text(qrels, corpus) == 2
    assert sources.judged_with_text(qrels, corpus) == {"q1": {"d1": 1.0}}
    # ... unless no judged document has text at all: a corpus from elsewhere, most likely.
    folder = _beir(tmp_path / "other", ["q1	d9	1", "q2	d8	0"])
    for skip in (False, True):
        with pytest.raises(DataError, match="none of its judged documents is in corpus.jsonl"):
            sources.read_beir_eval(folder, "train", skip_missing_docs=skip)


def test_beir_unknown_split_lists_available(tmp_path):
    folder = _beir(tmp_path, ["q1\td1\t1"], split="test")
    with pytest.raises(DataError, match=r"unknown split 'train'; available splits: \['test'\]"):
        sources.read_beir(folder)


def test_beir_eval_keeps_raw_grades_and_judged_queries(tmp_path):
    folder = _beir(tmp_path, ["q1\td1\t3", "q1\td2\t0", "q2\td3\t1"], split="test")
    queries, corpus, qrels = sources.read_beir_eval(folder, "test")
    assert queries == {"q1": "query one", "q2": "query two"}  # q3 is never judged.
    assert corpus == {"d1": "Title one text one", "d2": "text two", "d3": "text three"}
    assert qrels == {"q1": {"d1": 3.0, "d2": 0.0}, "q2": {"d3": 1.0}}


# ---------------------------------------------------------------------------
# STS.
# ---------------------------------------------------------------------------


def test_sts_uses_fields_5_6_7_and_literal_quotes(tmp_path):
    path = _write(tmp_path / "sts.csv", [
        "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane.\tAn air plane.",
        'main-news\theadlines\t2013\t0002\t1.5\tHe said "hi\tShe said "bye"\tsrc\tsrc2',
    ])
    pairs = sources.read_sts(path)
    assert pairs == [
        GradedPair("A plane.", "An air plane.", 1.0, "A plane.", "An air plane."),
        GradedPair('He said "hi', 'She said "bye"', 0.3, 'He said "hi', 'She said "bye"'),
    ]


@pytest.mark.parametrize("row, field, fragment", [
    ("a\tb\tc\td\t5.0\tx", None, "expected 7 or 9 tab-separated fields, got 6"),
    ("a\tb\tc\td\t5.5\tx\ty", "score (5)", "must be in [0, 5]"),
    ("a\tb\tc\td\tfive\tx\ty", "score (5)", "must be a number"),
    ("a\tb\tc\td\t1.0\t \ty", "sentence1 (6)", "empty"),
    ("a\tb\tc\td\t1.0\tx\t", "sentence2 (7)", "empty"),
])
def test_sts_errors(tmp_path, row, field, fragment):
    path = _write(tmp_path / "sts.csv", ["a\tb\tc\td\t1.0\tx\ty", row])
    with pytest.raises(DataError) as info:
        sources.read_sts(path)
    assert (info.value.line, info.value.field) == (2, field)
    assert fragment in str(info.value)


def test_load_pairs_dispatches_and_rejects_unknown_kind(tmp_path):
    path = _write(tmp_path / "sts.csv", ["a\tb\tc\td\t2.5\tx\ty"])
    assert sources.load_pairs("sts", str(path))[0].grade == 0.5
    folder = _beir(tmp_path / "beir", ["q1\td1\t2", "q1\td2\t1"])
    assert [p.grade for p in sources.load_pairs("beir", str(folder), max_grade=4)] == [0.5, 0.25]
    known = r"unknown data kind 'csv'; known kinds: \['beir', 'jsonl', 'sts'\]"
    with pytest.raises(ValueError, match=known):
        sources.load_pairs("csv", str(path))


# ---------------------------------------------------------------------------
# Real data.
# ---------------------------------------------------------------------------


def test_real_data_reads_quickly_and_matches_published_counts(shared_data):
    start = time.perf_counter()
    scifact_train = sources.read_beir(shared_data / "scifact", "train")
    queries, corpus, qrels = sources.read_beir_eval(shared_data / "scifact", "test")
    trec = sources.read_beir(shared_data / "trec-dl19", "test", skip_missing_docs=True)
    trec_eval = sources.read_beir_eval(shared_data / "trec-dl19", "test", skip_missing_docs=True)
    sts = {s: sources.read_sts(shared_data / "stsbenchmark" / f"sts-{s}.csv")
           for s in ("train", "dev", "test")}
    elapsed = time.perf_counter() - start

    assert len(scifact_train) == 919 and {p.grade for p in scifact_train} == {1.0}
    assert (len(queries), len(corpus), sum(map(len, qrels.values()))) == (300, 5183, 339)
    assert len(trec) == 3834
    assert {round(p.grade * 3) for p in trec} == {0, 1, 2, 3}
    assert len(trec_eval[0]) == 43 and set(trec_eval[0]) == set(trec_eval[2])
    _, trec_corpus, trec_qrels = sources.read_beir_eval(shared_data / "trec-dl19", "test")  # as given
    assert sum(map(len, trec_qrels.values())) == 9260 and len(trec_qrels) == 43
    assert sources.judged_without_text(trec_qrels, trec_corpus) == 9260 - 3834
    assert {s: len(p) for s, p in sts.items()} == {"train": 5749, "dev": 1500, "test": 1379}
    assert all(0.0 <= p.grade <= 1.0 for p in sts["train"])
    assert elapsed < 10.0, f"reading the real data took {elapsed:.1f} s"


def test_real_trec_dl_without_skip_names_the_missing_passage(shared_data):
    with pytest.raises(DataError) as info:
        sources.read_beir(shared_data / "trec-dl19", "test")
    assert info.value.field == "corpus-id" and info.value.path.endswith("qrels/test.tsv")
