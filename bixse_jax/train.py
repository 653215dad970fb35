"""BiXSE training: the train state, the jitted step over global arrays, and the loop.

One `jax.jit` step over the whole global batch: queries and documents are embedded where their
shard of the batch lives, the [B, B] similarity matrix is formed over the *global* batch (XLA
gathers the document embeddings over the `data` axis), the graded target matrix is built from the
global pair ids, and the loss is the mean over all queries - so the result equals the one-device
computation on the same batch, on any number of devices and hosts.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax import checkpoint, parallel
from bixse_jax.losses import LOSSES
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.targets import graded_targets, loss_mask

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"encoder": HF-layout tree, "log_temperature": (), "bias": ()}
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key; dropout for step s uses fold_in(rng, s)


def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak rate, then linear or cosine decay to `end_lr_fraction` of it."""
    peak, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.num_steps
    end = peak * cfg.get("end_lr_fraction", 0.0)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end)
    if cfg.schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                     optax.linear_schedule(peak, end, max(total - warmup, 1))], [warmup])
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                     optax.constant_schedule(peak)], [warmup])
    raise ValueError(f"train.schedule {cfg.schedule!r} is not one of 'linear', 'cosine', 'constant'")


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices and embeddings only; never on biases, LayerNorm, t or b."""
    def decays(path: tuple, _) -> bool:
        names = [getattr(p, "key", None) for p in path]
        return names[0] == "encoder" and names[-1] in ("kernel", "embedding")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping; t and b get their own (larger) learning rate.

    Fine-tuning rates (~2e-5) would leave b near its init of -10 for the whole of a short run, so
    the two logit scalars step `logit_params_lr_multiplier` times faster, as a per-group rate.
    """
    schedule = make_schedule(cfg)
    adamw = lambda lr: optax.adamw(lr, b1=cfg.get("adam_b1", 0.9), b2=cfg.get("adam_b2", 0.999),
                                   eps=cfg.get("adam_eps", 1e-6), weight_decay=cfg.weight_decay, mask=_decay_mask)
    multiplier = cfg.get("logit_params_lr_multiplier", 1.0)
    labels = lambda params: {k: "encoder" if k == "encoder" else "logit" for k in params}
    per_group = optax.multi_transform(
        {"encoder": adamw(schedule), "logit": adamw(lambda step: multiplier * schedule(step))}, labels)
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm else []
    return optax.chain(*parts, per_group), schedule


def init_state(encoder_params: dict, loss_cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = {"encoder": jax.tree.map(jnp.asarray, encoder_params),
              "log_temperature": jnp.asarray(loss_cfg.init_log_temperature, jnp.float32),
              "bias": jnp.asarray(loss_cfg.init_bias, jnp.float32)}
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


def batch_targets(batch: Batch, loss_cfg: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(targets, labelled, mask) for the global batch, with the ablations the paper compares."""
    targets, labelled = graded_targets(batch["query_ids"], batch["doc_ids"], batch["grades"])
    if loss_cfg.get("diagonal_only", False):  # ignore duplicate-id labels: only pair i labels (i, i)
        eye = jnp.eye(targets.shape[0], dtype=bool)
        targets, labelled = jnp.where(eye, batch["grades"][:, None], 0.0), eye
    threshold = loss_cfg.get("binarize_threshold", None)
    if threshold is not None:
        targets = (targets >= threshold).astype(jnp.float32) * labelled
    mask = loss_mask(batch["query_ids"], labelled, loss_cfg.get("mask_unlabelled_of_repeated_queries", False))
    return targets, labelled, mask


def make_embed_fn(encoder: SentenceEncoder, use_dropout: bool
                  ) -> Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]:
    """(encoder params, ids, mask, dropout rng) -> [n, H] embeddings; dropout only if the model has it."""
    def embed(params: dict, ids: jax.Array, mask: jax.Array, rng: jax.Array) -> jax.Array:
        return encoder(params, ids, mask, dropout_rng=rng if use_dropout else None)
    return embed


def make_embedding_loss_fn(loss_cfg: ml_collections.ConfigDict, mesh: Mesh | None
                           ) -> Callable[[dict, jax.Array, jax.Array, Batch], tuple[jax.Array, Metrics]]:
    """(params, query embeddings, doc embeddings, batch) -> (loss, metrics) over the global batch.

    Split from the encoder so that gradient caching can call it on embeddings computed without
    activations, and differentiate it with respect to the embeddings and t, b alone.
    """
    loss_name = loss_cfg.name
    if loss_name not in LOSSES:
        raise ValueError(f"loss.name {loss_name!r} is not one of {sorted(LOSSES)}")
    loss_impl = LOSSES[loss_name]
    extra = {"threshold": loss_cfg.infonce_threshold} if loss_name == "infonce" else {}

    def embedding_loss(params: dict, q: jax.Array, d: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
        scores = q @ d.T  # [B, B]: every query against every document of the global batch
        if mesh is not None:
            scores = jax.lax.with_sharding_constraint(scores, NamedSharding(mesh, P(parallel.DATA_AXIS, None)))
        t, b = params["log_temperature"], params["bias"]
        if not loss_cfg.learn_temperature:
            t = jax.lax.stop_gradient(t)
        if not loss_cfg.learn_bias:
            b = jax.lax.stop_gradient(b)
        logits = jnp.exp(t) * scores + b
        targets, labelled, mask = batch_targets(batch, loss_cfg)
        loss = loss_impl(scores if loss_name == "margin_mse" else logits, targets, mask, **extra)
        positive = labelled & (targets > 0)
        negative = mask & ~labelled
        metrics = {
            "loss": loss,
            "log_temperature": t,
            "bias": b,
            "positive_logit": jnp.sum(jnp.where(positive, logits, 0.0)) / jnp.maximum(positive.sum(), 1),
            "negative_logit": jnp.sum(jnp.where(negative, logits, 0.0)) / jnp.maximum(negative.sum(), 1),
        }
        return loss, metrics

    return embedding_loss


def make_loss_fn(encoder: SentenceEncoder, loss_cfg: ml_collections.ConfigDict, mesh: Mesh | None,
                 use_dropout: bool) -> Callable[[dict, Batch, jax.Array], tuple[jax.Array, Metrics]]:
    """(params, batch, dropout rng) -> (loss, metrics): embed both sides, then the embedding loss."""
    embed = make_embed_fn(encoder, use_dropout)
    embedding_loss = make_embedding_loss_fn(loss_cfg, mesh)

    def loss_fn(params: dict, batch: Batch, dropout_rng: jax.Array) -> tuple[jax.Array, Metrics]:
        q_rng, d_rng = jax.random.split(dropout_rng)
        q = embed(params["encoder"], batch["query_input_ids"], batch["query_attention_mask"], q_rng)
        d = embed(params["encoder"], batch["doc_input_ids"], batch["doc_attention_mask"], d_rng)
        return embedding_loss(params, q, d, batch)

    return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, dropout_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: Mesh, state: TrainState) -> Callable:
    """Replicated state in and out, batch sharded on `data`, the old state's buffers donated."""
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), state)
    return jax.jit(train_step, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


class MetricsWriter:
    """TensorBoard events and JSON lines in the workdir (appending: a resumed run keeps history)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(workdir / "tensorboard"))
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


def mean_metrics(history: list[Metrics]) -> dict[str, float]:
    """Fetches the device metrics of the last few steps in one transfer and averages them."""
    fetched = jax.device_get(history)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          stop_after_step: int | None = None, show_progress: bool = True) -> tuple[dict[str, Any], TrainState]:
    """Trains (or resumes) in `workdir`; returns the summary (steps, evaluation before/after) and state.

    Everything that can fail on bad input (model folder, data files, tokenizer) is loaded and
    checked before anything is written, so a failed start leaves the workdir as it was.
    `stop_after_step` ends the run early with a checkpoint, as a preemption would.
    """
    from tqdm import tqdm

    from bixse_jax import experiment

    workdir = pathlib.Path(workdir)
    mesh = parallel.make_mesh(config.mesh.data)
    parallel.local_batch_size(config.train.global_batch_size, mesh)
    model = experiment.load_model(config.model)
    batcher = experiment.make_batcher(config, model)
    evaluator = experiment.make_evaluator(config, model)

    tx, schedule = make_optimizer(config.train)
    state = init_state(model.params, config.loss, tx, config.seed)
    state = jax.device_put(state, parallel.replicated(mesh))
    use_dropout = model.encoder.config.hidden_dropout_prob > 0
    loss_fn = make_loss_fn(model.encoder, config.loss, mesh, use_dropout)
    step_fn = jit_train_step(make_train_step(loss_fn, tx, schedule), mesh, state)

    is_lead = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoints)
    restored = checkpoint.restore_latest(manager, state)
    summary: dict[str, Any] = {"workdir": str(workdir)}
    if restored is None:
        if is_lead:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    else:
        state, data_state, step = restored
        if data_state.get("next_batch") != step:
            raise ValueError(f"{workdir}: checkpoint {step} records data position {data_state}")
        summary["resumed_from_step"] = step

    if evaluator is not None:
        summary["before"] = evaluator(model.params)
    writer = MetricsWriter(workdir, enabled=is_lead)
    total = config.train.num_steps if stop_after_step is None else min(stop_after_step, config.train.num_steps)
    first = int(jax.device_get(state.step))
    history: list[Metrics] = []
    tick, pairs_since = time.perf_counter(), 0
    progress = tqdm(range(first, total), initial=first, total=total, desc="train",
                    disable=not (show_progress and is_lead), dynamic_ncols=True)
    for step in progress:
        batch = parallel.global_batch(batcher.batch(step), mesh)
        state, metrics = step_fn(state, batch)
        history.append(metrics)
        pairs_since += config.train.global_batch_size
        done = step + 1
        if done % config.train.log_every == 0 or done == total:
            scalars = mean_metrics(history)
            elapsed = time.perf_counter() - tick
            scalars["pairs_per_second"] = pairs_since / max(elapsed, 1e-9)
            writer.write(done, scalars)
            progress.set_postfix(loss=f"{scalars['loss']:.4f}", pairs_s=f"{scalars['pairs_per_second']:.1f}")
            if not np.isfinite(scalars["loss"]):
                raise FloatingPointError(f"loss is {scalars['loss']} at step {done}")
            history, tick, pairs_since = [], time.perf_counter(), 0
        if evaluator is not None and config.eval.every_steps and done % config.eval.every_steps == 0 and done < total:
            writer.write(done, {f"eval/{k}": v for k, v in evaluator(state.params["encoder"]).items()})
        if done % config.train.checkpoint_every == 0 or done == total:
            checkpoint.save(manager, done, state, {"next_batch": done})
    progress.close()
    manager.wait_until_finished()
    manager.close()
    summary["steps"] = int(jax.device_get(state.step))
    if evaluator is not None and summary["steps"] >= config.train.num_steps:
        summary["after"] = evaluator(state.params["encoder"])
        writer.write(summary["steps"], {f"eval/{k}": v for k, v in summary["after"].items()})
    writer.close()
    if is_lead:
        with open(workdir / "summary.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(summary) + "\n")
    return summary, state
