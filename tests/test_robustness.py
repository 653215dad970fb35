"""Faults during training: non-finite steps, a damaged newest checkpoint, a resume with another config."""

import json
import math
import shutil

import numpy as np
import pytest

from bixse_jax import train
from bixse_jax.data.batching import PairBatcher
from train_utils import flat_params, pairs_jsonl, tiny_config

BAD_BATCH = 3


@pytest.fixture
def nan_at_batch_3(monkeypatch):
    """Global batch 3 carries NaN grades, as a corrupted shard or a bad labeller might produce."""
    original = PairBatcher.batch

    def batch(self, step):
        out = original(self, step)
        if step == BAD_BATCH:
            out["grades"] = np.full_like(out["grades"], np.nan)
        return out
    monkeypatch.setattr(PairBatcher, "batch", batch)


def test_nonfinite_step_is_skipped_and_logged(tiny_model_dir, tmp_path, nan_at_batch_3):
    config = tiny_config(tiny_model_dir, pairs_jsonl(tmp_path / "pairs.jsonl"), num_steps=6, log_every=2)
    summary, state = train.train(config, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 6
    assert all(np.isfinite(p).all() for p in flat_params(state))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    skipped = [r for r in records if "skipped_step" in r]
    assert [r["skipped_step"] for r in skipped] == [BAD_BATCH]
    assert skipped[0]["pairs"].startswith("pairs #") and "q" in skipped[0]["pairs"]  # pair indices and ids
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


def test_nonfinite_step_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, nan_at_batch_3):
    config = tiny_config(tiny_model_dir, pairs_jsonl(tmp_path / "pairs.jsonl"), num_steps=8, log_every=4,
                         checkpoint_every=2, on_nonfinite="stop")
    with pytest.raises(FloatingPointError, match=r"training step 4 \(global batch 3\).*pairs #"):
        train.train(config, tmp_path / "run", show_progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_model_dir, tmp_path, capsys):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    config = tiny_config(tiny_model_dir, data, num_steps=4, checkpoint_every=2)
    train.train(config, tmp_path / "run", show_progress=False)
    state_dir = tmp_path / "run" / "checkpoints" / "4" / "state"
    for f in state_dir.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0garbage")
    shutil.rmtree(next(p for p in state_dir.iterdir() if p.is_dir()))
    config6 = tiny_config(tiny_model_dir, data, num_steps=6, checkpoint_every=2)
    summary, resumed = train.train(config6, tmp_path / "run", show_progress=False)
    assert summary["resumed_from_step"] == 2
    assert "checkpoint 4 is damaged" in capsys.readouterr().err
    _, reference = train.train(config6, tmp_path / "reference", show_progress=False)
    for a, b in zip(flat_params(reference), flat_params(resumed)):
        np.testing.assert_array_equal(a, b)


def test_resume_with_a_different_config_is_refused(tiny_model_dir, tmp_path):
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    train.train(tiny_config(tiny_model_dir, data, num_steps=2, checkpoint_every=2), tmp_path / "run",
                show_progress=False)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    changed = tiny_config(tiny_model_dir, data, num_steps=4, learning_rate=5e-4)
    changed.loss.name = "infonce"
    with pytest.raises(ValueError, match=r"different config") as err:
        train.train(changed, tmp_path / "run", show_progress=False)
    assert "loss.name: checkpoint 'bixse', now 'infonce'" in str(err.value)
    assert "train.learning_rate" in str(err.value) and "train.num_steps" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before
    # Longer training alone is a legal resume.
    summary, _ = train.train(tiny_config(tiny_model_dir, data, num_steps=4, checkpoint_every=2),
                             tmp_path / "run", show_progress=False)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4


def test_lengths_beyond_the_position_table_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, pairs_jsonl(tmp_path / "pairs.jsonl"))
    config.data.doc_max_len = 256  # the tiny model has 128 positions; position 200 would embed as NaN
    with pytest.raises(ValueError, match=r"data.doc_max_len=256 exceeds the 128 positions"):
        train.train(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
