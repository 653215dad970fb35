"""all-MiniLM-L6-v2 + BiXSE on STS Benchmark train (grades score/5), Spearman on STS-B test.

  bixse-jax train --config configs/minilm_stsb.py --workdir /tmp/bixse-stsb \
      --config.data_dir=../shared/data/stsbenchmark

Symmetric sentence pairs: both sides are "queries" of 64 tokens; no instruction prefix.
"""

from bixse_jax.default_config import base_config, evaluator


def get_config():
    c = base_config()
    c.data_dir = "../shared/data/stsbenchmark"
    c.data.kind = "sts"
    c.data.path = c.get_ref("data_dir") + "/sts-train.csv"
    c.data.query_max_len = 64
    c.data.doc_max_len = 64
    c.train.global_batch_size = 32
    c.train.num_steps = 720  # 4 epochs of 5,749 pairs
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 72
    c.train.checkpoint_every = 180
    c.evals.test = evaluator("sts", path=c.get_ref("data_dir") + "/sts-test.csv", every_steps=180)
    return c
