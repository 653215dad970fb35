"""Prefetching batches in a thread: same training bit for bit, errors surface, close never hangs."""

import json
import threading
import time
import traceback

import numpy as np
import pytest

from bixse_jax import train
from bixse_jax.data.batching import PairBatcher
from bixse_jax.data.prefetch import Prefetcher
from train_utils import flat_params, pairs_jsonl, tiny_config

TIMING = ("pairs_per_second", "data_wait_seconds")


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "bixse-prefetch"]


def _metrics(workdir):
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert all("data_wait_seconds" in r for r in records if "loss" in r)
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# --- the Prefetcher alone ---

@pytest.mark.parametrize("depth", [0, 1, 3])
def test_batches_in_order_and_never_past_the_end(depth):
    asked = []

    def build(step):
        asked.append(step)
        return {"step": step}

    with Prefetcher(build, 2, 7, depth=depth) as prefetch:
        got = [prefetch.get(s)["step"] for s in range(2, 7)]
        time.sleep(0.1)
        with pytest.raises(ValueError, match="next is 7"):
            prefetch.get(7)
    assert got == asked == [2, 3, 4, 5, 6]
    assert not _prefetch_threads()


def test_out_of_order_get_is_refused():
    with Prefetcher(lambda s: s, 0, 5, depth=2) as prefetch:
        with pytest.raises(ValueError, match="asked for batch 1; the next is 0"):
            prefetch.get(1)


def test_build_error_surfaces_with_its_traceback_and_the_thread_ends():
    def build(step):
        if step == 2:
            raise KeyError("bad shard at step 2")
        return step

    prefetch = Prefetcher(build, 0, 10, depth=2)
    assert [prefetch.get(0), prefetch.get(1)] == [0, 1]
    with pytest.raises(KeyError, match="bad shard") as info:
        prefetch.get(2)
    assert any(frame.name == "build" for frame in traceback.extract_tb(info.value.__traceback__))
    prefetch.close()
    assert not _prefetch_threads()


def test_close_while_the_producer_waits_on_a_full_queue_is_prompt():
    built = []
    prefetch = Prefetcher(built.append, 0, 1000, depth=2)
    deadline = time.monotonic() + 10
    while len(built) < 3 and time.monotonic() < deadline:  # 2 queued, the 3rd waits for room
        time.sleep(0.01)
    assert len(built) == 3
    tick = time.monotonic()
    prefetch.close()
    assert time.monotonic() - tick < 2.0  # not the 30 s join timeout, nor a hang
    assert not _prefetch_threads() and len(built) == 3
    with pytest.raises(RuntimeError, match="closed"):
        prefetch.get(0)


# --- in the training loop ---

def test_prefetch_trains_bit_identical_also_across_a_resume(tiny_model_dir, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    runs = {}
    for depth in (0, 2):
        config = tiny_config(tiny_model_dir, data, num_steps=6, log_every=1, checkpoint_every=3, prefetch=depth)
        _, state = train.train(config, tmp_path / f"p{depth}", show_progress=False)
        runs[depth] = state
    # Prefetch on, stopped after step 3 (the producer had built ahead) and resumed.
    config = tiny_config(tiny_model_dir, data, num_steps=6, log_every=1, checkpoint_every=3, prefetch=2)
    train.train(config, tmp_path / "resumed", stop_after_step=3, show_progress=False)
    summary, runs["resumed"] = train.train(config, tmp_path / "resumed", show_progress=False)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    for name in (2, "resumed"):
        for a, b in zip(flat_params(runs[0]), flat_params(runs[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    assert _metrics(tmp_path / "p0") == _metrics(tmp_path / "p2")
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "p2")
    assert not _prefetch_threads()


def test_a_failing_batch_stops_training_with_its_error(tiny_model_dir, tmp_path, monkeypatch):
    original = PairBatcher.batch

    def batch(self, step):
        if step == 2:
            raise OSError("unreadable shard")
        return original(self, step)
    monkeypatch.setattr(PairBatcher, "batch", batch)
    config = tiny_config(tiny_model_dir, pairs_jsonl(tmp_path / "pairs.jsonl"), num_steps=6, prefetch=2)
    with pytest.raises(OSError, match="unreadable shard") as info:
        train.train(config, tmp_path / "run", show_progress=False)
    assert any(frame.name == "batch" for frame in traceback.extract_tb(info.value.__traceback__))
    assert not _prefetch_threads()
