"""TFDS ArrayRecord builder (no TensorFlow) and the grain batcher that mirrors PairBatcher."""

import json
import sys

import numpy as np
import pytest

from bixse_jax import cli
from bixse_jax.commands import data as data_command
from bixse_jax.data import grain_pipeline, sources, tfds_builder
from bixse_jax.data.batching import PairBatcher, bucket_length
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.data.grain_pipeline import GrainPairBatcher

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ["alpha", "beta", "gamma", "delta", "query", "doc", "find", "a", "b", "c"]
_N = 52
_SIZES = dict(global_batch_size=8, query_max_len=24, doc_max_len=20, buckets=(8, 16, 32))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tokenizer")
    (folder / "vocab.txt").write_text("\n".join(_SPECIAL + _WORDS) + "\n")
    return Tokenizer.from_model_dir(folder)


def _rows(n: int) -> list[dict]:
    """Varied lengths (a few queries and documents longer than max_len), repeated ids, instructions."""
    rows = []
    for i in range(n):
        words = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(1 + i % 5))
        row = {"query": "query " + ("alpha " * 30 if i % 11 == 0 else "") + words,
               "document": "doc " + words * (1 + i % 4), "score": (i % 4) / 3,
               "query_id": f"q{i // 2}", "doc_id": f"d{i % 7}"}
        if i % 6 == 0:
            row["instruction"] = "find "
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer):
    """(source JSONL, built data-set folder) with a length table for `tokenizer` and no prefix."""
    root = tmp_path_factory.mktemp("grain")
    source = root / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows(_N)))
    folder = tfds_builder.build("jsonl", source, root / "data")
    tfds_builder.write_length_table(folder, tokenizer, cap=64)
    return source, folder


def _grain(folder, tokenizer, **kw) -> GrainPairBatcher:
    args = dict(_SIZES, seed=5, process_index=0, process_count=1)
    args.update(kw)
    return GrainPairBatcher(folder, tokenizer, **args)


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------
# Builder.
# ---------------------------------------------------------------------------


def test_build_keeps_source_order_and_fields_without_tensorflow(built):
    source, folder = built
    assert folder.parts[-3:] == ("graded_pairs", "pairs", "1.0.0")
    records = tfds_builder.open_split(folder, "train")
    pairs = sources.read_jsonl_pairs(source)
    assert len(records) == len(pairs) == _N
    for i in (0, 6, 11, _N - 1):
        r = records[i]
        assert tfds_builder.decode_text(r["query"]) == pairs[i].query
        assert tfds_builder.decode_text(r["document"]) == pairs[i].document
        assert tfds_builder.decode_text(r["instruction"]) == pairs[i].instruction
        assert tfds_builder.decode_text(r["query_id"]) == f"q{i // 2}"
        assert r["score"] == pytest.approx(pairs[i].grade, abs=1e-7)
        assert (r["query_index"], r["doc_index"]) == (i // 2, i % 7)  # first-appearance order
    assert "tensorflow" not in sys.modules


def test_build_beir_and_sts(tmp_path):
    beir = tmp_path / "beir"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text('{"_id": "d1", "title": "T", "text": "one"}\n'
                                       '{"_id": "d2", "text": "two"}\n')
    (beir / "queries.jsonl").write_text('{"_id": "q1", "text": "first"}\n')
    (beir / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t1\n")
    folder = tfds_builder.build("beir", beir, tmp_path / "out", split="dev", name="tiny")
    records = tfds_builder.open_split(folder, "dev")
    got = [(tfds_builder.decode_text(r["document"]), r["score"]) for r in records.__getitems__([0, 1])]
    assert got == [("T one", 1.0), ("two", 0.5)]
    sts = tmp_path / "sts.tsv"
    sts.write_text("g\tf\t2012\t1\t4.0\tA cat sits.\tA cat is sitting.\n")
    record = tfds_builder.open_split(tfds_builder.build("sts", sts, tmp_path / "out"))[0]
    assert record["score"] == pytest.approx(0.8)
    assert tfds_builder.decode_text(record["doc_id"]) == "A cat is sitting."


def test_bad_source_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "document": "b", "score": 0.5}\n'
                   '{"query": "a", "document": "c", "score": "high"}\n')
    with pytest.raises(sources.DataError) as info:
        tfds_builder.build("jsonl", bad, tmp_path / "out")
    assert (info.value.path, info.value.line, info.value.field) == (str(bad), 2, "score")
    assert not list((tmp_path / "out").rglob("*.array_record*"))


def test_cli_build_and_lengths(tmp_path, capsys, tokenizer, built):
    source, _ = built
    argv = ["bixse-jax data", "build", "--kind", "jsonl", "--source", str(source),
            "--out", str(tmp_path), "--name", "cli"]
    data_command.main(argv)
    folder = tmp_path / "graded_pairs" / "cli" / "1.0.0"
    assert capsys.readouterr().out.strip() == str(folder)
    assert len(tfds_builder.open_split(folder)) == _N
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "vocab.txt").write_text("\n".join(_SPECIAL + _WORDS) + "\n")
    data_command.main(["bixse-jax data", "lengths", "--data", str(folder.parent),
                       "--tokenizer", str(tok_dir), "--query-prefix", "find ", "--length-cap", "40"])
    stem = tfds_builder.length_table_stem("train", tokenizer, "find ")
    assert tfds_builder.find_length_table(folder, stem, 40) is not None
    assert tfds_builder.find_length_table(folder, stem, 41) is None  # cap 40 serves max_len <= 40
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bixse-jax", "data", "build", "--kind", "sts", "--source", str(source), "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{source}:1: " in err and "tab-separated fields" in err


# ---------------------------------------------------------------------------
# Grain batcher.
# ---------------------------------------------------------------------------


def test_batches_equal_pair_batcher(built, tokenizer):
    source, folder = built
    reference = PairBatcher(sources.read_jsonl_pairs(source), tokenizer, **_SIZES, seed=5,
                            process_index=0, process_count=1)
    batcher = _grain(folder, tokenizer)
    assert (batcher.num_pairs, batcher.steps_per_epoch, batcher.local_batch_size) == (_N, 6, 8)
    shapes = set()
    for step in (0, 1, 5, 6, 13):  # across three epochs
        np.testing.assert_array_equal(batcher.global_indices(step), reference.global_indices(step))
        got = batcher.batch(step)
        _assert_batches_equal(got, reference.batch(step))
        shapes.add(got["query_input_ids"].shape[1])
    assert len(shapes) > 1, "test data should exercise more than one bucket"
    epoch = np.concatenate([batcher.global_indices(s) for s in range(6, 12)])
    assert len(set(epoch.tolist())) == 48  # each pair at most once; remainder of 4 dropped


def test_query_prefix_matches_and_has_its_own_length_table(built, tokenizer):
    source, folder = built
    reference = PairBatcher(sources.read_jsonl_pairs(source), tokenizer, **_SIZES, seed=1,
                            query_prefix="a b c d e f ", process_index=0, process_count=1)
    batcher = _grain(folder, tokenizer, seed=1, query_prefix="a b c d e f ")  # computes, stores
    stem = tfds_builder.length_table_stem("train", tokenizer, "a b c d e f ")
    assert tfds_builder.find_length_table(folder, stem, 24) is not None
    for step in (0, 3):
        _assert_batches_equal(batcher.batch(step), reference.batch(step))


def test_process_slices_are_disjoint_and_cover_the_global_batch(built, tokenizer):
    _, folder = built
    whole = _grain(folder, tokenizer)
    parts = [_grain(folder, tokenizer, process_index=p, process_count=2) for p in range(2)]
    saw_uneven = False
    for step in range(6):
        full = whole.batch(step)
        sliced = [p.batch(step) for p in parts]
        local = [p.local_indices(step) for p in parts]
        assert not set(local[0]) & set(local[1])
        np.testing.assert_array_equal(np.concatenate(local), whole.global_indices(step))
        for key, value in full.items():
            assert sliced[0][key].shape == sliced[1][key].shape, key
            np.testing.assert_array_equal(np.concatenate([s[key] for s in sliced]), value)
        local_max = [int(s["query_attention_mask"].sum(1).max()) for s in sliced]
        saw_uneven |= len({bucket_length(m, (8, 16, 32), 24) for m in local_max}) > 1
    assert saw_uneven, "some slice alone would pick another bucket than its global batch"


def test_workers_give_the_same_batches_and_resume_at_any_step(built, tokenizer):
    _, folder = built
    in_process = _grain(folder, tokenizer)
    with _grain(folder, tokenizer, worker_count=2) as workers:
        for step in (0, 1, 2, 3):  # consecutive: served by the prefetching workers
            _assert_batches_equal(workers.batch(step), in_process.batch(step))
        assert workers._iterator is not None  # pylint: disable=protected-access
        # A jump (resume at step k) restarts the workers at k.
        _assert_batches_equal(workers.batch(9), in_process.batch(9))
        _assert_batches_equal(workers.batch(10), in_process.batch(10))


def test_resume_in_process_gives_batch_k(built, tokenizer):
    _, folder = built
    run = [b["query_ids"] for _, b in zip(range(9), _grain(folder, tokenizer))]
    resumed = _grain(folder, tokenizer).iterate(start_step=7)
    for expected in run[7:]:
        np.testing.assert_array_equal(next(resumed)["query_ids"], expected)


def test_errors(built, tokenizer, tmp_path):
    _, folder = built
    with pytest.raises(FileNotFoundError, match="not a built data set"):
        _grain(tmp_path, tokenizer)
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        _grain(folder, tokenizer, process_count=3)
    with pytest.raises(ValueError, match="52 pairs are fewer than one global batch"):
        _grain(folder, tokenizer, global_batch_size=64)
    with pytest.raises(ValueError, match="no split 'dev'"):
        _grain(folder, tokenizer, split="dev")
    # A table that does not describe the records (here: all lengths 1) is caught at batch time.
    stem = tfds_builder.length_table_stem("train", tokenizer, "stale ")
    tfds_builder.save_length_table(folder, stem, np.ones((2, _N), np.int32), 64)
    with pytest.raises(ValueError, match="token-length table is stale"):
        _grain(folder, tokenizer, query_prefix="stale ").batch(0)
    tfds_builder.save_length_table(folder, stem, np.ones((2, 3), np.int32), 64)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(2, 52\)"):
        _grain(folder, tokenizer, query_prefix="stale ")
    assert grain_pipeline.resolve_dataset_dir(folder.parent) == folder


def test_training_from_arrayrecord_equals_training_from_jsonl(tiny_model_dir, tmp_path):
    """data.kind=arrayrecord feeds the train loop the same batches as the in-memory reader."""
    from bixse_jax import train
    from train_utils import flat_params, pairs_jsonl, tiny_config

    source = pairs_jsonl(tmp_path / "pairs.jsonl")
    folder = tfds_builder.build("jsonl", source, tmp_path / "data", name="pairs")
    _, from_jsonl = train.train(tiny_config(tiny_model_dir, source, num_steps=3), tmp_path / "a",
                                show_progress=False)
    config = tiny_config(tiny_model_dir, source, num_steps=3)
    config.data.kind, config.data.path = "arrayrecord", str(folder)
    _, from_records = train.train(config, tmp_path / "b", show_progress=False)
    for a, b in zip(flat_params(from_jsonl), flat_params(from_records)):
        np.testing.assert_array_equal(a, b)
