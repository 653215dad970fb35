"""Tokenizer wrapper, padding, buckets and the stateless, per-process PairBatcher."""

import json

import numpy as np
import pytest

from bixse_jax.data.batching import PairBatcher, bucket_length, pad_batch
from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.data.sources import GradedPair

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = ["alpha", "beta", "gamma", "delta", "query", "doc", "find", "a", "b", "c"]
_PAD, _CLS, _SEP = 0, 2, 3


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory) -> Tokenizer:
    """A 15-token WordPiece tokenizer built from vocab.txt (the fallback path)."""
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    (folder / "vocab.txt").write_text("\n".join(_SPECIAL + _WORDS) + "\n")
    return Tokenizer.from_model_dir(folder)


def _pairs(n: int, *, long_every: int = 0) -> list[GradedPair]:
    """n pairs whose query/doc lengths vary; ids repeat so dense indexing is visible."""
    pairs = []
    for i in range(n):
        words = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(1 + i % 5))
        long = long_every and i % long_every == 0
        query = "query " + ("alpha " * 30 if long else "") + words
        pairs.append(GradedPair(query=query, document="doc " + words * (1 + i % 3),
                                grade=(i % 4) / 3, query_id=f"q{i // 2}", doc_id=f"d{i % 7}"))
    return pairs


def _batcher(tok, pairs, **kw) -> PairBatcher:
    args = dict(global_batch_size=8, query_max_len=64, doc_max_len=64, seed=0,
                process_index=0, process_count=1)
    args.update(kw)
    return PairBatcher(pairs, tok, **args)


# ---------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------


def test_real_minilm_tokenizer(minilm_path):
    tok = Tokenizer.from_model_dir(minilm_path)
    assert (tok.vocab_size, tok.pad_id) == (30522, 0)
    ids = tok.encode(["hello world", "Hello World " * 100], max_len=8)
    assert ids[0].tolist() == [101, 7592, 2088, 102] and ids[0].dtype == np.int32
    # Its tokenizer.json pads to 128 and truncates at 128; we must not.
    assert len(ids[1]) == 8 and ids[1][0] == 101 and ids[1][-1] == 102
    assert len(tok.encode(["word " * 300], max_len=512)[0]) == 302
    tok.check_vocab(30522, "all-MiniLM-L6-v2")
    with pytest.raises(ValueError, match=r"my-checkpoint: .*ids up to 30521.*30000"):
        tok.check_vocab(30000, "my-checkpoint")


def test_vocab_txt_fallback_lowercases_per_config(tmp_path, tiny_tokenizer):
    assert tiny_tokenizer.pad_id == _PAD and tiny_tokenizer.vocab_size == 15
    assert tiny_tokenizer.encode(["Alpha BETA"], 16)[0].tolist() == [_CLS, 5, 6, _SEP]
    (tmp_path / "vocab.txt").write_text("\n".join(_SPECIAL + _WORDS + ["Alpha"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    cased = Tokenizer.from_model_dir(tmp_path)
    assert cased.encode(["Alpha alpha"], 16)[0].tolist() == [_CLS, 15, 5, _SEP]


def test_truncation_keeps_final_sep(tiny_tokenizer):
    ids = tiny_tokenizer.encode(["alpha beta gamma delta a b c"], max_len=5)[0]
    assert ids.tolist() == [_CLS, 5, 6, 7, _SEP]


def test_missing_tokenizer_names_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_model_dir(tmp_path)


# ---------------------------------------------------------------------------
# Padding and buckets.
# ---------------------------------------------------------------------------


def test_pad_batch():
    ids, mask = pad_batch([np.array([5, 6, 7]), np.array([8])], 4, pad_id=1)
    assert ids.tolist() == [[5, 6, 7, 1], [8, 1, 1, 1]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert ids.dtype == mask.dtype == np.int32
    with pytest.raises(ValueError, match="does not fit"):
        pad_batch([np.arange(5)], 4, pad_id=0)


@pytest.mark.parametrize("length, cap, expected", [
    (1, 512, 16), (16, 512, 16), (17, 512, 32), (100, 512, 128),
    (100, 100, 100),  # The cap is always a bucket.
    (40, 48, 48),     # Bucket 64 would exceed the cap.
    (10, 8, None),
])
def test_bucket_length(length, cap, expected):
    buckets = (64, 16, 32, 128)  # Order does not matter.
    if expected is None:
        with pytest.raises(ValueError, match="exceeds the cap"):
            bucket_length(length, buckets, cap)
    else:
        assert bucket_length(length, buckets, cap) == expected


# ---------------------------------------------------------------------------
# PairBatcher.
# ---------------------------------------------------------------------------


def test_batch_contents_and_dtypes(tiny_tokenizer):
    pairs = _pairs(20)
    batcher = _batcher(tiny_tokenizer, pairs)
    assert (batcher.num_pairs, batcher.steps_per_epoch) == (20, 2)  # Remainder dropped.
    batch = batcher.batch(0)
    dtypes = {k: str(v.dtype) for k, v in batch.items()}
    assert dtypes == {"query_input_ids": "int32", "query_attention_mask": "int32",
                      "doc_input_ids": "int32", "doc_attention_mask": "int32",
                      "query_ids": "int32", "doc_ids": "int32", "grades": "float32"}
    chosen = batcher.global_indices(0)
    expected = np.random.default_rng([0, 0]).permutation(20)[:8]
    np.testing.assert_array_equal(chosen, expected)
    # Dense ids: first-appearance order over the whole data set.
    np.testing.assert_array_equal(batch["query_ids"], chosen // 2)
    np.testing.assert_array_equal(batch["doc_ids"], chosen % 7)
    np.testing.assert_allclose(batch["grades"], (chosen % 4) / 3, rtol=1e-6)
    for row, i in enumerate(chosen):
        doc = tiny_tokenizer.encode([pairs[i].document], 64)[0]
        n = int(batch["doc_attention_mask"][row].sum())
        assert batch["doc_input_ids"][row, :n].tolist() == doc.tolist()
        assert (batch["doc_input_ids"][row, n:] == _PAD).all()
    assert batch["query_input_ids"].shape == (8, 16)


def test_determinism_and_seed(tiny_tokenizer):
    pairs = _pairs(40)
    a, b = _batcher(tiny_tokenizer, pairs), _batcher(tiny_tokenizer, pairs)
    c = _batcher(tiny_tokenizer, pairs, seed=1)
    for step in (0, 3, 11):
        for key, value in a.batch(step).items():
            np.testing.assert_array_equal(value, b.batch(step)[key])
    assert not np.array_equal(a.global_indices(0), c.global_indices(0))


def test_epochs_cover_each_pair_once_and_differ(tiny_tokenizer):
    batcher = _batcher(tiny_tokenizer, _pairs(20), global_batch_size=4)
    spe = batcher.steps_per_epoch
    epoch0 = np.concatenate([batcher.global_indices(s) for s in range(spe)])
    epoch1 = np.concatenate([batcher.global_indices(s) for s in range(spe, 2 * spe)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(20))
    assert not np.array_equal(epoch0, epoch1)
    np.testing.assert_array_equal(epoch1[:4], np.random.default_rng([0, 1]).permutation(20)[:4])
    # Stateless: going back to an earlier epoch gives the same batch again.
    np.testing.assert_array_equal(batcher.global_indices(1), epoch0[4:8])


def test_iterate_resumes_exactly(tiny_tokenizer):
    batcher = _batcher(tiny_tokenizer, _pairs(20), global_batch_size=4)
    from_start = [b["query_ids"] for _, b in zip(range(7), batcher)]
    resumed = [b["query_ids"] for _, b in zip(range(3), batcher.iterate(start_step=4))]
    for x, y in zip(from_start[4:], resumed):
        np.testing.assert_array_equal(x, y)


def test_process_slices_union_equals_single_process(tiny_tokenizer):
    # A few very long queries make the global batch's bucket differ from some slices'.
    pairs = _pairs(48, long_every=11)
    whole = _batcher(tiny_tokenizer, pairs, global_batch_size=16)
    parts = [_batcher(tiny_tokenizer, pairs, global_batch_size=16, process_index=p,
                      process_count=4) for p in range(4)]
    saw_uneven = False
    for step in range(6):
        full = whole.batch(step)
        sliced = [p.batch(step) for p in parts]
        for key, value in full.items():
            assert all(s[key].shape[1:] == value.shape[1:] for s in sliced), key
            np.testing.assert_array_equal(np.concatenate([s[key] for s in sliced]), value)
        local_max = [int(s["query_attention_mask"].sum(1).max()) for s in sliced]
        saw_uneven |= len({bucket_length(m, (16, 32, 64), 64) for m in local_max}) > 1
    assert saw_uneven, "test data should give slices that alone would pick different buckets"


def test_prefix_and_instruction(tiny_tokenizer):
    pairs = [GradedPair("alpha", "doc", 1.0, "q0", "d0"),
             GradedPair("beta", "doc", 0.0, "q1", "d0", instruction="find c ")]
    batcher = _batcher(tiny_tokenizer, pairs, global_batch_size=2, query_prefix="query ")
    batch = batcher.batch(0)
    by_query = {int(q): row for q, row in zip(batch["query_ids"], batch["query_input_ids"])}
    assert by_query[0][:4].tolist() == [_CLS, 9, 5, _SEP]       # query_prefix + query.
    assert by_query[1][:5].tolist() == [_CLS, 11, 14, 6, _SEP]  # instruction wins.


def test_constructor_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="multiple of process_count 3"):
        _batcher(tiny_tokenizer, _pairs(20), global_batch_size=8, process_count=3)
    with pytest.raises(ValueError, match="5 pairs are fewer than one global batch"):
        _batcher(tiny_tokenizer, _pairs(5))
    with pytest.raises(ValueError, match="process_index 4"):
        _batcher(tiny_tokenizer, _pairs(20), process_index=4, process_count=4)


def test_defaults_to_jax_process(tiny_tokenizer):
    batcher = PairBatcher(_pairs(8), tiny_tokenizer, global_batch_size=8,
                          query_max_len=16, doc_max_len=16)
    assert batcher.local_batch_size == 8 and batcher.batch(0)["grades"].shape == (8,)
