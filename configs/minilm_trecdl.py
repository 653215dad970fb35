"""all-MiniLM-L6-v2 + BiXSE on TREC-DL 2019 human grades 0-3 (rescaled to g/3).

  bixse-jax train --config configs/minilm_trecdl.py --workdir /tmp/bixse-trecdl \
      --config.data_dir=../shared/data/trec-dl19

TREC-DL 2019 has only 43 judged queries and one split, so this config trains on all of them;
held-out evaluation (5-fold cross-validation by query, graded re-ranking of the judged pool)
belongs to the evaluation tooling. Judged passages without text in corpus.jsonl are skipped.
Each query appears with many graded passages, so duplicate query ids fill the target matrix.
"""

from bixse_jax.default_config import base_config, evaluator


def get_config():
    c = base_config()
    c.data_dir = "../shared/data/trec-dl19"
    c.data.kind = "beir"
    c.data.path = c.get_ref("data_dir")
    c.data.split = "test"
    c.data.max_grade = 3.0
    c.data.skip_missing_docs = True
    c.data.query_max_len = 32
    c.data.doc_max_len = 192
    c.train.global_batch_size = 32
    c.train.num_steps = 240  # about 2 epochs of 3,834 judged pairs with text
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 24
    c.evals.test = evaluator("none")  # experiments/reproduce.py makes it a held-out re-ranking
    return c
