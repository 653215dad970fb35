"""The generated demo world: deterministic, graded, and with a held-out eval."""

import collections
import re

import pytest

from bixse_jax.data.synthetic import make_demo_data

_NAME = re.compile(r"^(?:The |A )?([A-Z][a-z]+)\b")


@pytest.fixture(scope="module")
def demo():
    return make_demo_data(seed=0)


def test_deterministic_from_seed(demo):
    assert make_demo_data(seed=0) == demo
    other = make_demo_data(seed=1)
    assert other.train != demo.train and other.eval_queries != demo.eval_queries


def test_sizes(demo):
    assert 3800 <= len(demo.train) <= 4300  # ~125 steps of batch 32.
    assert len({p.query_id for p in demo.train}) == 1150
    assert len(demo.eval_queries) == 80 and len(demo.eval_corpus) == 300
    small = make_demo_data(seed=3, num_train_queries=20, num_eval_queries=5)
    assert len({p.query_id for p in small.train}) == 20 and len(small.eval_queries) == 5


def test_train_grades_are_graded_and_ids_consistent(demo):
    grades = collections.Counter(round(p.grade * 3) for p in demo.train)
    assert set(grades) == {0, 1, 2, 3}
    assert grades[3] == 1150 and grades[2] > 1000 and grades[1] > 1000 and grades[0] > 300
    assert all(p.grade in (0.0, 1 / 3, 2 / 3, 1.0) for p in demo.train)
    text_of_query, text_of_doc = {}, {}
    for p in demo.train:
        assert text_of_query.setdefault(p.query_id, p.query) == p.query
        assert text_of_doc.setdefault(p.doc_id, p.document) == p.document
    # Ids identify texts one-to-one, so repeated queries/documents are recognised.
    assert len(set(text_of_query.values())) == len(text_of_query)
    assert len(set(text_of_doc.values())) == len(text_of_doc)
    per_query = collections.Counter(p.query_id for p in demo.train)
    assert min(per_query.values()) >= 3


def test_eval_is_fully_judged_with_a_perfect_match(demo):
    assert set(demo.eval_qrels) == set(demo.eval_queries)
    for qrels in demo.eval_qrels.values():
        assert set(qrels) == set(demo.eval_corpus)
        assert set(qrels.values()) <= {0.0, 1.0, 2.0, 3.0}
        assert 3.0 in qrels.values()
    counts = collections.Counter(g for q in demo.eval_qrels.values() for g in q.values())
    assert counts[2.0] > 80 and counts[1.0] > counts[2.0]  # Graded, not binary.


def test_train_and_eval_are_disjoint(demo):
    train_docs = {p.doc_id: p.document for p in demo.train}
    assert not set(train_docs) & set(demo.eval_corpus)
    assert not set(train_docs.values()) & set(demo.eval_corpus.values())
    assert not {p.query for p in demo.train} & set(demo.eval_queries.values())
    train_names = {_NAME.match(t).group(1) for t in train_docs.values()}
    eval_names = {_NAME.match(t).group(1) for t in demo.eval_corpus.values()}
    assert len(eval_names) == 300 and not train_names & eval_names


def test_texts_nonempty_and_short(demo, minilm_path):
    from bixse_jax.data.tokenizer import Tokenizer
    texts = ([p.query for p in demo.train] + [p.document for p in demo.train]
             + list(demo.eval_queries.values()) + list(demo.eval_corpus.values()))
    assert all(t.strip() for t in texts)
    lengths = [len(ids) for ids in Tokenizer.from_model_dir(minilm_path).encode(texts, 128)]
    assert max(lengths) < 40
