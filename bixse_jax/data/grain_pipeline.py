"""PairBatcher's interface over an ArrayRecord data set (tfds_builder), read with grain.

Same batches as `PairBatcher` for the same seed: global batch `step` is the slice
`[within * B, (within + 1) * B)` of `default_rng([seed, epoch]).permutation(num_pairs)`
(record i is source pair i), and each process keeps its contiguous share. What differs:
  * a process reads and tokenises only its own records of each batch (grain random access);
  * padded lengths come from a token-length table (2 int32 per pair, memory-mapped) written
    beside the records, so every process picks the same bucket for a global batch without
    reading the other processes' records. The table is keyed by a fingerprint of the tokenizer
    and query prefix; if absent it is computed once at start-up (tokenising everything);
  * with `worker_count > 0`, batches are loaded and tokenised in grain worker processes
    (`mp_prefetch`), which prefetch consecutive steps.

Batch `step` is a pure function of (data, seed, step, process index/count), so the resume
position is still the step number ({"next_batch": step} in the checkpoint): no grain iterator
state needs saving. `batch(step)` restarts the prefetching iterator whenever `step` is not the
next one it holds.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from bixse_jax.data import tfds_builder
from bixse_jax.data.batching import (DEFAULT_BUCKETS, EpochOrder, StepBatches, bucket_length, check_processes,
                                     pad_batch)
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.errors import ConfigError, UserError

_NO_END = 2**62  # steps in the (endless) step dataset
_LENGTH_CAP = 512


def resolve_dataset_dir(path: str | os.PathLike) -> pathlib.Path:
    """DATA_DIR/graded_pairs/NAME/1.0.0, or its parent NAME folder (one version inside)."""
    path = pathlib.Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    versions = sorted(p.parent for p in path.glob("*/dataset_info.json"))
    if len(versions) == 1:
        return versions[0]
    raise FileNotFoundError(
        f"{path}: not a built data set; give DATA_DIR/{tfds_builder.BUILDER_NAME}/NAME/"
        f"{tfds_builder.VERSION} as printed by `bixse-jax data build`"
        + (f" (versions found: {[v.name for v in versions]})" if versions else ""))


def length_table(dataset_dir: pathlib.Path, source, tokenizer: Tokenizer, *, split: str,
                 query_prefix: str, max_len: int, write: bool) -> np.ndarray:
    """int32 [2, num_pairs] (query, document) token lengths, memory-mapped when stored.

    Uses a stored table with this fingerprint and a cap >= max_len; else tokenises the split
    (slow for big sets: run `bixse-jax data lengths` once instead) and, if `write`, stores it.
    """
    stem = tfds_builder.length_table_stem(split, tokenizer, query_prefix)
    found = tfds_builder.find_length_table(dataset_dir, stem, max_len)
    if found is not None:
        table = np.load(found, mmap_mode="r")
        if table.shape != (2, len(source)):
            raise UserError(f"{found}: shape {table.shape}, expected (2, {len(source)}); "
                             "delete it and rerun `bixse-jax data lengths`")
        return table
    logging.warning("%s: no token-length table for this tokenizer and query prefix; "
                    "tokenising all %d pairs once (run `bixse-jax data lengths` to store it)",
                    dataset_dir, len(source))
    cap = max(max_len, _LENGTH_CAP)
    table = tfds_builder.compute_lengths(source, tokenizer, query_prefix, cap)
    if write:
        try:
            tfds_builder.save_length_table(dataset_dir, stem, table, cap)
        except OSError as e:  # A read-only data folder is fine: the table is in memory.
            logging.warning("could not store the token-length table in %s: %s", dataset_dir, e)
    return table


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside `absl.app.run` (tests, notebooks) they
    are unparsed, so take their defaults."""
    from absl import flags  # pylint: disable=import-outside-toplevel
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _LocalBatchLoader(EpochOrder):
    """step -> this process's padded slice of global batch `step`. Picklable: runs in workers."""

    def __init__(self, source, tokenizer: Tokenizer, lengths: np.ndarray, *, num_pairs: int,
                 global_batch_size: int, process_index: int, process_count: int,
                 query_max_len: int, doc_max_len: int, buckets: Sequence[int], seed: int,
                 query_prefix: str):
        self.source = source
        self.tokenizer = tokenizer
        self.lengths = lengths
        self.num_pairs = num_pairs
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.steps_per_epoch = num_pairs // global_batch_size
        self.process_index = process_index
        self.query_max_len, self.doc_max_len = query_max_len, doc_max_len
        self.buckets = tuple(buckets)
        self.seed = seed
        self.query_prefix = query_prefix

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_perm_cache"] = None
        if isinstance(self.lengths, np.memmap):  # Workers reopen the file instead of a copy.
            state["lengths"] = ("mmap", self.lengths.filename)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        lengths = state["lengths"]
        if isinstance(lengths, tuple):
            state["lengths"] = np.load(lengths[1], mmap_mode="r")
        self.__dict__.update(state)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices = self.global_indices(step)
        # Sorted: a batch-wide max needs no order, and sorted reads are friendlier to disks.
        rows = np.sort(indices)
        q_len = bucket_length(min(int(self.lengths[0, rows].max()), self.query_max_len),
                              self.buckets, self.query_max_len)
        d_len = bucket_length(min(int(self.lengths[1, rows].max()), self.doc_max_len),
                              self.buckets, self.doc_max_len)
        local = self.local_indices(step)
        records = self.source.__getitems__([int(i) for i in local])
        queries = [tfds_builder.query_text(r, self.query_prefix) for r in records]
        docs = [tfds_builder.decode_text(r["document"]) for r in records]
        pad_id = self.tokenizer.pad_id
        try:
            q_ids, q_mask = pad_batch(self.tokenizer.encode(queries, self.query_max_len), q_len, pad_id)
            d_ids, d_mask = pad_batch(self.tokenizer.encode(docs, self.doc_max_len), d_len, pad_id)
        except ValueError as e:  # The table does not describe these records.
            raise UserError(f"step {step}: {e}; the token-length table is stale for this "
                             "data set; delete token_lengths-* and rerun `bixse-jax data lengths`") from e
        return {
            "query_input_ids": q_ids,
            "query_attention_mask": q_mask,
            "doc_input_ids": d_ids,
            "doc_attention_mask": d_mask,
            "query_ids": np.asarray([r["query_index"] for r in records], dtype=np.int32),
            "doc_ids": np.asarray([r["doc_index"] for r in records], dtype=np.int32),
            "grades": np.asarray([r["score"] for r in records], dtype=np.float32),
        }


class GrainPairBatcher(StepBatches):
    """Deterministic global batches read from ArrayRecord with grain; each process gets its slice.

    Drop-in for `PairBatcher` (same methods and attributes, same batches for the same seed).
    `worker_count` grain worker processes load and tokenise batches ahead of the consumer
    (0: in the calling process, on demand); call `close()` (or use `with`) to stop them.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike,
        tokenizer: Tokenizer,
        *,
        global_batch_size: int,
        query_max_len: int,
        doc_max_len: int,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        seed: int = 0,
        query_prefix: str = "",
        split: str = "train",
        process_index: int | None = None,
        process_count: int | None = None,
        worker_count: int = 0,
        worker_buffer_size: int = 2,
    ):
        process_index, process_count = check_processes(global_batch_size, seed, process_index, process_count)
        if worker_count < 0 or worker_buffer_size < 1:
            raise ConfigError(f"worker_count must be >= 0 and worker_buffer_size >= 1, got "
                             f"{worker_count} and {worker_buffer_size}")
        self.dataset_dir = resolve_dataset_dir(dataset_dir)
        source = tfds_builder.open_split(self.dataset_dir, split)
        self.num_pairs = len(source)
        if self.num_pairs < global_batch_size:
            raise UserError(f"{self.dataset_dir}: {self.num_pairs} pairs are fewer than one "
                             f"global batch ({global_batch_size})")
        lengths = length_table(self.dataset_dir, source, tokenizer, split=split,
                               query_prefix=query_prefix,
                               max_len=max(query_max_len, doc_max_len), write=process_index == 0)
        self._loader = _LocalBatchLoader(
            source, tokenizer, lengths, num_pairs=self.num_pairs,
            global_batch_size=global_batch_size, process_index=process_index,
            process_count=process_count, query_max_len=query_max_len, doc_max_len=doc_max_len,
            buckets=buckets, seed=seed, query_prefix=query_prefix)
        self.global_batch_size = global_batch_size
        self.local_batch_size = self._loader.local_batch_size
        self.steps_per_epoch = self._loader.steps_per_epoch
        self.process_index = process_index
        self.query_max_len, self.doc_max_len = query_max_len, doc_max_len
        self.worker_count = worker_count
        self._worker_buffer_size = worker_buffer_size
        self._iterator: Iterator[dict[str, np.ndarray]] | None = None
        self._next_step = -1

    def global_indices(self, step: int) -> np.ndarray:
        """Pair (= record) indices of global batch `step`, in batch order."""
        return self._loader.global_indices(step)

    def local_indices(self, step: int) -> np.ndarray:
        """Record indices of this process's slice of global batch `step`."""
        return self._loader.local_indices(step)

    def dataset(self, start_step: int = 0) -> grain.IterDataset:
        """Batches start_step, start_step + 1, ... as a grain IterDataset (prefetched in workers)."""
        steps = grain.MapDataset.range(start_step, _NO_END).map(self._loader)
        # One thread per worker: the workers give the parallelism; a deep thread prefetch
        # would hold hundreds of batches.
        ds = steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        if self.worker_count:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.worker_count, per_worker_buffer_size=self._worker_buffer_size))
        return ds

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`, padded to global bucket lengths."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if not self.worker_count:
            return self._loader(step)
        if self._iterator is None or step != self._next_step:
            self.close()
            self._iterator = iter(self.dataset(step))
        self._next_step = step + 1
        return next(self._iterator)

    def close(self) -> None:
        """Stops the worker processes, if any."""
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
            self._iterator = None
            self._next_step = -1

    def __enter__(self) -> "GrainPairBatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pylint: disable=broad-except  # Best effort, even at interpreter exit.
            pass
