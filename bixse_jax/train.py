"""BiXSE training: the train state, the jitted step over global arrays, and the loop.

One `jax.jit` step over the whole global batch: queries and documents are embedded where their
shard of the batch lives, the [B, B] similarity matrix is formed over the *global* batch (XLA
gathers the document embeddings over the `data` axis), the graded target matrix is built from the
global pair ids, and the loss is the mean over all queries - so the result equals the one-device
computation on the same batch, on any number of devices and hosts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax import checkpoint, parallel
from bixse_jax.losses import LOSSES
from bixse_jax.metric_writers import MetricsWriter
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.preemption import PreemptionGuard
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
    """AdamW in two groups: the encoder, and the logit scalars t and b at their own (larger) rate.

    Fine-tuning rates (~2e-5) would leave b near its init of -10 for the whole of a short run, so
    the two logit scalars step `logit_params_lr_multiplier` times faster, as a per-group rate.

    `grad_clip_norm` (0: off) clips the encoder's gradients by the global norm of the encoder's
    gradients alone. t and b are not clipped: inside one shared norm their gradients (large under
    BiXSE, and dL/db = 0 under InfoNCE) would shrink the encoder's step by a loss-dependent factor,
    and Adam already bounds each scalar's step to a few times its rate whatever its gradient's size.
    """
    schedule = make_schedule(cfg)

    def adamw(lr: optax.ScalarOrSchedule, clip_norm: float | None) -> optax.GradientTransformation:
        clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
        return optax.chain(*clip, optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                              weight_decay=cfg.weight_decay, mask=_decay_mask))

    multiplier = cfg.logit_params_lr_multiplier
    labels = lambda params: {k: "encoder" if k == "encoder" else "logit" for k in params}
    # Each group's transforms see only that group's leaves, so the clip's norm is the encoder's.
    per_group = optax.multi_transform(
        {"encoder": adamw(schedule, cfg.grad_clip_norm),
         "logit": adamw(lambda step: multiplier * schedule(step), None)}, labels)
    return per_group, schedule


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
            scores = jax.lax.with_sharding_constraint(scores, NamedSharding(mesh, P(parallel.BATCH_AXES, None)))
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
    """One optimiser step; a non-finite loss or gradient leaves params and optimiser state as they were.

    The guard runs inside the jitted step (a select, no host sync); the host reads the
    `nonfinite` metric later and decides, by `train.on_nonfinite`, to log the skip or to stop.
    """
    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, dropout_rng)
        return apply_gradients(state, grads, loss, metrics, tx, schedule)

    return train_step


def apply_gradients(state: TrainState, grads: dict, loss: jax.Array, metrics: Metrics,
                    tx: optax.GradientTransformation, schedule: optax.Schedule) -> tuple[TrainState, Metrics]:
    """The optimiser update with the non-finite guard; shared by the plain and cached steps."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "nonfinite": (~finite).astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=keep_if_bad(params, state.params),
                         opt_state=keep_if_bad(opt_state, state.opt_state)), metrics


def init_sharded_state(encoder_params: dict, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       mesh: Mesh) -> TrainState:
    """The initial state laid out on the mesh: params by the logical axis rules, optimiser alike."""
    state = init_state(encoder_params, config.loss, tx, config.seed)
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    params = jax.device_put(state.params, parallel.param_shardings(state.params, mesh, rules))
    replicate = lambda x: jax.device_put(x, parallel.replicated(mesh))
    # Moments inherit the parameters' shardings; counters (made from constants) are replicated.
    opt_state = jax.tree.map(lambda x: x if x.ndim and len(x.sharding.device_set) == mesh.size else replicate(x),
                             jax.jit(tx.init)(params))
    return TrainState(step=replicate(state.step), params=params, opt_state=opt_state, rng=replicate(state.rng))


def jit_train_step(train_step: Callable, mesh: Mesh, state: TrainState) -> Callable:
    """State keeps its layout in and out, batch split over the mesh, the old state's buffers donated."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(train_step, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


# Keys a resumed run may change: how long, how often to log/save/evaluate, and the device layout.
RESUMABLE_CHANGES = ("train.num_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.async_checkpoints", "train.on_nonfinite", "train.grad_cache_chunk",
                     "data.grain_workers", "eval.", "mesh.", "model.attention_impl", "model.remat",
                     "model.matmul_dtype")


def config_differences(saved: dict, current: dict, allowed: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """'key: checkpoint X, now Y' for every key that differs and may not change across a resume."""
    flat = lambda d: {"/".join(k).replace("/", "."): v for k, v in traverse_util.flatten_dict(d).items()}
    old, new = flat(saved), flat(current)
    return [f"{k}: checkpoint {old.get(k)!r}, now {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and not k.startswith(allowed)]


class _PendingSteps:
    """Device metrics of steps not yet read on the host, with the pair indices each step trained on.

    Reading them in one transfer every few steps keeps the host from stalling the device; the
    non-finite flags are checked then (and before every checkpoint).
    """

    def __init__(self, policy: str, describe_pairs: Callable[[int], str]):
        if policy not in ("skip", "stop"):
            raise ValueError(f"train.on_nonfinite {policy!r} is not 'skip' or 'stop'")
        self.policy, self.describe_pairs = policy, describe_pairs
        self.items: list[tuple[int, Metrics]] = []
        self.pairs, self.tick = 0, time.perf_counter()

    def add(self, step: int, metrics: Metrics, pairs: int) -> None:
        self.items.append((step, metrics))
        self.pairs += pairs

    def check(self) -> tuple[dict[str, float] | None, list[dict[str, Any]]]:
        """(mean metrics of the good steps or None, skipped-step records); raises under 'stop'."""
        fetched = jax.device_get([m for _, m in self.items])
        steps = [s for s, _ in self.items]
        skipped = [{"skipped_step": s, "pairs": self.describe_pairs(s)} for s, m in zip(steps, fetched) if m["nonfinite"]]
        for record in skipped:
            message = (f"training step {record['skipped_step'] + 1} (global batch {record['skipped_step']}): "
                       f"non-finite loss or gradients on {record['pairs']}; the update was not applied")
            if self.policy == "stop":
                raise FloatingPointError(message + "; stopping (train.on_nonfinite=stop), the newest checkpoint "
                                         "is the last good state")
            logging.warning(message)
        good = [m for m in fetched if not m["nonfinite"]]
        means = {k: float(np.mean([m[k] for m in good])) for k in good[0] if k != "nonfinite"} if good else None
        if means is not None:
            means["pairs_per_second"] = self.pairs / max(time.perf_counter() - self.tick, 1e-9)
        self.items, self.pairs, self.tick = [], 0, time.perf_counter()
        return means, skipped


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
          stop_after_step: int | None = None, show_progress: bool = True) -> tuple[dict[str, Any], TrainState]:
    """Trains (or resumes) in `workdir`; returns the summary (steps, evaluation before/after) and state.

    Everything that can fail on bad input (model folder, data files, tokenizer, a checkpoint of
    another config) is checked before anything is written, so a failed start leaves the workdir
    as it was. SIGTERM, or `stop_after_step`, ends the run after the current step with a checkpoint.
    """
    from tqdm import tqdm

    from bixse_jax import experiment

    workdir = _as_path(workdir)
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    parallel.local_batch_size(config.train.global_batch_size, mesh)
    if config.train.grad_cache_chunk:
        from bixse_jax import grad_cache  # local import: grad_cache imports train
        grad_cache.check_chunk(config.train.global_batch_size, config.train.grad_cache_chunk, mesh)
    model = experiment.load_model(config.model)
    experiment.check_lengths(config, model)
    pairs = experiment.load_train_pairs(config.data)
    batcher = experiment.make_batcher(config, model, pairs)
    evaluator = experiment.make_evaluator(config, model)
    saved_config = workdir / "config.json"
    if saved_config.exists():
        differences = config_differences(json.loads(saved_config.read_text()), json.loads(config.to_json_best_effort()))
        if differences:
            raise ValueError(f"{workdir} holds a run of a different config; use a new workdir or the same "
                             "settings. Differing keys:\n  " + "\n  ".join(differences))

    tx, schedule = make_optimizer(config.train)
    state = init_sharded_state(model.params, config, tx, mesh)
    use_dropout = model.encoder.config.hidden_dropout_prob > 0
    if config.train.grad_cache_chunk:  # gradient caching: embed in sub-batches, backprop twice
        loss_fn = grad_cache.make_cached_loss_fn(make_embed_fn(model.encoder, use_dropout),
                                                 make_embedding_loss_fn(config.loss, mesh),
                                                 chunk=config.train.grad_cache_chunk, mesh=mesh)
    else:
        loss_fn = make_loss_fn(model.encoder, config.loss, mesh, use_dropout)
    train_step = make_train_step(loss_fn, tx, schedule)
    step_fn = jit_train_step(train_step, mesh, state)

    is_lead = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint.make_manager(workdir, keep=config.train.keep_checkpoints,
                                      async_save=config.train.async_checkpoints)
    restored = checkpoint.restore_latest(manager, state)
    summary: dict[str, Any] = {"workdir": str(workdir)}
    if restored is None:
        if is_lead and not saved_config.exists():
            saved_config.write_text(config.to_json_best_effort(indent=2))
    else:
        state, data_state, step = restored
        if data_state.get("next_batch") != step:
            raise ValueError(f"{workdir}: checkpoint {step} records data position {data_state}, not {step}")
        summary["resumed_from_step"] = step
        logging.warning("resumed from checkpoint step %d in %s", step, workdir)
        print(f"[bixse-jax] resumed from checkpoint step {step}", file=sys.stderr, flush=True)

    _write_host_record(workdir, batcher, first_batch=int(jax.device_get(state.step)))
    if evaluator is not None and config.eval.get("before_training", True):
        summary["before"] = evaluator(model.params)
    writer = MetricsWriter(workdir, enabled=is_lead)
    total = config.train.num_steps if stop_after_step is None else min(stop_after_step, config.train.num_steps)
    first = int(jax.device_get(state.step))

    def describe_pairs(step: int) -> str:
        idx = batcher.global_indices(step)
        if pairs is None:  # arrayrecord: record numbers in the built data set
            return "records " + ", ".join(f"#{i}" for i in idx)
        return "pairs " + ", ".join(f"#{i} ({pairs[i].query_id} / {pairs[i].doc_id})" for i in idx)

    pending = _PendingSteps(config.train.on_nonfinite, describe_pairs)

    def flush(done: int) -> None:
        if not pending.items:
            return
        means, skipped = pending.check()
        for record in skipped:
            writer.write(record["skipped_step"] + 1, record)
        if means is not None:
            writer.write(done, means)
            progress.set_postfix(loss=f"{means['loss']:.4f}", pairs_s=f"{means['pairs_per_second']:.1f}")

    progress = tqdm(range(first, total), initial=first, total=total, desc="train",
                    disable=not (show_progress and is_lead), dynamic_ncols=True)
    try:
        with PreemptionGuard() as guard:
            for step in progress:
                batch = parallel.global_batch(batcher.batch(step), mesh)
                state, metrics = step_fn(state, batch)
                pending.add(step, metrics, config.train.global_batch_size)
                done = step + 1
                preempted = done < total and guard.should_stop(done)
                if done % config.train.log_every == 0 or done == total or preempted:
                    flush(done)
                if evaluator is not None and config.eval.every_steps and done % config.eval.every_steps == 0 \
                        and done < total:
                    writer.write(done, {f"eval/{k}": v for k, v in evaluator(state.params["encoder"]).items()})
                every = config.train.checkpoint_every
                if every and (done % every == 0 or done == total or preempted):
                    flush(done)  # under on_nonfinite=stop, never checkpoint past a bad step
                    checkpoint.save(manager, done, state, {"next_batch": done})
                if preempted:
                    summary["preempted_at_step"] = done
                    break
    finally:  # whatever happened, let started checkpoint writes complete and input workers stop
        progress.close()
        getattr(batcher, "close", lambda: None)()
        manager.wait_until_finished()
        manager.close()
    summary["steps"] = int(jax.device_get(state.step))
    if evaluator is not None and summary["steps"] >= config.train.num_steps:
        summary["after"] = evaluator(state.params["encoder"])
        writer.write(summary["steps"], {f"eval/{k}": v for k, v in summary["after"].items()})
    writer.close()
    if is_lead and summary["steps"] >= config.train.num_steps:
        with (workdir / "summary.jsonl").open("a") as f:
            f.write(json.dumps(summary) + "\n")
    return summary, state


def _write_host_record(workdir: epath.Path, batcher: Any, first_batch: int) -> None:
    """WORKDIR/hosts/process_I.json: what this process feeds, to debug multi-host input."""
    record = {"process_index": jax.process_index(), "process_count": jax.process_count(),
              "local_devices": [str(d) for d in jax.local_devices()], "local_batch_size": batcher.local_batch_size,
              "first_batch": first_batch, "first_batch_local_pairs": batcher.local_indices(first_batch).tolist()}
    (workdir / "hosts").mkdir(parents=True, exist_ok=True)
    (workdir / "hosts" / f"process_{jax.process_index()}.json").write_text(json.dumps(record, indent=1))


def _as_path(workdir: str | os.PathLike) -> epath.Path:
    """Local folders become absolute (Orbax wants that); gs:// and other URLs pass through epath."""
    text = os.fspath(workdir)
    return epath.Path(text if "://" in text else os.path.abspath(text))
