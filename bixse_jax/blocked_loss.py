"""The in-batch loss without a [B, B] matrix: row-blocked on one device, a ring over devices.

The dense objective (step.objective) forms the [B, B] scores, targets, mask and their gradients
whole: XLA plans ~21 bytes a cell for the loss and its gradient alone, 91 GB at B = 65,536
(docs/benchmarks.md). Two other ways to compute the same loss:

* `blocked` (one device): rows in blocks of `loss.block_size` through `lax.map`; a block holds
  its [block, B] logits, targets and mask, and each block body is rematerialised in the backward
  pass (`jax.checkpoint`), so the gradient keeps no per-block residual either. A batch the block
  does not divide is padded with rows that are masked out.
* `ring` (a mesh): the batch is split over parallel.BATCH_AXES as everywhere; each device keeps
  its B/n queries, and the documents (embeddings, ids, global column index) go round the ring
  with `ppermute` inside `shard_map`, as in big_vision's chunked sigmoid loss. As a shard passes,
  the device's rows meet it in chunks of `loss.block_size` rows, each [chunk, B/n] block folded
  into per-row statistics. The gradient is a `custom_vjp` that goes round the ring once more,
  recomputing each block: dL/dq accumulates in place and dL/dd travels with its shard and arrives
  home after n hops. Per-device memory is O(min(block, B/n) x B/n + B/n x H) plus the O(B) pair
  table; nothing B x B exists anywhere, and no all-gather of the embeddings.

Targets come from targets.py's sorted pair table (targets.block_cells), so no [B, B] id grid either.
Which losses have which form, and their per-row and ring forms, is each loss's record
(losses.registry): bixse (a sum over its cells, so the ring fold is derived), infonce and
graded_infonce (per-row logsumexp: whole rows when blocked, online across shards on the ring) and
pairwise_bce (blocked only). Metric outputs carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from bixse_jax import cell_stats, losses, parallel
from bixse_jax.errors import ConfigError
from bixse_jax.losses.numerics import prepare
from bixse_jax.targets import PairTable, Rows, block_cells, first_rows, pair_table, repeated_queries

IMPLS = ("auto", "dense", "blocked", "ring")


def check_impl(cfg: ml_collections.ConfigDict, mesh: Mesh | None) -> None:
    """ConfigError for an impl / loss / mesh combination that cannot run."""
    if cfg.impl not in IMPLS:
        raise ConfigError(f"loss.impl {cfg.impl!r} is not one of {list(IMPLS)}")
    if cfg.block_size < 1:
        raise ConfigError(f"loss.block_size={cfg.block_size}: a row block needs at least one row")
    if cfg.impl in ("blocked", "ring") and cfg.impl not in losses.get(cfg.name).impls:
        supported = losses.supporting(cfg.impl)
        raise ConfigError(f"loss.impl={cfg.impl!r} supports loss.name in {list(supported)}, not {cfg.name!r}; "
                          "use loss.impl='dense' (or 'auto')")
    if cfg.impl == "ring" and mesh is None:
        raise ConfigError("loss.impl='ring' runs over a device mesh; without one use 'blocked' or 'auto'")


def choose_impl(cfg: ml_collections.ConfigDict, mesh: Mesh | None, batch_size: int) -> str:
    """`auto`: dense while the batch fits in one block (its [B, B] matrices are then no larger than a
    block's, and one fused matmul is the fastest way to them); beyond that the ring when the batch is
    split over several devices (no device then holds more than [block, B/n]), else row blocks; dense
    for a loss that has no other impl."""
    check_impl(cfg, mesh)
    if cfg.impl != "auto":
        return cfg.impl
    if batch_size <= cfg.block_size:
        return "dense"
    impls = losses.get(cfg.name).impls
    if parallel.batch_shards(mesh) > 1 and "ring" in impls:
        return "ring"
    if "blocked" in impls:
        return "blocked"
    return "dense"


# --- the blocks ----------------------------------------------------------------------------------

def blocked_loss(cfg: ml_collections.ConfigDict, t: jax.Array, b: jax.Array, q: jax.Array, d: jax.Array,
                 batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, cell_stats metrics) over rows in blocks of cfg.block_size; one device."""
    n = q.shape[0]
    block = min(cfg.block_size, n)
    num_blocks = -(-n // block)
    record = losses.get(cfg.name)
    settings = record.settings(cfg)
    table = pair_table(batch["query_ids"], batch["doc_ids"], batch["grades"])
    rows = first_rows(batch, table, n)
    pad = lambda x: jnp.pad(x, [(0, num_blocks * block - n)] + [(0, 0)] * (x.ndim - 1))
    xs = jax.tree.map(lambda x: pad(x).reshape((num_blocks, block) + x.shape[1:]), (q, rows))
    scale, col_index = jnp.exp(t), jnp.arange(n, dtype=jnp.int32)

    @jax.checkpoint  # the backward pass recomputes a block instead of keeping its [block, B] residuals
    def one_block(x):
        q_block, block_rows = x
        logits = scale * (q_block @ d.T) + b
        targets, labelled, mask = block_cells(cfg, table, block_rows, batch["doc_ids"], col_index)
        value, included = record.rows(logits, targets, mask, **settings)
        return value, included, cell_stats.block_sums(logits, targets, labelled, mask)

    values, included, stats = jax.lax.map(one_block, xs)
    total = jnp.sum(jnp.where(included, values, 0.0)) / jnp.maximum(jnp.sum(included.astype(jnp.float32)), 1.0)
    return total, cell_stats.means(jax.tree.map(jnp.sum, stats))


# --- the ring ------------------------------------------------------------------------------------

def _ring_block(cfg, t, b, q, table, rows, shard):
    """scores, logits, prepared logits, targets, labelled, mask of some of this device's rows x one shard."""
    d_s, did_s, idx_s = shard[:3]
    scores = q @ d_s.T
    logits = jnp.exp(t) * scores + b
    targets, labelled, mask = block_cells(cfg, table, rows, did_s, idx_s)
    l, targets, mask = prepare(logits, targets, mask)
    return scores, logits, l, targets, labelled, mask


def ring_loss(cfg: ml_collections.ConfigDict, mesh: Mesh, t: jax.Array, b: jax.Array, q: jax.Array,
              d: jax.Array, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, cell_stats metrics), documents passed round the devices of the batch axes.

    A device's rows meet each passing shard in chunks of loss.block_size rows (padded), so no
    device holds more than [block_size, B/n] of any cell-wise array.
    """
    record = losses.get(cfg.name)
    fold, settings = record.ring_fold(), record.settings(cfg)
    axes, n_dev = parallel.batch_axes(mesh), parallel.batch_shards(mesh)
    perm = [(i, (i + 1) % n_dev) for i in range(n_dev)]
    hop = lambda tree: jax.tree.map(lambda x: jax.lax.ppermute(x, axes, perm), tree)
    table = pair_table(batch["query_ids"], batch["doc_ids"], batch["grades"])
    index = jnp.arange(q.shape[0], dtype=jnp.int32)
    # Per-pair inputs that are not differentiated: this device's rows, its documents' ids, the table.
    aux = ((batch["query_ids"], index, batch["grades"], repeated_queries(table, batch["query_ids"])),
           batch["doc_ids"], tuple(table))
    rows_spec, whole = P(axes), P()
    aux_spec = ((rows_spec,) * 4, rows_spec, (whole,) * 3)
    sharded = lambda fn, ins, outs: jax.shard_map(fn, mesh=mesh, in_specs=ins, out_specs=outs, check_vma=False)
    local = q.shape[0] // n_dev
    chunk = min(cfg.block_size, local)
    num_chunks = -(-local // chunk)
    split = lambda x: jnp.pad(x, [(0, num_chunks * chunk - local)] + [(0, 0)] * (x.ndim - 1)).reshape(
        (num_chunks, chunk) + x.shape[1:])  # this device's rows -> [chunks, chunk, ...], padding invalid
    merge = lambda x: x.reshape((num_chunks * chunk,) + x.shape[2:])[:local]

    def unpack(q, aux):
        (qid, idx, grades, rep), did, tbl = aux
        rows = Rows(qid, idx, grades, rep, jnp.ones(qid.shape, jnp.bool_))
        return split(q), jax.tree.map(split, rows), did, PairTable(*tbl)

    def forward_local(t, b, q, d, aux):
        q_chunks, row_chunks, did, table = unpack(q, aux)
        acc0 = fold.init((num_chunks, chunk))

        def step(carry, _):
            shard, acc, stats = carry

            def one_chunk(stats, x):
                q_c, rows_c, acc_c = x
                _, logits, l, targets, labelled, mask = _ring_block(cfg, t, b, q_c, table, rows_c, shard)
                stats = cell_stats.add(stats, cell_stats.block_sums(logits, targets, labelled, mask))
                return stats, fold.fold(acc_c, l, targets, mask, **settings)

            stats, acc = jax.lax.scan(one_chunk, stats, (q_chunks, row_chunks, acc))
            return (hop(shard), acc, stats), None

        init = ((d, did, aux[0][1]), acc0, cell_stats.zeros())
        (_, acc, stats), _ = jax.lax.scan(step, init, None, length=n_dev)
        per_row, included, residuals = fold.finish(jax.tree.map(merge, acc))
        total = jax.lax.psum(jnp.sum(jnp.where(included, per_row, 0.0)), axes)
        count = jax.lax.psum(jnp.sum(included.astype(jnp.float32)), axes)
        return total / jnp.maximum(count, 1.0), jax.lax.psum(stats, axes), residuals, count

    def backward_local(t, b, q, d, aux, residuals, count, g):
        q_chunks, row_chunks, did, table = unpack(q, aux)
        scale, weight = jnp.exp(t), g / jnp.maximum(count, 1.0)

        def step(carry, _):
            shard, g_q, g_t, g_b = carry

            def one_chunk(acc, x):
                g_d, g_t, g_b = acc
                q_c, rows_c, residuals_c = x
                scores, _, l, targets, _, mask = _ring_block(cfg, t, b, q_c, table, rows_c, shard)
                g_l = weight * fold.grad(l, targets, mask, residuals_c, **settings)
                g_s = scale * g_l
                return (g_d + g_s.T @ q_c, g_t + jnp.sum(g_s * scores), g_b + jnp.sum(g_l)), g_s @ shard[0]

            (g_d, g_t, g_b), g_q_chunks = jax.lax.scan(one_chunk, (shard[3], g_t, g_b),
                                                       (q_chunks, row_chunks, jax.tree.map(split, residuals)))
            shard = shard[:3] + (g_d,)  # dL/dd travels with its documents
            return (hop(shard), g_q + merge(g_q_chunks), g_t, g_b), None

        init = ((d, did, aux[0][1], jnp.zeros_like(d)), jnp.zeros_like(q), jnp.float32(0), jnp.float32(0))
        (shard, g_q, g_t, g_b), _ = jax.lax.scan(step, init, None, length=n_dev)  # n hops: g_d is home
        return jax.lax.psum(g_t, axes), jax.lax.psum(g_b, axes), g_q, shard[3]

    ins = (whole, whole, rows_spec, rows_spec, aux_spec)
    forward = sharded(forward_local, ins, (whole, (whole,) * len(cell_stats.zeros()), rows_spec, whole))  # rows_spec: every residual
    backward = sharded(backward_local, ins + (rows_spec, whole, whole),
                       (whole, whole, rows_spec, rows_spec))

    @jax.custom_vjp
    def loss_of(t, b, q, d, aux):
        return forward(t, b, q, d, aux)[:2]

    def fwd(t, b, q, d, aux):
        loss, stats, residuals, count = forward(t, b, q, d, aux)
        return (loss, stats), (t, b, q, d, aux, residuals, count)

    def bwd(res, cotangent):  # the metric sums' cotangent is dropped: metrics carry no gradient
        t, b, q, d, aux, residuals, count = res
        g_t, g_b, g_q, g_d = backward(t, b, q, d, aux, residuals, count, cotangent[0])
        return g_t, g_b, g_q, g_d, jax.tree.map(lambda _: None, aux)

    loss_of.defvjp(fwd, bwd)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, stats = loss_of(f32(t), f32(b), f32(q), f32(d), aux)
    return loss, cell_stats.means(jax.lax.stop_gradient(stats))


IMPL_FNS = {"blocked": lambda cfg, mesh, *args: blocked_loss(cfg, *args), "ring": ring_loss}
