"""Config -> the objects a run needs: model, tokenizer, batcher, evaluator.

Everything here reads and validates input (model folder, data files, tokenizer) and writes
nothing, so `train` can call it before touching the workdir.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable

import ml_collections
import numpy as np

from bixse_jax.data import sources
from bixse_jax.data.batching import PairBatcher, Tokenizer
from bixse_jax.eval import metrics
from bixse_jax.eval.encode import encode_texts
from bixse_jax.models import hf_io
from bixse_jax.models.encoder import SentenceEncoder

Evaluator = Callable[[dict], dict[str, float]]


@dataclasses.dataclass
class LoadedModel:
    encoder: SentenceEncoder
    params: dict  # float32 numpy, HF Flax layout
    tokenizer: Tokenizer
    model_dir: pathlib.Path
    settings: hf_io.SentenceSettings


def load_model(cfg: ml_collections.ConfigDict) -> LoadedModel:
    """The pretrained encoder named by `model.name_or_path`, with the training-time overrides."""
    overrides = {"dtype": cfg.dtype, "remat": cfg.remat, "attention_impl": cfg.attention_impl}
    if cfg.dropout is not None:
        overrides["hidden_dropout_prob"] = float(cfg.dropout)
    config, params, model_dir = hf_io.load_pretrained(cfg.name_or_path, **overrides)
    settings = hf_io.read_sentence_settings(model_dir)
    tokenizer = Tokenizer.from_model_dir(model_dir)
    tokenizer.check_vocab(config.vocab_size, source=str(model_dir))
    encoder = SentenceEncoder(config, pooling=cfg.pooling or settings.pooling,
                              normalize=settings.normalize if cfg.normalize is None else bool(cfg.normalize))
    return LoadedModel(encoder, params, tokenizer, model_dir, settings)


def load_train_pairs(cfg: ml_collections.ConfigDict) -> list[sources.GradedPair]:
    if cfg.kind == "demo":
        from bixse_jax.data.synthetic import make_demo_data
        return make_demo_data(seed=cfg.demo_seed).train
    kwargs = {}
    if cfg.kind == "beir":
        kwargs = {"split": cfg.split, "max_grade": cfg.max_grade, "keep_zero": cfg.keep_zero_grades,
                  "skip_missing_docs": cfg.skip_missing_docs}
    if not cfg.path:
        raise ValueError(f"data.kind={cfg.kind!r} needs --config.data.path=FILE_OR_FOLDER")
    return sources.load_pairs(cfg.kind, cfg.path, **kwargs)


def make_batcher(config: ml_collections.ConfigDict, model: LoadedModel) -> PairBatcher:
    data = config.data
    return PairBatcher(load_train_pairs(data), model.tokenizer,
                       global_batch_size=config.train.global_batch_size,
                       query_max_len=data.query_max_len, doc_max_len=data.doc_max_len,
                       buckets=tuple(data.buckets), seed=config.seed, query_prefix=config.model.query_prefix)


def make_evaluator(config: ml_collections.ConfigDict, model: LoadedModel) -> Evaluator | None:
    """A function params -> metrics for `eval.kind` (demo / beir / sts), or None for 'none'."""
    cfg = config.eval
    encode = lambda params, texts, max_len, prefix="": encode_texts(
        model.encoder, params, model.tokenizer, list(texts), max_len=max_len,
        batch_size=cfg.batch_size, prefix=prefix)
    prefix = config.model.query_prefix
    if cfg.kind == "none":
        return None
    if cfg.kind == "sts":
        pairs = sources.read_sts(cfg.path)

        def evaluate_sts(params: dict) -> dict[str, float]:
            a = encode(params, [p.query for p in pairs], config.data.query_max_len)
            b = encode(params, [p.document for p in pairs], config.data.doc_max_len)
            cos = np.sum(_unit(a) * _unit(b), axis=1)
            gold = np.array([p.score for p in pairs])
            return {"spearman": metrics.spearman(cos, gold), "pearson": metrics.pearson(cos, gold)}
        return evaluate_sts
    if cfg.kind == "demo":
        from bixse_jax.data.synthetic import make_demo_data
        demo = make_demo_data(seed=config.data.demo_seed)
        queries, corpus, qrels = demo.eval_queries, demo.eval_corpus, demo.eval_qrels
    elif cfg.kind == "beir":
        queries, corpus, qrels = sources.read_beir_eval(cfg.path, cfg.split, skip_missing_docs=cfg.skip_missing_docs)
    else:
        raise ValueError(f"eval.kind {cfg.kind!r} is not one of 'demo', 'beir', 'sts', 'none'")

    qids, dids = list(queries), list(corpus)

    def evaluate_retrieval(params: dict) -> dict[str, float]:
        q = encode(params, [queries[i] for i in qids], config.data.query_max_len, prefix)
        d = encode(params, [corpus[i] for i in dids], config.data.doc_max_len)
        scores = q @ d.T
        k = min(cfg.top_k, len(dids))
        top = np.argsort(-scores, axis=1)[:, :k]
        run = {qid: {dids[j]: float(scores[r, j]) for j in top[r]} for r, qid in enumerate(qids)}
        return metrics.evaluate_run(run, qrels, ks=tuple(cfg.ks))
    return evaluate_retrieval


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
