"""Zero-shot all-MiniLM-L6-v2 on SciFact test equals the published / sentence-transformers figures.

Reference (../shared/data/README.md; sentence-transformers 6.2 + ir-measures): nDCG@10 0.6451,
Recall@100 0.9250, with title + " " + text documents and 256-token queries and documents
(the model's max_seq_length). The corpus is encoded once per module: 5,183 abstracts take
minutes on a 2-core CPU.
"""

import numpy as np
import pytest

from bixse_jax.data import sources
from bixse_jax.eval import evaluate, metrics


@pytest.fixture(scope="module")
def scifact_run(shared_data, minilm_path):
    queries, corpus, qrels = sources.read_beir_eval(shared_data / "scifact", "test")
    enc = evaluate.load_text_encoder(minilm_path, batch_size=64)
    assert (enc.query_max_len, enc.doc_max_len, enc.query_prefix) == (256, 256, "")
    assert (len(queries), len(corpus)) == (300, 5183)
    return evaluate.retrieve(enc, queries, corpus, top_k=100), qrels


def test_minilm_scifact_ndcg_and_recall_match_reference(scifact_run):
    run, qrels = scifact_run
    result = metrics.evaluate_run(run, qrels, ks=(10, 100))
    assert abs(result["ndcg@10"] - 0.6451) <= 0.001, result
    assert abs(result["recall@100"] - 0.9250) <= 0.001, result


def test_scifact_run_is_ranked_cosine(scifact_run):
    """Scores are cosines of unit vectors, and each query's 100 documents are distinct."""
    run, _ = scifact_run
    scores = np.array([s for docs in run.values() for s in docs.values()])
    assert len(run) == 300 and all(len(docs) == 100 for docs in run.values())
    assert scores.max() <= 1.0 + 1e-5 and scores.min() >= -1.0 - 1e-5
