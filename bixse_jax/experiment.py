"""Config -> the objects a run needs: model, tokenizer, batcher, evaluators.

Everything here reads and validates input (model folder, data files, tokenizer) and writes
nothing, so `train` can call it before touching the workdir.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ml_collections

from bixse_jax.data import sources
from bixse_jax.data.batching import PairBatcher
from bixse_jax.errors import ConfigError, UserError
from bixse_jax.models import compute_policy, lora
from bixse_jax.models.sentence_model import SentenceModel, load_encoder, position_limit, with_adapters

if TYPE_CHECKING:
    from bixse_jax.eval.registry import Scheduled


def matmul_policy(cfg: ml_collections.ConfigDict) -> tuple[str | None, str]:
    """(the model's matmul_dtype, a sentence for the run's log): `model.matmul_dtype=auto` resolved."""
    return compute_policy.resolve_matmul_dtype(cfg.matmul_dtype, cfg.dtype, training=True)


def load_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> SentenceModel:
    """The pretrained encoder named by `model.name_or_path`, with the training-time overrides, and
    fresh LoRA adapters (from `seed`) when `model.lora.rank` is set.

    Goes through the same loader as `bixse-jax eval` and the public API, so a bixse-jax export
    (its bixse.json pooling and prompt) fine-tunes like any HF / sentence-transformers folder.
    """
    spec = lora.spec_from_config(cfg.lora)  # its ConfigErrors before the (slow) load
    matmul_dtype, _ = matmul_policy(cfg)
    overrides = {"dtype": cfg.dtype, "matmul_dtype": matmul_dtype, "remat": cfg.remat,
                 "attention_impl": cfg.attention_impl}
    if cfg.dropout is not None:
        overrides["hidden_dropout_prob"] = float(cfg.dropout)
    if cfg.bidirectional:  # decoders only; a BERT-family config refuses it
        overrides["bidirectional"] = True
    model = load_encoder(cfg.name_or_path, pooling=cfg.pooling, normalize=cfg.normalize,
                         append_eos=bool(cfg.append_eos), **overrides)
    return with_adapters(model, spec, seed)


def check_lengths(config: ml_collections.ConfigDict, model: SentenceModel) -> None:
    """Token lengths beyond the position table would index past it (NaN embeddings): refuse them."""
    limit = position_limit(model)
    for key in ("query_max_len", "doc_max_len"):
        if config.data[key] > limit:
            raise ConfigError(f"data.{key}={config.data[key]} exceeds the {limit} positions of "
                             f"{config.model.name_or_path}; lower it")


def load_train_pairs(cfg: ml_collections.ConfigDict) -> list[sources.GradedPair] | None:
    """The training pairs in memory; None for `arrayrecord`, which each process reads lazily."""
    if cfg.kind == "arrayrecord":
        return None
    if cfg.kind == "demo":
        from bixse_jax.data.synthetic import make_demo_data
        return make_demo_data(seed=cfg.demo_seed).train
    if cfg.folds and cfg.kind != "beir":
        raise ConfigError(f"data.folds needs data.kind='beir' (queries with ids), not {cfg.kind!r}")
    kwargs = {}
    if cfg.kind == "beir":
        kwargs = {"split": cfg.split, "max_grade": cfg.max_grade, "keep_zero": cfg.keep_zero_grades,
                  "skip_missing_docs": cfg.skip_missing_docs}
    if not cfg.path:
        raise ConfigError(f"data.kind={cfg.kind!r} needs --config.data.path=FILE_OR_FOLDER")
    pairs = sources.load_pairs(cfg.kind, cfg.path, **kwargs)
    if cfg.exclude_folds and not cfg.folds:
        raise ConfigError("data.exclude_folds needs data.folds (cross-validation by query)")
    if cfg.folds:
        held_out = held_out_fold(cfg) | excluded_folds(cfg)
        pairs = [p for p in pairs if p.query_id not in held_out]
        if not pairs:
            raise UserError(f"{cfg.path}: no training pairs left outside folds "
                            f"{sorted({cfg.fold, *cfg.exclude_folds})} of {cfg.folds}")
    return pairs


def held_out_fold(cfg: ml_collections.ConfigDict) -> set[str]:
    """Query ids of fold `data.fold` of `data.folds` (cross-validation by query; BEIR data only)."""
    from bixse_jax.data import folds

    return folds.held_out_queries(cfg.path, cfg.split, cfg.folds, cfg.fold, cfg.fold_seed)


def excluded_folds(cfg: ml_collections.ConfigDict) -> set[str]:
    """Query ids of `data.exclude_folds`: folds kept out of training besides the evaluated `data.fold`
    (a nested learning-rate selection trains on the folds other than its dev fold and the outer test fold)."""
    from bixse_jax.data import folds

    out: set[str] = set()
    for fold in cfg.exclude_folds:
        if fold == cfg.fold:
            raise ConfigError(f"data.exclude_folds {tuple(cfg.exclude_folds)} holds data.fold={cfg.fold}, "
                              "which is held out already")
        out |= folds.held_out_queries(cfg.path, cfg.split, cfg.folds, int(fold), cfg.fold_seed)
    return out


def make_batcher(config: ml_collections.ConfigDict, model: SentenceModel,
                 pairs: list[sources.GradedPair] | None = None) -> PairBatcher:
    data = config.data
    if data.kind == "arrayrecord":  # built by `bixse-jax data build`; grain reads each process's records
        from bixse_jax.data.grain_pipeline import GrainPairBatcher
        if not data.path:
            raise ConfigError("data.kind='arrayrecord' needs --config.data.path=DATA_DIR/graded_pairs/NAME/1.0.0")
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


def make_evaluators(config: ml_collections.ConfigDict, model: SentenceModel) -> dict[str, Scheduled]:
    """{NAME: Scheduled(evaluate, every_steps, before_training)} for each evaluator of `config.evals`
    that is not switched off (kind 'none'); bixse_jax/eval/registry.py builds them by kind.

    Each reads and validates its data here, once; a call only encodes and scores.
    """
    from bixse_jax.eval import registry

    return registry.build_all(config, model)
