"""Gradient caching (GradCache, Gao et al. 2021): contrastive batches larger than activation memory.

BiXSE couples every query with every document of the global batch, so the batch cannot be cut
into independent micro-batches whose gradients are summed. GradCache cuts the computation instead:

  1. embed the batch in sub-batches of `chunk` pairs, keeping no activations (no autodiff);
  2. the loss, and its gradient with respect to the [B, H] embeddings and t, b, over the whole
     global batch (cheap: B x B scores, no encoder);
  3. re-embed each sub-batch under `jax.vjp` and pull the cached embedding gradients back to the
     encoder parameters, summing over sub-batches in a `lax.scan`.

Peak activation memory is one sub-batch's; the price is one more forward pass (~4/3 the FLOPs).
The gradient equals plain backprop through the same sub-batched forward pass up to float rounding,
dropout included: sub-batch j on device r draws `fold_in(fold_in(key, j), r)` in both passes (so
not the plain step's dropout sample, which draws one key for the whole batch).

Layout: the batch is split over every device (`parallel.BATCH_AXES`), device r holding rows
[r B/n, (r+1) B/n). Both passes run under `shard_map`: each device cuts *its own* rows into B/chunk
sub-batches of chunk/n rows (no data moves between devices) and accumulates its own gradient.
FSDP: given the parameters' PartitionSpecs (`encoder_specs`, `param_specs(state)`), both passes take
each device's *shards* and gather them inside each sub-batch, so the gather's transpose
reduce-scatters each sub-batch's gradient into the parameters' layout; only the axes a leaf is not
split over are summed at the end (whole parameters instead made XLA plan several whole-model float32
buffers a device: docs/benchmarks.md, "Decoder LLMs"). LoRA: the frozen base (`frozen`,
`frozen_specs`) is gathered alike and joined to the adapters; only the adapters are differentiated.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from bixse_jax import parallel, step
from bixse_jax.errors import ConfigError
from bixse_jax.models import lora

Specs = Any  # a tree of PartitionSpecs shaped like the encoder parameters, or None (whole everywhere)
EmbedFn = Callable[[dict, jax.Array, jax.Array, jax.Array], jax.Array]
EmbeddingLossFn = Callable[[dict, jax.Array, jax.Array, step.Batch], tuple[jax.Array, step.Metrics]]

_INPUTS = ("query_input_ids", "query_attention_mask", "doc_input_ids", "doc_attention_mask")


def check_chunk(global_batch_size: int, chunk: int, mesh: Mesh | None) -> int:
    """The number of sub-batches; a clear error unless `chunk` splits the batch over all devices.

    Call it before training starts so that a bad `train.grad_cache_chunk` fails before anything
    is written; the step calls it again on the batch's actual shape.
    """
    devices = parallel.batch_shards(mesh)
    if chunk <= 0:
        raise ConfigError(f"train.grad_cache_chunk={chunk}: a gradient-caching sub-batch needs at "
                         "least one pair (0 turns caching off)")
    if global_batch_size % chunk:
        raise ConfigError(f"train.grad_cache_chunk={chunk} does not divide the global batch of "
                         f"{global_batch_size} pairs (train.global_batch_size)")
    if chunk % devices:
        raise ConfigError(f"train.grad_cache_chunk={chunk} is not a multiple of the {devices} devices "
                         "that split the batch, so a sub-batch cannot be spread over all of them")
    return global_batch_size // chunk


def _sub_batch_key(side_rng: jax.Array, j: jax.Array, mesh: Mesh | None) -> jax.Array:
    """Dropout key of sub-batch j on this device: the same in the forward and the vjp pass."""
    device = jnp.int32(0) if mesh is None else jax.lax.axis_index(parallel.batch_axes(mesh))
    return jax.random.fold_in(jax.random.fold_in(side_rng, j), device)


def _split(x: jax.Array, num_chunks: int) -> jax.Array:
    """This device's rows [b, ...] -> [num_chunks, b / num_chunks, ...] (row j*c + i is [j, i])."""
    return x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:])


def _merge(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _embed_pair(embed: EmbedFn, encoder_params: dict, q_rng: jax.Array, d_rng: jax.Array,
                mesh: Mesh | None, j: jax.Array, qi: jax.Array, qm: jax.Array, di: jax.Array,
                dm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Query and document embeddings of sub-batch j, with its own dropout keys."""
    return (embed(encoder_params, qi, qm, _sub_batch_key(q_rng, j, mesh)),
            embed(encoder_params, di, dm, _sub_batch_key(d_rng, j, mesh)))


def _whole(params: dict, specs: Specs, frozen: dict, frozen_specs: Specs) -> dict:
    """The whole encoder tree a sub-batch applies: the trained parameters and (LoRA) the frozen base, gathered."""
    whole = _gather(params, specs)
    return lora.join(_gather(frozen, frozen_specs), whole) if frozen else whole


def param_specs(encoder_params: Any) -> Specs:
    """The PartitionSpec of every encoder parameter (arrays or ShapeDtypeStructs laid out on a mesh)."""
    return jax.tree.map(lambda x: getattr(getattr(x, "sharding", None), "spec", P()), encoder_params)


_is_spec = lambda x: isinstance(x, P)  # noqa: E731 (PartitionSpecs are tuples: tree maps stop at them)


def _spec_axes(spec: P) -> set[str]:
    """The mesh axes a PartitionSpec splits over."""
    return {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}


def _on_devices(fn: Callable, mesh: Mesh | None, in_specs: tuple, out_specs) -> Callable:
    """`fn` on each device's rows of the batch (shard_map), or as it is without a mesh.

    Specs say "rows" for arrays split on the batch dimension and "whole" for replicated ones;
    a tree of PartitionSpecs (the parameters' shards) stands as it is.
    """
    if mesh is None:
        return fn
    spec = lambda x: x if _is_spec(x) else P(parallel.batch_axes(mesh)) if x == "rows" else P()
    specs = jax.tree.map(spec, (in_specs, out_specs), is_leaf=_is_spec)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs[0], out_specs=specs[1])


def _gather(shards: dict, specs: Specs) -> dict:
    """This device's parameter shards -> whole parameters (tiled all-gathers; their transpose is a
    reduce-scatter, so gradients come back in the shards' layout). No specs: already whole."""
    if specs is None:
        return shards

    def whole(spec: P, x: jax.Array) -> jax.Array:
        for dim, axes in enumerate(spec):
            if axes is not None:
                x = jax.lax.all_gather(x, axes, axis=dim, tiled=True)
        return x
    return jax.tree.map(whole, specs, shards, is_leaf=_is_spec)


def _varying(tree, mesh: Mesh | None):
    """Marks values as per-device on every batch axis (those they do not vary over yet), so their
    cotangents are not all-reduced per use."""
    if mesh is None:
        return tree
    cast = getattr(jax.lax, "pcast", None)

    def one(x):
        aval = jax.typeof(x)  # the axes x already varies over: `vma` in older jax
        varying = aval.manual_axis_type.varying if hasattr(aval, "manual_axis_type") else getattr(aval, "vma", ())
        axes = tuple(a for a in parallel.batch_axes(mesh) if a not in varying)
        if not axes:
            return x
        return cast(x, axes, to="varying") if cast is not None else jax.lax.pvary(x, axes)  # older jax spelling
    return jax.tree.map(one, tree)


def _sum_over_devices(grads: dict, specs: Specs, mesh: Mesh) -> dict:
    """Per-device partial gradients -> the gradient: summed over the batch axes each leaf's gather
    has not already reduce-scattered over."""
    if specs is None:
        return jax.lax.psum(grads, parallel.batch_axes(mesh))

    def one(spec: P, g: jax.Array) -> jax.Array:
        axes = tuple(a for a in parallel.batch_axes(mesh) if a not in _spec_axes(spec))
        return jax.lax.psum(g, axes) if axes else g
    return jax.tree.map(one, specs, grads, is_leaf=_is_spec)


def make_chunked_embed(embed: EmbedFn, *, chunk: int, mesh: Mesh | None, encoder_specs: Specs = None,
                       frozen_specs: Specs = None) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """(encoder params, batch, dropout rng[, frozen base]) -> ([B, H] queries, [B, H] documents), by sub-batch.

    Differentiable: plain backprop through it is the reference that the cached gradient equals
    (it keeps every sub-batch's activations, so it saves no memory).
    """
    def local(encoder_params, frozen, inputs, q_rng, d_rng):
        num_chunks = check_chunk(inputs[0].shape[0] * parallel.batch_shards(mesh), chunk, mesh)
        xs = (jnp.arange(num_chunks),) + tuple(_split(x, num_chunks) for x in inputs)
        q, d = jax.lax.map(lambda a: _embed_pair(embed, _whole(encoder_params, specs, frozen, fspecs), q_rng, d_rng,
                                                 mesh, *a), xs)
        return _merge(q), _merge(d)

    specs, fspecs = (encoder_specs, frozen_specs) if mesh is not None else (None, None)
    sharded = _on_devices(local, mesh, (specs or "whole", fspecs or "whole", ("rows",) * 4, "whole", "whole"),
                          ("rows", "rows"))

    def chunked_embed(encoder_params, batch, dropout_rng, frozen=None):
        q_rng, d_rng = jax.random.split(dropout_rng)
        return sharded(encoder_params, frozen or {}, tuple(batch[k] for k in _INPUTS), q_rng, d_rng)

    return chunked_embed


def make_encoder_vjp(embed: EmbedFn, *, chunk: int, mesh: Mesh | None, encoder_specs: Specs = None,
                     frozen_specs: Specs = None) -> Callable[..., dict]:
    """(encoder params, batch, dropout rng, dL/dq [B, H], dL/dd [B, H][, frozen base]) -> dL/d(encoder params).

    Re-embeds one sub-batch at a time under `jax.vjp` (only its activations live), applies the
    cached embedding cotangents, and sums the parameter gradients: per device over its
    sub-batches (reduce-scattered into the parameters' layout per sub-batch when `encoder_specs`
    are given), then once over the devices still to add.
    """
    def local(encoder_params, frozen, inputs, q_rng, d_rng, g_q, g_d):
        num_chunks = check_chunk(inputs[0].shape[0] * parallel.batch_shards(mesh), chunk, mesh)
        params = _varying(encoder_params, mesh)  # this device's partial gradient, summed at the end
        xs = (jnp.arange(num_chunks),) + tuple(_split(x, num_chunks) for x in (*inputs, g_q, g_d))

        def accumulate(total, x):
            j, qi, qm, di, dm, gq, gd = x
            out, pullback = jax.vjp(
                lambda p: _embed_pair(embed, _whole(p, specs, frozen, fspecs), q_rng, d_rng, mesh, j, qi, qm, di, dm),
                params)
            (grad,) = pullback((gq.astype(out[0].dtype), gd.astype(out[1].dtype)))
            return jax.tree.map(jnp.add, total, grad), None

        total, _ = jax.lax.scan(accumulate, jax.tree.map(jnp.zeros_like, params), xs)
        return total if mesh is None else _sum_over_devices(total, specs, mesh)

    specs, fspecs = (encoder_specs, frozen_specs) if mesh is not None else (None, None)
    sharded = _on_devices(local, mesh, (specs or "whole", fspecs or "whole", ("rows",) * 4, "whole", "whole", "rows",
                                        "rows"), specs or "whole")

    def encoder_vjp(encoder_params, batch, dropout_rng, g_q, g_d, frozen=None):
        q_rng, d_rng = jax.random.split(dropout_rng)
        return sharded(encoder_params, frozen or {}, tuple(batch[k] for k in _INPUTS), q_rng, d_rng, g_q, g_d)

    return encoder_vjp


def make_cached_value_and_grad(embed: EmbedFn, embedding_loss: EmbeddingLossFn, *, chunk: int,
                               mesh: Mesh | None, encoder_specs: Specs = None, frozen_specs: Specs = None
                               ) -> Callable[..., tuple[tuple[jax.Array, step.Metrics], dict]]:
    """(params, batch, dropout rng[, frozen]) -> ((loss, metrics), grads), as `jax.value_and_grad(loss_fn, has_aux=True)`."""
    kw = {"chunk": chunk, "mesh": mesh, "encoder_specs": encoder_specs, "frozen_specs": frozen_specs}
    chunked_embed, encoder_vjp = make_chunked_embed(embed, **kw), make_encoder_vjp(embed, **kw)

    def value_and_grad(params, batch, dropout_rng, frozen=None):
        check_chunk(batch["query_input_ids"].shape[0], chunk, mesh)
        q, d = chunked_embed(params["encoder"], batch, dropout_rng, frozen)  # pass 1: no activations kept
        logit_params = {k: v for k, v in params.items() if k != "encoder"}
        loss_of = lambda lp, q, d: embedding_loss(lp, q, d, batch)
        (loss, metrics), (g_logit, g_q, g_d) = jax.value_and_grad(loss_of, argnums=(0, 1, 2), has_aux=True)(
            logit_params, q, d)
        g_encoder = encoder_vjp(params["encoder"], batch, dropout_rng, g_q, g_d, frozen)  # pass 2
        return (loss, metrics), {**g_logit, "encoder": g_encoder}

    return value_and_grad


def make_cached_loss_fn(embed: EmbedFn, embedding_loss: EmbeddingLossFn, *, chunk: int,
                        mesh: Mesh | None, encoder_specs: Specs = None, frozen_specs: Specs = None) -> step.LossFn:
    """A drop-in for `step.make_loss_fn(...)` whose gradient is computed by gradient caching.

    A `jax.custom_vjp`: the forward pass of `jax.grad` runs both GradCache passes and keeps only
    the parameter gradient as residual; the backward pass scales it by the loss cotangent. Called
    without differentiation it is pass 1 and the loss alone. `encoder_specs`: the parameters'
    PartitionSpecs (`param_specs`) on an FSDP mesh; gradients then accumulate sharded. LoRA: the
    frozen base comes as a fourth argument (`frozen_specs` its PartitionSpecs), never differentiated.
    """
    kw = {"chunk": chunk, "mesh": mesh, "encoder_specs": encoder_specs, "frozen_specs": frozen_specs}
    chunked_embed, value_and_grad = make_chunked_embed(embed, **kw), make_cached_value_and_grad(embed, embedding_loss, **kw)

    @jax.custom_vjp
    def cached(params, batch, dropout_rng, frozen):
        check_chunk(batch["query_input_ids"].shape[0], chunk, mesh)
        q, d = chunked_embed(params["encoder"], batch, dropout_rng, frozen)
        return embedding_loss(params, q, d, batch)

    def forward(params, batch, dropout_rng, frozen):
        out, grads = value_and_grad(params, batch, dropout_rng, frozen)
        return out, (grads, batch, dropout_rng, frozen)

    def backward(residuals, cotangent):
        grads, *inputs = residuals
        loss_cotangent = cotangent[0]
        no_grad = lambda tree: jax.tree.map(lambda x: None, tree)  # batch, rng and the base are inputs, not variables
        return (jax.tree.map(lambda g: g * loss_cotangent.astype(g.dtype), grads), *map(no_grad, inputs))

    cached.defvjp(forward, backward)
    return lambda params, batch, dropout_rng, frozen=None: cached(params, batch, dropout_rng, frozen or {})


def make_chunked_loss_fn(embed: EmbedFn, embedding_loss: EmbeddingLossFn, *, chunk: int, mesh: Mesh | None,
                         encoder_specs: Specs = None, frozen_specs: Specs = None) -> step.LossFn:
    """Plain backprop through the sub-batched forward pass: what the cached loss fn computes, without caching."""
    chunked_embed = make_chunked_embed(embed, chunk=chunk, mesh=mesh, encoder_specs=encoder_specs, frozen_specs=frozen_specs)

    def loss_fn(params, batch, dropout_rng, frozen=None):
        check_chunk(batch["query_input_ids"].shape[0], chunk, mesh)
        q, d = chunked_embed(params["encoder"], batch, dropout_rng, frozen)
        return embedding_loss(params, q, d, batch)

    return loss_fn


def make_cached_train_step(embed: EmbedFn, embedding_loss: EmbeddingLossFn, tx: optax.GradientTransformation,
                           schedule: optax.Schedule, *, chunk: int, mesh: Mesh | None, encoder_specs: Specs = None,
                           frozen_specs: Specs = None
                           ) -> Callable[[step.TrainState, step.Batch], tuple[step.TrainState, step.Metrics]]:
    """`step.make_train_step` over the cached loss fn: same state, metrics and update; jit with `step.jit_train_step`.
    On an FSDP mesh pass `encoder_specs=param_specs(state.params["encoder"])` (LoRA: and `param_specs(state.frozen)`)."""
    return step.make_train_step(make_cached_loss_fn(embed, embedding_loss, chunk=chunk, mesh=mesh,
                                                    encoder_specs=encoder_specs, frozen_specs=frozen_specs), tx, schedule)
