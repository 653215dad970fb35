"""all-MiniLM-L6-v2 + BiXSE on SciFact train qrels (binary grades), nDCG@10 on SciFact test.

  bixse-jax train --config configs/minilm_scifact.py --workdir /tmp/bixse-scifact \
      --config.data_dir=../shared/data/scifact
"""

from bixse_jax.default_config import base_config, evaluator


def get_config():
    c = base_config()
    c.data_dir = "../shared/data/scifact"
    c.data.kind = "beir"
    c.data.path = c.get_ref("data_dir")
    c.data.split = "train"
    c.data.query_max_len = 64
    c.data.doc_max_len = 256
    c.train.global_batch_size = 32
    c.train.num_steps = 290  # about 10 epochs of 919 pairs
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 29
    c.train.checkpoint_every = 100
    c.evals.test = evaluator("beir", path=c.get_ref("data_dir"), split="test", every_steps=100)
    return c
