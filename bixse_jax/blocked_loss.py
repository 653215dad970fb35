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

Targets come from a table of the batch's (query id, doc id, grade) pairs sorted by id, not from a
[B, B] id grid: cell (i, j) is labelled iff the table holds (query_id[i], doc_id[j]), found by a
vectorised binary search over the table; duplicates keep the max grade (sorted first), as
targets.graded_targets does.

Losses: bixse, infonce and graded_infonce (per-row logsumexp: whole rows when blocked, online across
shards on the ring; the two differ only in their positives' weights, `softmax_weights`) and pairwise_bce (blocked only, its pair grid per row in [B, block] chunks: its pairs compare
cells of one row, which on the ring live on every device; a ring would need every pair of shards
to meet, so it is refused there). soft_infonce and margin_mse stay dense-only. Metric outputs carry no gradient.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P

from bixse_jax import parallel
from bixse_jax.errors import ConfigError
from bixse_jax.losses import _masked_log_softmax, _prepare

IMPLS = ("auto", "dense", "blocked", "ring")
BLOCKED_LOSSES = ("bixse", "infonce", "graded_infonce", "pairwise_bce")
RING_LOSSES = ("bixse", "infonce", "graded_infonce")
Stats = tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # (positive sum, count, negative sum, count)


def batch_shards(mesh: Mesh | None) -> int:
    """Devices the batch is split over (1 without a mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in _axes(mesh))


def _axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in parallel.BATCH_AXES if a in mesh.axis_names)


def check_impl(cfg: ml_collections.ConfigDict, mesh: Mesh | None) -> None:
    """ConfigError for an impl / loss / mesh combination that cannot run."""
    if cfg.impl not in IMPLS:
        raise ConfigError(f"loss.impl {cfg.impl!r} is not one of {list(IMPLS)}")
    if cfg.block_size < 1:
        raise ConfigError(f"loss.block_size={cfg.block_size}: a row block needs at least one row")
    supported = {"blocked": BLOCKED_LOSSES, "ring": RING_LOSSES}.get(cfg.impl)
    if supported is not None and cfg.name not in supported:
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
    if batch_shards(mesh) > 1 and cfg.name in RING_LOSSES:
        return "ring"
    if cfg.name in BLOCKED_LOSSES:
        return "blocked"
    return "dense"


# --- targets from a sorted pair table ------------------------------------------------------------

class PairTable(NamedTuple):
    """The batch's pairs sorted by (query id, doc id, grade descending)."""
    query_ids: jax.Array
    doc_ids: jax.Array
    grades: jax.Array


def pair_table(query_ids: jax.Array, doc_ids: jax.Array, grades: jax.Array) -> PairTable:
    q, d, neg = jax.lax.sort((query_ids, doc_ids, -grades.astype(jnp.float32)), num_keys=3)
    return PairTable(q, d, -neg)


def lookup(table: PairTable, row_query_ids: jax.Array, col_doc_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(grade [r, c] float32, labelled [r, c] bool) of every (row query, column doc) cell.

    A lower-bound binary search over the table, vectorised over the cells: log2(B) gathers of
    [r, c] indices; the first match of duplicates holds the max grade.
    """
    n = table.query_ids.shape[0]
    qi, dj = row_query_ids[:, None], col_doc_ids[None, :]
    shape = (row_query_ids.shape[0], col_doc_ids.shape[0])

    def halve(_, bounds):
        lo, hi = bounds
        active = lo < hi
        mid = jnp.minimum((lo + hi) // 2, n - 1)
        mq, md = table.query_ids[mid], table.doc_ids[mid]
        less = (mq < qi) | ((mq == qi) & (md < dj))
        return jnp.where(active & less, mid + 1, lo), jnp.where(active & ~less, mid, hi)

    lo, _ = jax.lax.fori_loop(0, n.bit_length(), halve,
                              (jnp.zeros(shape, jnp.int32), jnp.full(shape, n, jnp.int32)))
    pos = jnp.minimum(lo, n - 1)
    found = (lo < n) & (table.query_ids[pos] == qi) & (table.doc_ids[pos] == dj)
    return jnp.where(found, table.grades[pos], 0.0), found


def repeated_queries(table: PairTable, query_ids: jax.Array) -> jax.Array:
    """Bool per row: its query id occurs more than once in the batch."""
    right = jnp.searchsorted(table.query_ids, query_ids, side="right")
    return right - jnp.searchsorted(table.query_ids, query_ids, side="left") > 1


class Rows(NamedTuple):
    query_ids: jax.Array  # [r]
    index: jax.Array  # [r] global pair index
    grades: jax.Array  # [r] the row's own pair grade (diagonal_only)
    repeated: jax.Array  # [r] bool
    valid: jax.Array  # [r] bool; False for padding rows


def cells(cfg: ml_collections.ConfigDict, table: PairTable, rows: Rows, col_doc_ids: jax.Array,
          col_index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(targets, labelled, mask) [r, c] of a block: step.batch_targets, restricted to the block."""
    if cfg.diagonal_only:
        labelled = rows.index[:, None] == col_index[None, :]
        targets = jnp.where(labelled, rows.grades[:, None].astype(jnp.float32), 0.0)
    else:
        targets, labelled = lookup(table, rows.query_ids, col_doc_ids)
    if cfg.binarize_threshold is not None:
        targets = (targets >= cfg.binarize_threshold).astype(jnp.float32) * labelled
    mask = jnp.broadcast_to(rows.valid[:, None], targets.shape)
    if cfg.mask_unlabelled_of_repeated_queries:
        mask = mask & (~rows.repeated[:, None] | labelled)
    return targets, labelled, mask


def block_stats(logits: jax.Array, targets: jax.Array, labelled: jax.Array, mask: jax.Array) -> Stats:
    """Sums and counts of the positive_logit / negative_logit metrics over a block."""
    positive, negative = labelled & (targets > 0) & mask, mask & ~labelled
    total = lambda where: (jnp.sum(jnp.where(where, logits, 0.0)), jnp.sum(where.astype(jnp.float32)))
    return total(positive) + total(negative)


def _mean_stats(stats: Stats) -> tuple[jax.Array, jax.Array]:
    pos, n_pos, neg, n_neg = stats
    return pos / jnp.maximum(n_pos, 1.0), neg / jnp.maximum(n_neg, 1.0)


# --- per-row losses over whole rows (blocked) ----------------------------------------------------

def _bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.where(logits >= 0, (1.0 - targets) * logits + jax.nn.softplus(-logits),
                     -targets * logits + jax.nn.softplus(logits))


def rows_bixse(cfg, logits, targets, mask):
    """(per-row value, row included) such that the loss is sum(value of included) / #included."""
    logits, targets, mask = _prepare(logits, targets, mask)
    return jnp.sum(jnp.where(mask, _bce(logits, targets), 0.0), axis=-1), jnp.any(mask, axis=-1)


def softmax_weights(cfg, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(positive cells, their weights) of the softmax losses: infonce's grade >= threshold, weight 1;
    graded_infonce's grade > 0, weight the grade (losses.graded_infonce)."""
    if cfg.name == "graded_infonce":
        pos = (targets > 0) & mask
        return pos, jnp.where(pos, targets, 0.0)
    pos = (targets >= cfg.infonce_threshold) & mask
    return pos, pos.astype(jnp.float32)


def rows_infonce(cfg, logits, targets, mask):
    """infonce or graded_infonce per row: -(1 / n_pos) sum of weight * log-softmax over the positives."""
    logits, targets, mask = _prepare(logits, targets, mask)
    pos, weight = softmax_weights(cfg, targets, mask)
    n_pos = jnp.sum(pos.astype(jnp.float32), axis=-1)
    logp = _masked_log_softmax(logits, mask)
    return -jnp.sum(weight * logp, axis=-1) / jnp.maximum(n_pos, 1.0), n_pos > 0


def rows_pairwise_bce(cfg, logits, targets, mask):
    """RankNet per row, the pair grid of one row cut into [B, block] column chunks."""
    logits, targets, mask = _prepare(logits, targets, mask)
    b = logits.shape[-1]
    chunk = min(cfg.block_size, b)
    pad = -b % chunk
    split = lambda x: jnp.pad(x, (0, pad)).reshape(-1, chunk)

    def row(args):
        l, t, m = args

        @jax.checkpoint
        def over_k(acc, ks):
            lk, tk, mk = ks
            pairs = m[:, None] & mk[None, :] & (t[:, None] > tk[None, :])
            vals = jax.nn.softplus(-(l[:, None] - lk[None, :]))
            return (acc[0] + jnp.sum(jnp.where(pairs, vals, 0.0)), acc[1] + jnp.sum(pairs.astype(jnp.float32))), None

        (total, n), _ = jax.lax.scan(over_k, (jnp.float32(0), jnp.float32(0)), (split(l), split(t), split(m)))
        return total / jnp.maximum(n, 1.0), n > 0

    return jax.lax.map(jax.checkpoint(row), (logits, targets, mask))


ROW_LOSSES: dict[str, Callable] = {"bixse": rows_bixse, "infonce": rows_infonce, "graded_infonce": rows_infonce,
                                   "pairwise_bce": rows_pairwise_bce}


def blocked_loss(cfg: ml_collections.ConfigDict, t: jax.Array, b: jax.Array, q: jax.Array, d: jax.Array,
                 batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, positive_logit, negative_logit) over rows in blocks of cfg.block_size; one device."""
    n = q.shape[0]
    block = min(cfg.block_size, n)
    num_blocks = -(-n // block)
    table = pair_table(batch["query_ids"], batch["doc_ids"], batch["grades"])
    rows = Rows(batch["query_ids"], jnp.arange(n, dtype=jnp.int32), batch["grades"],
                repeated_queries(table, batch["query_ids"]), jnp.ones((n,), jnp.bool_))
    pad = lambda x: jnp.pad(x, [(0, num_blocks * block - n)] + [(0, 0)] * (x.ndim - 1))
    xs = jax.tree.map(lambda x: pad(x).reshape((num_blocks, block) + x.shape[1:]), (q, rows))
    scale, col_index = jnp.exp(t), jnp.arange(n, dtype=jnp.int32)

    @jax.checkpoint  # the backward pass recomputes a block instead of keeping its [block, B] residuals
    def one_block(x):
        q_block, block_rows = x
        logits = scale * (q_block @ d.T) + b
        targets, labelled, mask = cells(cfg, table, block_rows, batch["doc_ids"], col_index)
        value, included = ROW_LOSSES[cfg.name](cfg, logits, targets, mask)
        return value, included, jax.lax.stop_gradient(block_stats(logits, targets, labelled, mask))

    values, included, stats = jax.lax.map(one_block, xs)
    loss = jnp.sum(jnp.where(included, values, 0.0)) / jnp.maximum(jnp.sum(included.astype(jnp.float32)), 1.0)
    return (loss,) + _mean_stats(jax.tree.map(jnp.sum, stats))


# --- the ring ------------------------------------------------------------------------------------

def _online_lse(m: jax.Array, s: jax.Array, logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Folds a block into per-row running (max, sum of exp(l - max)) over the masked-in cells."""
    new_m = jnp.maximum(m, jnp.max(jnp.where(mask, logits, -jnp.inf), axis=-1))
    safe = jnp.where(jnp.isfinite(new_m), new_m, 0.0)
    s = s * jnp.exp(m - safe) + jnp.sum(jnp.where(mask, jnp.exp(logits - safe[:, None]), 0.0), axis=-1)
    return new_m, s


def _ring_block(cfg, t, b, q, table, rows, shard):
    """scores, logits, prepared logits, targets, labelled, mask of some of this device's rows x one shard."""
    d_s, did_s, idx_s = shard[:3]
    scores = q @ d_s.T
    logits = jnp.exp(t) * scores + b
    targets, labelled, mask = cells(cfg, table, rows, did_s, idx_s)
    l, targets, mask = _prepare(logits, targets, mask)
    return scores, logits, l, targets, labelled, mask


def _fold_block(cfg, acc: dict, l, targets, mask) -> dict:
    """Per-row accumulators after one more block of a row's cells.

    a: bixse's row sum | the softmax losses' weighted sum of positive logits; c: the row has a cell |
    its number of positives; w: the sum of its positives' weights; m, s: the online logsumexp.
    """
    if cfg.name == "bixse":
        return {**acc, "a": acc["a"] + jnp.sum(jnp.where(mask, _bce(l, targets), 0.0), axis=-1),
                "c": jnp.maximum(acc["c"], jnp.any(mask, axis=-1).astype(jnp.float32))}
    pos, weight = softmax_weights(cfg, targets, mask)
    m, s = _online_lse(acc["m"], acc["s"], l, mask)
    return {"a": acc["a"] + jnp.sum(weight * l, axis=-1), "c": acc["c"] + jnp.sum(pos.astype(jnp.float32), axis=-1),
            "w": acc["w"] + jnp.sum(weight, axis=-1), "m": m, "s": s}


def _grad_logits(cfg, l, targets, mask, lse, n_pos, w_sum) -> jax.Array:
    """dL/dlogits of a block, before the 1 / (included rows) factor: (w_sum softmax - weight) / n_pos."""
    if cfg.name == "bixse":
        return jnp.where(mask, jax.nn.sigmoid(l) - targets, 0.0)
    _, weight = softmax_weights(cfg, targets, mask)
    soft = jnp.where(mask, jnp.exp(l - lse[:, None]), 0.0)
    grad = (w_sum[:, None] * soft - weight) / jnp.maximum(n_pos, 1.0)[:, None]
    return jnp.where((n_pos > 0)[:, None], grad, 0.0)


def ring_loss(cfg: ml_collections.ConfigDict, mesh: Mesh, t: jax.Array, b: jax.Array, q: jax.Array,
              d: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, positive_logit, negative_logit), documents passed round the devices of the batch axes.

    A device's rows meet each passing shard in chunks of loss.block_size rows (padded), so no
    device holds more than [block_size, B/n] of any cell-wise array.
    """
    axes, n_dev = _axes(mesh), batch_shards(mesh)
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
        zeros = jnp.zeros((num_chunks, chunk), jnp.float32)
        acc0 = {"a": zeros, "c": zeros, "w": zeros, "m": jnp.full(zeros.shape, -jnp.inf), "s": zeros}

        def step(carry, _):
            shard, acc, stats = carry

            def one_chunk(stats, x):
                q_c, rows_c, acc_c = x
                _, logits, l, targets, labelled, mask = _ring_block(cfg, t, b, q_c, table, rows_c, shard)
                stats = tuple(x + y for x, y in zip(stats, block_stats(logits, targets, labelled, mask)))
                return stats, _fold_block(cfg, acc_c, l, targets, mask)

            stats, acc = jax.lax.scan(one_chunk, stats, (q_chunks, row_chunks, acc))
            return (hop(shard), acc, stats), None

        init = ((d, did, aux[0][1]), acc0, (jnp.float32(0),) * 4)
        (_, acc, stats), _ = jax.lax.scan(step, init, None, length=n_dev)
        acc = jax.tree.map(merge, acc)
        included = acc["c"] > 0
        if cfg.name == "bixse":
            per_row, lse = acc["a"], jnp.zeros_like(acc["a"])
        else:
            lse = jnp.where(included, acc["m"] + jnp.log(acc["s"]), 0.0)
            per_row = (acc["w"] * lse - acc["a"]) / jnp.maximum(acc["c"], 1.0)
        total = jax.lax.psum(jnp.sum(jnp.where(included, per_row, 0.0)), axes)
        count = jax.lax.psum(jnp.sum(included.astype(jnp.float32)), axes)
        return total / jnp.maximum(count, 1.0), jax.lax.psum(stats, axes), lse, acc["c"], acc["w"], count

    def backward_local(t, b, q, d, aux, lse, n_pos, w_sum, count, g):
        q_chunks, row_chunks, did, table = unpack(q, aux)
        scale, weight = jnp.exp(t), g / jnp.maximum(count, 1.0)

        def step(carry, _):
            shard, g_q, g_t, g_b = carry

            def one_chunk(acc, x):
                g_d, g_t, g_b = acc
                q_c, rows_c, lse_c, n_pos_c, w_sum_c = x
                scores, _, l, targets, _, mask = _ring_block(cfg, t, b, q_c, table, rows_c, shard)
                g_l = weight * _grad_logits(cfg, l, targets, mask, lse_c, n_pos_c, w_sum_c)
                g_s = scale * g_l
                return (g_d + g_s.T @ q_c, g_t + jnp.sum(g_s * scores), g_b + jnp.sum(g_l)), g_s @ shard[0]

            (g_d, g_t, g_b), g_q_chunks = jax.lax.scan(one_chunk, (shard[3], g_t, g_b),
                                                       (q_chunks, row_chunks, split(lse), split(n_pos),
                                                        split(w_sum)))
            shard = shard[:3] + (g_d,)  # dL/dd travels with its documents
            return (hop(shard), g_q + merge(g_q_chunks), g_t, g_b), None

        init = ((d, did, aux[0][1], jnp.zeros_like(d)), jnp.zeros_like(q), jnp.float32(0), jnp.float32(0))
        (shard, g_q, g_t, g_b), _ = jax.lax.scan(step, init, None, length=n_dev)  # n hops: g_d is home
        return jax.lax.psum(g_t, axes), jax.lax.psum(g_b, axes), g_q, shard[3]

    ins = (whole, whole, rows_spec, rows_spec, aux_spec)
    forward = sharded(forward_local, ins, (whole, (whole,) * 4, rows_spec, rows_spec, rows_spec, whole))
    backward = sharded(backward_local, ins + (rows_spec, rows_spec, rows_spec, whole, whole),
                       (whole, whole, rows_spec, rows_spec))

    @jax.custom_vjp
    def loss_of(t, b, q, d, aux):
        return forward(t, b, q, d, aux)[:2]

    def fwd(t, b, q, d, aux):
        loss, stats, lse, n_pos, w_sum, count = forward(t, b, q, d, aux)
        return (loss, stats), (t, b, q, d, aux, lse, n_pos, w_sum, count)

    def bwd(res, cotangent):  # the metric sums' cotangent is dropped: metrics carry no gradient
        t, b, q, d, aux, lse, n_pos, w_sum, count = res
        g_t, g_b, g_q, g_d = backward(t, b, q, d, aux, lse, n_pos, w_sum, count, cotangent[0])
        return g_t, g_b, g_q, g_d, jax.tree.map(lambda _: None, aux)

    loss_of.defvjp(fwd, bwd)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    loss, stats = loss_of(f32(t), f32(b), f32(q), f32(d), aux)
    return (loss,) + _mean_stats(jax.lax.stop_gradient(stats))


IMPL_FNS = {"blocked": lambda cfg, mesh, *args: blocked_loss(cfg, *args), "ring": ring_loss}
