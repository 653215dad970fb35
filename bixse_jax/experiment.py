"""Config -> the objects a run needs: model, tokenizer, batcher, evaluator.

Everything here reads and validates input (model folder, data files, tokenizer) and writes
nothing, so `train` can call it before touching the workdir.
"""

from __future__ import annotations

from typing import Callable

import ml_collections

from bixse_jax.data import sources
from bixse_jax.data.batching import PairBatcher
from bixse_jax.models.sentence_model import SentenceModel, load_encoder, position_limit

Evaluator = Callable[[dict], dict[str, float]]


def load_model(cfg: ml_collections.ConfigDict) -> SentenceModel:
    """The pretrained encoder named by `model.name_or_path`, with the training-time overrides.

    Goes through the same loader as `bixse-jax eval` and the public API, so a bixse-jax export
    (its bixse.json pooling and prompt) fine-tunes like any HF / sentence-transformers folder.
    """
    overrides = {"dtype": cfg.dtype, "matmul_dtype": cfg.matmul_dtype, "remat": cfg.remat,
                 "attention_impl": cfg.attention_impl}
    if cfg.dropout is not None:
        overrides["hidden_dropout_prob"] = float(cfg.dropout)
    if cfg.get("bidirectional"):  # decoders only; a BERT-family config refuses it
        overrides["bidirectional"] = True
    return load_encoder(cfg.name_or_path, pooling=cfg.pooling, normalize=cfg.normalize,
                        append_eos=bool(cfg.get("append_eos")), **overrides)


def check_lengths(config: ml_collections.ConfigDict, model: SentenceModel) -> None:
    """Token lengths beyond the position table would index past it (NaN embeddings): refuse them."""
    limit = position_limit(model)
    for key in ("query_max_len", "doc_max_len"):
        if config.data[key] > limit:
            raise ValueError(f"data.{key}={config.data[key]} exceeds the {limit} positions of "
                             f"{config.model.name_or_path}; lower it")


def load_train_pairs(cfg: ml_collections.ConfigDict) -> list[sources.GradedPair] | None:
    """The training pairs in memory; None for `arrayrecord`, which each process reads lazily."""
    if cfg.kind == "arrayrecord":
        return None
    if cfg.kind == "demo":
        from bixse_jax.data.synthetic import make_demo_data
        return make_demo_data(seed=cfg.demo_seed).train
    if cfg.get("folds", 0) and cfg.kind != "beir":
        raise ValueError(f"data.folds needs data.kind='beir' (queries with ids), not {cfg.kind!r}")
    kwargs = {}
    if cfg.kind == "beir":
        kwargs = {"split": cfg.split, "max_grade": cfg.max_grade, "keep_zero": cfg.keep_zero_grades,
                  "skip_missing_docs": cfg.skip_missing_docs}
    if not cfg.path:
        raise ValueError(f"data.kind={cfg.kind!r} needs --config.data.path=FILE_OR_FOLDER")
    pairs = sources.load_pairs(cfg.kind, cfg.path, **kwargs)
    if cfg.get("folds", 0):
        held_out = held_out_fold(cfg)
        pairs = [p for p in pairs if p.query_id not in held_out]
        if not pairs:
            raise ValueError(f"{cfg.path}: no training pairs left outside fold {cfg.fold} of {cfg.folds}")
    return pairs


def held_out_fold(cfg: ml_collections.ConfigDict) -> set[str]:
    """Query ids of fold `data.fold` of `data.folds` (cross-validation by query; BEIR data only)."""
    from bixse_jax.data import folds

    return folds.held_out_queries(cfg.path, cfg.split, cfg.folds, cfg.fold, cfg.fold_seed)


def make_batcher(config: ml_collections.ConfigDict, model: SentenceModel,
                 pairs: list[sources.GradedPair] | None = None) -> PairBatcher:
    data = config.data
    if data.kind == "arrayrecord":  # built by `bixse-jax data build`; grain reads each process's records
        from bixse_jax.data.grain_pipeline import GrainPairBatcher
        if not data.path:
            raise ValueError("data.kind='arrayrecord' needs --config.data.path=DATA_DIR/graded_pairs/NAME/1.0.0")
        return GrainPairBatcher(data.path, model.tokenizer, global_batch_size=config.train.global_batch_size,
                                query_max_len=data.query_max_len, doc_max_len=data.doc_max_len,
                                buckets=tuple(data.buckets), seed=config.seed,
                                query_prefix=config.model.query_prefix, split=data.split,
                                worker_count=data.grain_workers)
    pairs = load_train_pairs(data) if pairs is None else pairs
    return PairBatcher(pairs, model.tokenizer,
                       global_batch_size=config.train.global_batch_size,
                       query_max_len=data.query_max_len, doc_max_len=data.doc_max_len,
                       buckets=tuple(data.buckets), seed=config.seed, query_prefix=config.model.query_prefix)


def make_evaluator(config: ml_collections.ConfigDict, model: SentenceModel) -> Evaluator | None:
    """A function params -> metrics for `eval.kind` (demo / beir / rerank / sts), or None for 'none'.

    Data are read and validated here, once; each call only encodes and scores (bixse_jax.eval.evaluate).
    `rerank` re-ranks each query's candidate pool: `eval.run_file` names a TREC run, or is 'qrels'
    (the default) for the judged documents, as TREC-DL 2019 needs.
    """
    from bixse_jax.eval import evaluate, run_files

    cfg = config.eval
    if cfg.kind == "none":
        return None
    enc = evaluate.TextEncoder(model.encoder, model.params, model.tokenizer,
                               query_max_len=config.data.query_max_len, doc_max_len=config.data.doc_max_len,
                               query_prefix=config.model.query_prefix, batch_size=cfg.batch_size)
    if cfg.kind == "sts":
        pairs = sources.read_sts(cfg.path)
        return lambda params: evaluate.evaluate_sts(enc.with_params(params), pairs)
    if cfg.kind == "demo":
        from bixse_jax.data.synthetic import make_demo_data
        demo = make_demo_data(seed=config.data.demo_seed)
        queries, corpus, qrels = demo.eval_queries, demo.eval_corpus, demo.eval_qrels
    elif cfg.kind in ("beir", "rerank"):
        queries, corpus, qrels = sources.read_beir_eval(cfg.path, cfg.split, skip_missing_docs=cfg.skip_missing_docs)
        if config.data.get("folds", 0):  # cross-validation: evaluate the held-out fold's queries only
            data = config.data
            if (str(data.path), data.split) != (str(cfg.path), cfg.split):
                raise ValueError(f"with data.folds, eval.path/split ({cfg.path}, {cfg.split}) must be the data's "
                                 f"({data.path}, {data.split}): the held-out fold is a part of the training split")
            held_out = held_out_fold(data)
            queries = {q: t for q, t in queries.items() if q in held_out}
            qrels = {q: r for q, r in qrels.items() if q in held_out}
            if not qrels:
                raise ValueError(f"{cfg.path}: fold {data.fold} of {data.folds} has no judged queries")
    else:
        raise ValueError(f"eval.kind {cfg.kind!r} is not one of 'demo', 'beir', 'rerank', 'sts', 'none'")
    ks = tuple(cfg.ks)
    if cfg.kind == "rerank":
        run_file = cfg.get("run_file", "qrels") or "qrels"
        if run_file == "qrels":
            pools = evaluate.judged_pool(qrels, corpus)  # judged documents with text; qrels stay whole
        else:
            pools, _ = evaluate.run_pool(run_files.read_run(run_file), corpus, depth=cfg.top_k)
        return lambda params: evaluate.evaluate_rerank(enc.with_params(params), queries, corpus, qrels,
                                                       pools, ks=ks)[0]
    top_k = max(cfg.top_k, *ks)
    return lambda params: evaluate.evaluate_retrieval(enc.with_params(params), queries, corpus, qrels,
                                                      ks=ks, top_k=top_k)[0]
