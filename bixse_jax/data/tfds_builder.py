"""Graded pairs as a TFDS data set in ArrayRecord format, built and read without TensorFlow.

Why: `PairBatcher` tokenises the whole data set in every process. For sets that do not fit
in memory, the pairs are written once to ArrayRecord files (random access by record index),
and `grain_pipeline.GrainPairBatcher` reads only the records of its own slice of each batch.

Layout: DATA_DIR/graded_pairs/NAME/1.0.0/ holds the TFDS files (dataset_info.json,
features.json, graded_pairs-SPLIT.array_record-*) and, optionally, token-length tables
`token_lengths-SPLIT-FINGERPRINT-capN.npy` (see `write_length_table`). Record i is source pair i
(`disable_shuffling`), so a batcher that permutes indices like `PairBatcher` yields the
same batches.

The source files are read with `sources.py`'s readers (so bad input names file, line and
field) from the TFDS `manual_dir`: the builder config's `source` is a path relative to it
(or absolute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from bixse_jax.data import sources
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.errors import UserError

BUILDER_NAME = "graded_pairs"
VERSION = "1.0.0"
TEXT_FEATURES = ("query", "document", "instruction", "query_id", "doc_id")
_READ_CHUNK = 4096
LENGTHS_PREFIX = "token_lengths-"


@dataclasses.dataclass(eq=False)
class GradedPairsConfig(tfds.core.BuilderConfig):
    """Which source to read. `source` is relative to manual_dir (or absolute).

    kind: jsonl | beir | sts; source_split: the BEIR qrels split (qrels/<split>.tsv);
    the remaining fields are `sources.read_beir`'s options.
    """
    kind: str = "jsonl"
    source: str = ""
    source_split: str = "train"
    max_grade: float | None = None
    keep_zero: bool = True
    skip_missing_docs: bool = False


class GradedPairs(tfds.core.GeneratorBasedBuilder):
    """query, document, instruction, query_id, doc_id (text), score (float32) and dense
    query_index / doc_index (int32, first-appearance order over the split, like PairBatcher's
    query_ids / doc_ids: the loss needs ids that are global across processes)."""

    VERSION = tfds.core.Version(VERSION)
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Place the source (JSONL file, BEIR folder or STS .tsv) in manual_dir and name it in "
        "the builder config's `source`.")
    BUILDER_CONFIGS = [GradedPairsConfig(name="default")]

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Graded (query, document, score in [0, 1]) training pairs for BiXSE.",
            features=tfds.features.FeaturesDict({
                "query": text, "document": text, "instruction": text,
                "query_id": text, "doc_id": text,
                "score": tfds.features.Scalar(np.float32),
                "query_index": tfds.features.Scalar(np.int32),
                "doc_index": tfds.features.Scalar(np.int32),
            }),
            supervised_keys=None,
            # Record i must be pair i: batches are defined by permuting record indices.
            disable_shuffling=True,
        )

    def _source_path(self, dl_manager) -> pathlib.Path:
        cfg: GradedPairsConfig = self.builder_config
        if not cfg.source:
            raise UserError("GradedPairsConfig.source is empty: name the file or folder to read")
        source = pathlib.Path(cfg.source)
        return source if source.is_absolute() else pathlib.Path(dl_manager.manual_dir) / source

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        # Read and validate everything before a record is written: a bad row fails here.
        pairs = read_pairs(self.builder_config, self._source_path(dl_manager))
        return {self.builder_config.source_split: self._generate_examples(pairs)}

    def _generate_examples(self, pairs: Sequence[sources.GradedPair]):
        query_index: dict[str, int] = {}
        doc_index: dict[str, int] = {}
        for i, p in enumerate(pairs):
            yield i, {
                "query": p.query, "document": p.document, "instruction": p.instruction,
                "query_id": p.query_id, "doc_id": p.doc_id, "score": np.float32(p.grade),
                "query_index": query_index.setdefault(p.query_id, len(query_index)),
                "doc_index": doc_index.setdefault(p.doc_id, len(doc_index)),
            }


def read_pairs(cfg: GradedPairsConfig, path: pathlib.Path) -> list[sources.GradedPair]:
    kwargs: dict[str, Any] = {}
    if cfg.kind == "beir":
        kwargs = {"split": cfg.source_split, "max_grade": cfg.max_grade,
                  "keep_zero": cfg.keep_zero, "skip_missing_docs": cfg.skip_missing_docs}
    return sources.load_pairs(cfg.kind, str(path), **kwargs)


def build(kind: str, source: str | os.PathLike, data_dir: str | os.PathLike, *,
          name: str | None = None, split: str = "train", max_grade: float | None = None,
          keep_zero: bool = True, skip_missing_docs: bool = False) -> pathlib.Path:
    """Builds DATA_DIR/graded_pairs/NAME/1.0.0 from one source; returns that folder.

    manual_dir is the source's parent folder. `split` is the TFDS split name and, for BEIR,
    the qrels split read. NAME defaults to the source's name without suffix.
    """
    source = pathlib.Path(source).absolute()
    if not source.exists():
        raise sources.DataError(source, None, None, "file or folder not found")
    name = name or _config_name(source.stem)
    cfg = GradedPairsConfig(name=name, kind=kind, source=source.name, source_split=split,
                            max_grade=max_grade, keep_zero=keep_zero,
                            skip_missing_docs=skip_missing_docs)
    builder = GradedPairs(config=cfg, data_dir=os.path.abspath(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(source.parent)))
    return pathlib.Path(builder.data_dir)


def _config_name(stem: str) -> str:
    """TFDS config names allow letters, digits, '-', '_' and '.'."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._")
    return name or "default"


# ----------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------


def open_split(dataset_dir: str | os.PathLike, split: str = "train"):
    """The split's random-access data source (TFDS ArrayRecordDataSource, picklable).

    Records are dicts of numpy values; text features are UTF-8 `bytes`.
    """
    dataset_dir = pathlib.Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{dataset_dir}: not a built data set (no dataset_info.json); expected "
            f"DATA_DIR/{BUILDER_NAME}/NAME/{VERSION} from `bixse-jax data build`")
    builder = tfds.builder_from_directory(os.fspath(dataset_dir))
    if builder.info.file_format is None or builder.info.file_format.value != "array_record":
        raise UserError(f"{dataset_dir}: stored as {builder.info.file_format}, not array_record")
    splits = builder.info.splits
    if split not in splits:
        raise UserError(f"{dataset_dir}: no split {split!r}; available: {sorted(splits)}")
    return builder.as_data_source(split=split)


def decode_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def query_text(record: dict[str, Any], query_prefix: str) -> str:
    """What the encoder sees as the query: a pair's own instruction wins over the prefix."""
    return (decode_text(record["instruction"]) or query_prefix) + decode_text(record["query"])


# ----------------------------------------------------------------------------
# Token-length tables: padded shapes for a global batch without reading its records.
# ----------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Tokenizer, query_prefix: str) -> str:
    """Hash of the tokenizer's full serialisation and the query prefix (both change lengths)."""
    # pylint: disable=protected-access  # Tokenizer has no public serialisation.
    blob = json.dumps([tokenizer._tok.to_str(), query_prefix]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def length_table_stem(split: str, tokenizer: Tokenizer, query_prefix: str) -> str:
    return f"{LENGTHS_PREFIX}{split}-{tokenizer_fingerprint(tokenizer, query_prefix)}"


def find_length_table(dataset_dir: str | os.PathLike, stem: str,
                      max_len: int) -> pathlib.Path | None:
    """The stored table `STEM-capN.npy` with the smallest cap N >= max_len, if any."""
    best: tuple[int, pathlib.Path] | None = None
    for path in pathlib.Path(dataset_dir).glob(f"{stem}-cap*.npy"):
        cap_text = path.name[len(stem) + len("-cap"):-len(".npy")]
        if cap_text.isdigit() and int(cap_text) >= max_len:
            if best is None or int(cap_text) < best[0]:
                best = (int(cap_text), path)
    return None if best is None else best[1]


def compute_lengths(data_source, tokenizer: Tokenizer, query_prefix: str, cap: int) -> np.ndarray:
    """int32 [2, n]: token counts (special tokens included) of each record's query and document,
    capped at `cap`.

    Truncation to max_len keeps min(length, max_len) tokens, so a table capped at `cap` serves
    every max_len <= cap.
    """
    n = len(data_source)
    table = np.empty((2, n), dtype=np.int32)
    for start in range(0, n, _READ_CHUNK):
        records = data_source.__getitems__(list(range(start, min(n, start + _READ_CHUNK))))
        queries = [query_text(r, query_prefix) for r in records]
        docs = [decode_text(r["document"]) for r in records]
        table[0, start:start + len(records)] = [len(t) for t in tokenizer.encode(queries, cap)]
        table[1, start:start + len(records)] = [len(t) for t in tokenizer.encode(docs, cap)]
    return table


def save_length_table(dataset_dir: str | os.PathLike, stem: str, table: np.ndarray,
                      cap: int) -> pathlib.Path:
    path = pathlib.Path(dataset_dir) / f"{stem}-cap{cap}.npy"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    os.replace(tmp, path)  # Readers never see a half-written table.
    return path


def write_length_table(dataset_dir: str | os.PathLike, tokenizer: Tokenizer, *,
                       split: str = "train", query_prefix: str = "",
                       cap: int = 512) -> pathlib.Path:
    """Tokenises the split once and stores its token lengths beside the records."""
    table = compute_lengths(open_split(dataset_dir, split), tokenizer, query_prefix, cap)
    return save_length_table(dataset_dir, length_table_stem(split, tokenizer, query_prefix),
                             table, cap)
