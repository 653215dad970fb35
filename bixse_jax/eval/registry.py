"""Training's evaluators by kind: `config.evals.NAME.kind` -> a builder -> params -> metrics.

A builder reads and validates its data once (so a bad path fails before training writes anything)
and returns a function of the encoder's parameters that only encodes and scores, through the same
functions as `bixse-jax eval` (bixse_jax.eval.evaluate). Given the run's current (t, b) as well, the
evaluators of judged pairs (sts, rerank) also report the ECE and Brier score of its relevance
probabilities sigmoid(exp(t) cos + b), so every run's calibration is recorded with its ranking.

A builder is handed only the keys its kind reads (default_config.EVAL_KEYS), as big_vision hands
each evaluator its own arguments; a key of another kind moved from its default is refused, naming
it, instead of being ignored. A new kind is a function decorated with `@register("KIND")` here, plus
its keys in default_config.EVAL_KEYS.

Matryoshka: an evaluator with `dims` (or, without, in a run with `loss.matryoshka_dims`) also reports
each narrower prefix's metrics as `dimK/METRIC` (eval/NAME/dimK/METRIC in TensorBoard), the texts
encoded once for all prefixes (evaluate.per_dimension).

Cross-validation: with `data.folds`, a beir / rerank evaluator of the training data's own folder
and split scores only the held-out fold's queries; one of another split or folder (SciFact's test
split while folds of its train split are trained on) scores all of its queries.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import ml_collections

from bixse_jax import matryoshka
from bixse_jax.data import folds, sources
from bixse_jax.default_config import EVAL_KINDS, evaluator as schema_entry, evaluator_keys
from bixse_jax.errors import ConfigError, UserError
from bixse_jax.eval import evaluate, run_files
from bixse_jax.models.sentence_model import SentenceModel

Evaluator = Callable[..., dict[str, float]]  # (encoder params, logit_params=(t, b) or None) -> metrics
Builder = Callable[[ml_collections.ConfigDict, SentenceModel, ml_collections.ConfigDict], Evaluator]

BUILDERS: dict[str, Builder] = {}


def register(kind: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        BUILDERS[kind] = builder
        return builder
    return add


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """A built evaluator and when the training loop calls it."""

    evaluate: Evaluator
    every_steps: int  # also every N steps during training (0: only before and after)
    before_training: bool


def build_all(config: ml_collections.ConfigDict, model: SentenceModel) -> dict[str, Scheduled]:
    """{NAME: Scheduled} for every entry of `config.evals` whose kind is not 'none', in name order."""
    keys = set(schema_entry("none").keys())
    out = {}
    for name, entry in config.evals.items():
        where = f"evals.{name}"
        if not isinstance(entry, ml_collections.ConfigDict):
            raise ConfigError(f"{where} must be an evaluator entry (default_config.evaluator(KIND, ...)), "
                             f"not {entry!r}")
        missing, unknown = sorted(keys - set(entry.keys())), sorted(set(entry.keys()) - keys)
        if missing or unknown:
            raise ConfigError(f"{where}: keys {missing} are missing and {unknown} unknown; build entries with "
                             "default_config.evaluator(KIND, ...)")
        if entry.kind not in EVAL_KINDS:
            raise ConfigError(f"{where}.kind {entry.kind!r} is not one of {EVAL_KINDS}")
        if entry.kind == "none":
            continue
        if entry.every_steps < 0:
            raise ConfigError(f"{where}.every_steps must be >= 0 (0: only before and after training)")
        own = evaluator_keys(entry, where)  # its kind's keys only; another kind's key set is an error
        try:
            fn = BUILDERS[entry.kind](own, model, config)
        except ConfigError as e:  # data errors (DataError) name their file, line and field already
            raise ConfigError(f"{where} ({entry.kind}): {e}") from e
        out[name] = Scheduled(fn, int(entry.every_steps), bool(entry.before_training))
    return out


def text_encoder(entry: ml_collections.ConfigDict, model: SentenceModel,
                 config: ml_collections.ConfigDict) -> evaluate.TextEncoder:
    """The model encoding texts as training does: its lengths and query prefix."""
    return evaluate.TextEncoder(model.encoder, model.params, model.tokenizer,
                                query_max_len=config.data.query_max_len, doc_max_len=config.data.doc_max_len,
                                query_prefix=config.model.query_prefix, batch_size=entry.batch_size)


def dims(entry: ml_collections.ConfigDict, model: SentenceModel, config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The prefix sizes an evaluator also reports (`dimK/METRIC`): its own `dims`, else the loss's
    `matryoshka_dims`; () for the whole embedding alone."""
    chosen = tuple(entry.dims) or tuple(config.loss.matryoshka_dims)
    return matryoshka.resolve_dims(chosen, model.config.hidden_size, where="dims" if entry.dims else
                                   "loss.matryoshka_dims")


@register("sts")
def build_sts(entry, model, config) -> Evaluator:
    """Spearman and Pearson of cosine similarity on an STS Benchmark file (`path`)."""
    if not entry.path:
        raise ConfigError("needs path=STS_FILE")
    pairs = sources.read_sts(entry.path)
    enc, at = text_encoder(entry, model, config), dims(entry, model, config)
    return lambda params, logit_params=None: evaluate.per_dimension(
        lambda e: evaluate.evaluate_sts(e, pairs, logit_params), enc.with_params(params), at)


def _beir_data(entry, config):
    """(queries, corpus, qrels) of a BEIR folder's split, or of the demo's generated eval set."""
    if entry.kind == "demo":
        from bixse_jax.data.synthetic import make_demo_data
        demo = make_demo_data(seed=config.data.demo_seed)
        return demo.eval_queries, demo.eval_corpus, demo.eval_qrels
    if not entry.path:
        raise ConfigError("needs path=BEIR_FOLDER")
    queries, corpus, qrels = sources.read_beir_eval(entry.path, entry.split, skip_missing_docs=entry.skip_missing_docs)
    data = config.data
    if data.folds and data.kind == "beir" and _same_split(data, entry):
        held_out = folds.held_out_queries(data.path, data.split, data.folds, data.fold, data.fold_seed)
        queries = {q: t for q, t in queries.items() if q in held_out}
        qrels = {q: r for q, r in qrels.items() if q in held_out}
        if not qrels:
            raise UserError(f"{entry.path}: fold {data.fold} of {data.folds} has no judged queries")
    return queries, corpus, qrels


def _same_split(data: ml_collections.ConfigDict, entry: ml_collections.ConfigDict) -> bool:
    return data.split == entry.split and os.path.realpath(data.path) == os.path.realpath(entry.path)


@register("demo")
@register("beir")
def build_retrieval(entry, model, config) -> Evaluator:
    """nDCG@k, Recall@k, MRR@10 and MAP of exact retrieval over the whole corpus (demo: the generated one)."""
    queries, corpus, qrels = _beir_data(entry, config)
    enc, at = text_encoder(entry, model, config), dims(entry, model, config)
    ks = tuple(entry.ks)
    top_k = max(entry.top_k, *ks)
    return lambda params, logit_params=None: evaluate.per_dimension(  # unjudged pairs: no calibration
        lambda e: evaluate.evaluate_retrieval(e, queries, corpus, qrels, ks=ks, top_k=top_k)[0],
        enc.with_params(params), at)


@register("rerank")
def build_rerank(entry, model, config) -> Evaluator:
    """Re-ranking of each judged query's pool: `run_file` names a TREC run (its top `top_k`), or is
    'qrels' for the judged documents, as TREC-DL 2019 needs."""
    queries, corpus, qrels = _beir_data(entry, config)
    if entry.run_file == "qrels":
        pools = evaluate.judged_pool(qrels, corpus)  # judged documents with text; the qrels stay whole
    elif not entry.run_file:
        raise ConfigError("run_file must be 'qrels' (each query's judged pool) or a TREC run file")
    else:
        pools, _ = evaluate.run_pool(run_files.read_run(entry.run_file), corpus, depth=entry.top_k)
    enc, at = text_encoder(entry, model, config), dims(entry, model, config)
    ks = tuple(entry.ks)
    return lambda params, logit_params=None: evaluate.per_dimension(
        lambda e: evaluate.evaluate_rerank(e, queries, corpus, qrels, pools, ks=ks, logit_params=logit_params)[0],
        enc.with_params(params), at)
