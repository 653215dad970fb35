"""Length buckets and deterministic, stateless global batches.

Every process holds the whole (tokenised) data set and computes global batch
`step` from (seed, step) alone, then keeps its own contiguous slice. Hence:
  * resume is exact: the iterator position is just the step number;
  * all processes agree on padded shapes, because the bucket is chosen from
    the longest sequence in the *global* batch, not the local slice.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import tqdm

from bixse_jax.data.sources import GradedPair
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.errors import ConfigError, UserError

_ENCODE_CHUNK = 2048
# Padded lengths a batch may take (each capped at its side's max length): few shapes, few compilations.
DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


def pad_batch(seqs: Sequence[np.ndarray], length: int,
              pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to a fixed length; returns (ids, attention_mask), both int32 [n, length]."""
    ids = np.full((len(seqs), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for row, seq in enumerate(seqs):
        if len(seq) > length:
            raise ValueError(f"sequence of length {len(seq)} does not fit in {length}")
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return ids, mask


def bucket_length(max_len_in_batch: int, buckets: Sequence[int], cap: int) -> int:
    """Smallest bucket >= max_len_in_batch, never above cap; cap is always a bucket.

    Few distinct shapes means few XLA recompilations; short batches stay cheap.
    """
    if max_len_in_batch > cap:
        raise ValueError(f"length {max_len_in_batch} exceeds the cap {cap}")
    for bucket in sorted(buckets):
        if max_len_in_batch <= bucket <= cap:
            return bucket
    return cap


def _dense_index(keys: Sequence[str]) -> np.ndarray:
    """Maps strings to ints in first-appearance order."""
    index: dict[str, int] = {}
    return np.asarray([index.setdefault(k, len(index)) for k in keys], dtype=np.int32)


class _TokenTable:
    """Each distinct text tokenised once; pairs refer to rows by index."""

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, max_len: int,
                 desc: str, show_progress: bool):
        self.row_of_pair = _dense_index(texts)
        unique = list(dict.fromkeys(texts))
        self.tokens: list[np.ndarray] = []
        with tqdm.tqdm(total=len(unique), desc=desc, unit="text",
                       disable=not show_progress) as progress:
            for start in range(0, len(unique), _ENCODE_CHUNK):
                chunk = unique[start:start + _ENCODE_CHUNK]
                self.tokens.extend(tokenizer.encode(chunk, max_len))
                progress.update(len(chunk))
        self.lengths = np.asarray([len(t) for t in self.tokens], dtype=np.int32)

    def pair_lengths(self, pair_indices: np.ndarray) -> np.ndarray:
        return self.lengths[self.row_of_pair[pair_indices]]

    def pair_tokens(self, pair_indices: np.ndarray) -> list[np.ndarray]:
        return [self.tokens[r] for r in self.row_of_pair[pair_indices]]


def check_processes(global_batch_size: int, seed: int, process_index: int | None,
                    process_count: int | None) -> tuple[int, int]:
    """(process_index, process_count), defaulting to JAX's, after checking the batch splits evenly."""
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel  # Only when needed.
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ConfigError(f"global_batch_size {global_batch_size} must be a positive "
                         f"multiple of process_count {process_count}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    return process_index, process_count


class EpochOrder:
    """Which pairs make up global batch `step`, and which of them this process feeds.

    Epoch e visits the pairs in `default_rng([seed, e]).permutation(num_pairs)` order, global
    batch s takes the (s mod steps_per_epoch)-th run of global_batch_size pairs of epoch
    s // steps_per_epoch (the remainder is dropped), and process p takes the p-th contiguous
    slice of it. Stateless in `step`, so resuming needs only the step number. Shared by every
    batcher, so in-memory and ArrayRecord input make the same batches.
    Needs: num_pairs, global_batch_size, local_batch_size, steps_per_epoch, process_index, seed.
    """

    num_pairs: int
    global_batch_size: int
    local_batch_size: int
    steps_per_epoch: int
    process_index: int
    seed: int
    _perm_cache: tuple[int, np.ndarray] | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        cache = self._perm_cache  # read once: the prefetch thread may replace it meanwhile
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs))
            self._perm_cache = cache
        return cache[1]

    def global_indices(self, step: int) -> np.ndarray:
        """Pair indices of global batch `step`, in batch order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        size = self.global_batch_size
        return self._permutation(epoch)[within * size:(within + 1) * size]

    def local_indices(self, step: int) -> np.ndarray:
        """Pair indices of this process's slice of global batch `step`."""
        start = self.process_index * self.local_batch_size
        return self.global_indices(step)[start:start + self.local_batch_size]


class StepBatches:
    """Endless iteration over `batch(step)`, the one method a batcher defines."""

    def batch(self, step: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Yields batch(start_step), batch(start_step + 1), ... without end."""
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(0)


class PairBatcher(EpochOrder, StepBatches):
    """Deterministic global batches of graded pairs; each process gets its slice.

    Global batch `step` is drawn without replacement from epoch `step // spe`,
    whose order is `default_rng([seed, epoch]).permutation(num_pairs)`; the
    remainder of each epoch is dropped.
    """

    def __init__(
        self,
        pairs: Sequence[GradedPair],
        tokenizer: Tokenizer,
        *,
        global_batch_size: int,
        query_max_len: int,
        doc_max_len: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        seed: int = 0,
        query_prefix: str = "",
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        process_index, process_count = check_processes(global_batch_size, seed, process_index, process_count)
        if len(pairs) < global_batch_size:
            raise UserError(f"{len(pairs)} pairs are fewer than one global batch "
                             f"({global_batch_size})")
        self.num_pairs = len(pairs)
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.steps_per_epoch = self.num_pairs // global_batch_size
        self.process_index = process_index
        self.query_max_len, self.doc_max_len = query_max_len, doc_max_len
        self._buckets = tuple(buckets)
        self.seed = seed
        self._pad_id = tokenizer.pad_id
        show = process_index == 0
        self._queries = _TokenTable([(p.instruction or query_prefix) + p.query for p in pairs],
                                    tokenizer, query_max_len, "tokenising queries", show)
        self._docs = _TokenTable([p.document for p in pairs], tokenizer, doc_max_len,
                                 "tokenising documents", show)
        self._query_ids = _dense_index([p.query_id for p in pairs])
        self._doc_ids = _dense_index([p.doc_id for p in pairs])
        self._grades = np.asarray([p.grade for p in pairs], dtype=np.float32)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`, padded to global bucket lengths."""
        indices = self.global_indices(step)
        q_len = bucket_length(int(self._queries.pair_lengths(indices).max()),
                              self._buckets, self.query_max_len)
        d_len = bucket_length(int(self._docs.pair_lengths(indices).max()),
                              self._buckets, self.doc_max_len)
        local = self.local_indices(step)
        q_ids, q_mask = pad_batch(self._queries.pair_tokens(local), q_len, self._pad_id)
        d_ids, d_mask = pad_batch(self._docs.pair_tokens(local), d_len, self._pad_id)
        return {
            "query_input_ids": q_ids,
            "query_attention_mask": q_mask,
            "doc_input_ids": d_ids,
            "doc_attention_mask": d_mask,
            "query_ids": self._query_ids[local],
            "doc_ids": self._doc_ids[local],
            "grades": self._grades[local],
        }
