"""The train state, the optimiser, the objective and the jitted step over global arrays.

One `jax.jit` step over the whole global batch: queries and documents are embedded where their
shard of the batch lives, the [B, B] similarity matrix is formed over the *global* batch (XLA
gathers the document embeddings over the `data` axis), the graded target matrix is built from the
global pair ids, and the loss is the mean over all queries - so the result equals the one-device
computation on the same batch, on any number of devices and hosts.

Read top to bottom: `objective` (embeddings -> loss), `loss_fn` (tokens -> embeddings -> loss),
`train_step` (gradient, guarded optimiser update). Gradient caching (grad_cache.py) swaps in its
own `loss_fn` with the same signature and reuses `objective` and `train_step` as they are.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bixse_jax import blocked_loss, cell_stats, logit_init, losses, matryoshka, parallel
from bixse_jax.errors import ConfigError
from bixse_jax.models import lora
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.targets import batch_targets

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# A loss fn that fits t and b itself returns them as these metrics; the step stores them as the params.
REFIT_KEYS = ("refit/log_temperature", "refit/bias")
LossFn = Callable[..., tuple[jax.Array, Metrics]]  # (params, batch, rng[, frozen LoRA base])


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict  # {"encoder": HF-layout tree (LoRA: the adapters only), "log_temperature": (), "bias": ()}
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key; dropout for step s uses fold_in(rng, s)
    # LoRA: the frozen base encoder (no gradient, no optimiser state, never checkpointed); {}: none
    frozen: dict = flax.struct.field(default_factory=dict)


def encoder_params(state: TrainState) -> dict:
    """The whole encoder tree the modules apply: the trained params, with the frozen base under LoRA."""
    return lora.join(state.frozen, state.params["encoder"]) if state.frozen else state.params["encoder"]


# --- the objective -------------------------------------------------------------------------------

def objective(params: dict, q: jax.Array, d: jax.Array, batch: Batch, *, loss_cfg: ml_collections.ConfigDict,
              mesh: Mesh | None) -> tuple[jax.Array, Metrics]:
    """(params, [B, H] queries, [B, H] documents, batch) -> (loss, metrics) over the global batch.

    Apart from the encoder so that gradient caching can differentiate it with respect to the
    embeddings and t, b alone. `loss.impl` picks how: dense (below), or without any [B, B] matrix,
    row-blocked or as a ring over the devices (blocked_loss.py); all three give the same loss.
    """
    t = params["log_temperature"] if loss_cfg.learn_temperature else jax.lax.stop_gradient(params["log_temperature"])
    b = params["bias"] if loss_cfg.learn_bias else jax.lax.stop_gradient(params["bias"])
    refit = {}
    if logit_init.follow_mode(loss_cfg) == "refit":  # t, b at this encoder's optimum (logit_init.refit_in_step)
        t, b = logit_init.refit_in_step(loss_cfg, t, b, q, d, batch)
        refit = {REFIT_KEYS[0]: t, REFIT_KEYS[1]: b}
    impl = blocked_loss.choose_impl(loss_cfg, mesh, q.shape[0])
    if impl != "dense":
        loss, stats = blocked_loss.IMPL_FNS[impl](loss_cfg, mesh, t, b, q, d, batch)
        return loss, {"loss": loss, "log_temperature": t, "bias": b, **stats, **refit}
    scores = q @ d.T  # [B, B]: every query against every document of the global batch
    if mesh is not None:
        scores = jax.lax.with_sharding_constraint(scores, NamedSharding(mesh, P(parallel.BATCH_AXES, None)))
    logits = jnp.exp(t) * scores + b
    targets, labelled, mask = batch_targets(batch, loss_cfg)
    record = losses.get(loss_cfg.name)
    loss = record.dense(scores if record.reads_scores else logits, targets, mask, **record.settings(loss_cfg))
    stats = cell_stats.means(cell_stats.block_sums(logits, targets, labelled, mask))
    return loss, {"loss": loss, "log_temperature": t, "bias": b, **stats, **refit}


def embed(encoder: SentenceEncoder, use_dropout: bool, encoder_params: dict, ids: jax.Array, mask: jax.Array,
          rng: jax.Array) -> jax.Array:
    """Token ids -> [n, H] embeddings; dropout only if the model has it."""
    return encoder(encoder_params, ids, mask, dropout_rng=rng if use_dropout else None)


def loss_fn(params: dict, batch: Batch, rng: jax.Array, frozen: dict | None = None, *, encoder: SentenceEncoder,
            use_dropout: bool, loss_cfg: ml_collections.ConfigDict, mesh: Mesh | None) -> tuple[jax.Array, Metrics]:
    """(params, batch, dropout rng[, frozen LoRA base]) -> (loss, metrics): embed both sides, then the objective."""
    if frozen:  # LoRA: the adapters over the base, which enters as a constant
        params = {**params, "encoder": lora.join(frozen, params["encoder"])}
    q_rng, d_rng = jax.random.split(rng)
    # Under the mesh, the encoder keeps its activations split along the batch (bert.shard_batch).
    with contextlib.nullcontext() if mesh is None else jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        q = embed(encoder, use_dropout, params["encoder"], batch["query_input_ids"], batch["query_attention_mask"], q_rng)
        d = embed(encoder, use_dropout, params["encoder"], batch["doc_input_ids"], batch["doc_attention_mask"], d_rng)
    return make_objective(loss_cfg, mesh, encoder.normalize)(params, q, d, batch)


# --- the step ------------------------------------------------------------------------------------

def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, Metrics]:
    """One optimiser step; a non-finite loss or gradient leaves params and optimiser state as they were.

    The guard runs inside the jitted step (a select, no host sync); the host reads the
    `nonfinite` metric later and decides, by `train.on_nonfinite`, to log the skip or to stop.
    """
    rng = jax.random.fold_in(state.rng, state.step)
    if state.frozen:  # LoRA: differentiate the adapters (and t, b) only; the base is not an argument of the grad
        trained_fn = loss_fn
        loss_fn = lambda p, b, r: trained_fn(p, b, r, state.frozen)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if REFIT_KEYS[0] in metrics:  # loss.follow_logit_params='refit': this step's fit is the run's t, b
        refit = [metrics.pop(k) for k in REFIT_KEYS]
        params = {**params, "log_temperature": refit[0].astype(params["log_temperature"].dtype),
                  "bias": refit[1].astype(params["bias"].dtype)}
    keep_if_bad = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {**metrics, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
               "nonfinite": (~finite).astype(jnp.float32)}
    return state.replace(step=state.step + 1, params=keep_if_bad(params, state.params),
                         opt_state=keep_if_bad(opt_state, state.opt_state)), metrics


def make_embed_fn(encoder: SentenceEncoder, use_dropout: bool) -> Callable[..., jax.Array]:
    """`embed` bound to a model: (encoder params, ids, mask, rng) -> embeddings."""
    return functools.partial(embed, encoder, use_dropout)


def make_objective(loss_cfg: ml_collections.ConfigDict, mesh: Mesh | None,
                   normalize: bool = True) -> Callable[..., tuple[jax.Array, Metrics]]:
    """`objective` bound to a loss config: (params, q, d, batch) -> (loss, metrics); summed over the
    embeddings' prefixes with `loss.matryoshka_dims` (matryoshka.py; `normalize`: the encoder's, so
    prefixes are renormalised as its embeddings are)."""
    losses.get(loss_cfg.name)  # ConfigError for a name no loss is registered under
    logit_init.check_follow(loss_cfg)
    blocked_loss.check_impl(loss_cfg, mesh)
    return matryoshka.wrap_objective(functools.partial(objective, loss_cfg=loss_cfg, mesh=mesh), loss_cfg, normalize)


def make_loss_fn(encoder: SentenceEncoder, loss_cfg: ml_collections.ConfigDict, mesh: Mesh | None,
                 use_dropout: bool) -> LossFn:
    make_objective(loss_cfg, mesh)  # validates loss.name, loss.impl and loss.block_size
    return functools.partial(loss_fn, encoder=encoder, use_dropout=use_dropout, loss_cfg=loss_cfg, mesh=mesh)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    return functools.partial(train_step, loss_fn=loss_fn, tx=tx, schedule=schedule)


def jit_train_step(step_fn: Callable, mesh: Mesh, state: TrainState) -> Callable:
    """State keeps its layout in and out, batch split over the mesh, the old state's buffers donated."""
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(step_fn, in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated(mesh)), donate_argnums=0)


# --- optimiser and initial state -----------------------------------------------------------------

def make_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warm-up to the peak rate, then linear or cosine decay to `end_lr_fraction` of it."""
    peak, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.num_steps
    end = peak * cfg.end_lr_fraction
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(total, warmup + 1), end)
    if cfg.schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                     optax.linear_schedule(peak, end, max(total - warmup, 1))], [warmup])
    if cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                     optax.constant_schedule(peak)], [warmup])
    raise ConfigError(f"train.schedule {cfg.schedule!r} is not one of 'linear', 'cosine', 'constant'")


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices, embeddings and LoRA adapters only; never on biases, LayerNorm, t or b."""
    def decays(path: tuple, _) -> bool:
        names = [getattr(p, "key", None) for p in path]
        return names[0] == "encoder" and names[-1] in ("kernel", "embedding", "lora_a", "lora_b")
    return jax.tree_util.tree_map_with_path(decays, params)


def logit_params_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """t and b's own rate: the encoder's warm-up to `logit_params_lr`, then constant to the end.

    Absolute, not a multiple of the encoder's rate: Adam moves a scalar by about its rate a step,
    so at fine-tuning rates t and b could not follow the encoder (issue 23: 0.075 in 20 steps while
    the cosines' spread changed several-fold). Never decayed: the encoder keeps changing to the
    last step, and t and b must keep following it.
    """
    peak, warmup = cfg.logit_params_lr, cfg.warmup_steps
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                 optax.constant_schedule(peak)], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW in two groups: the encoder at `schedule`, and the logit scalars t and b at their own rate.

    `grad_clip_norm` (0: off) clips the encoder's gradients by the global norm of the encoder's
    gradients alone. t and b are not clipped: inside one shared norm their gradients (large under
    BiXSE, and dL/db = 0 under InfoNCE) would shrink the encoder's step by a loss-dependent factor,
    and Adam already bounds each scalar's step to a few times its rate whatever its gradient's size.
    t and b are never weight-decayed.
    """
    schedule = make_schedule(cfg)

    def adamw(lr: optax.ScalarOrSchedule, clip_norm: float | None) -> optax.GradientTransformation:
        clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
        return optax.chain(*clip, optax.adamw(lr, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                                              weight_decay=cfg.weight_decay, mask=_decay_mask))

    labels = lambda params: {k: "encoder" if k == "encoder" else "logit" for k in params}
    # Each group's transforms see only that group's leaves, so the clip's norm is the encoder's.
    per_group = optax.multi_transform(
        {"encoder": adamw(schedule, cfg.grad_clip_norm), "logit": adamw(logit_params_schedule(cfg), None)}, labels)
    return per_group, schedule


def init_state(encoder_params: dict, loss_cfg: ml_collections.ConfigDict,
               tx: optax.GradientTransformation, seed: int, frozen: dict | None = None) -> TrainState:
    """Step 0. LoRA: `encoder_params` are the adapters and `frozen` the base (models/lora.py split)."""
    params = {"encoder": jax.tree.map(jnp.asarray, encoder_params),
              "log_temperature": jnp.asarray(loss_cfg.init_log_temperature, jnp.float32),
              "bias": jnp.asarray(loss_cfg.init_bias, jnp.float32)}
    return TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed), frozen=jax.tree.map(jnp.asarray, frozen or {}))


def init_sharded_state(encoder_params: dict, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       mesh: Mesh, encoder_axes: Any = None, frozen: dict | None = None) -> TrainState:
    """The initial state laid out on the mesh: params by the logical axis rules, optimiser alike; a
    LoRA base (`frozen`) by the same rules, so adapters and their base weights split alike.

    `encoder_axes`: logical axis names the encoder's module declares (decoders); None: guessed."""
    state = init_state(encoder_params, config.loss, tx, config.seed)
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    shard = lambda tree: jax.device_put(tree, parallel.param_shardings(tree, mesh, rules, encoder_axes))
    params = shard(state.params)
    base = shard({"encoder": frozen})["encoder"] if frozen else {}
    replicate = lambda x: jax.device_put(x, parallel.replicated(mesh))
    # Moments take their parameter's sharding (XLA left to itself replicates them); counters are replicated.
    opt_state = jax.jit(tx.init, out_shardings=_opt_state_shardings(tx, params, mesh))(params)
    return TrainState(step=replicate(state.step), params=params, opt_state=opt_state, rng=replicate(state.rng),
                      frozen=base)


def _opt_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> Any:
    """Per optimiser-state leaf: the sharding of the parameter it mirrors (a leaf whose path ends with
    that parameter's path and has its shape, e.g. Adam's mu and nu), else replicated."""
    def names(path: tuple) -> tuple:
        return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)
    by_path = {names(path): x for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    replicated = parallel.replicated(mesh)

    def sharding(path: tuple, leaf: Any) -> Any:
        key = names(path)
        for i in range(len(key)):
            param = by_path.get(key[i:])
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated
    return jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(tx.init, params))
