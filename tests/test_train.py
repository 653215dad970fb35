"""The distributed train step and the training loop: 1 vs 8 devices, resume, failed starts."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bixse_jax import parallel, step as step_lib, train
from bixse_jax.default_config import base_config
from bixse_jax.models import hf_io
from bixse_jax.models.encoder import SentenceEncoder
from train_utils import cli_overrides, flat_params as _flat_params, pairs_jsonl as _pairs_jsonl, tiny_config as _config



def _batch_with_cross_device_duplicates(tok, b=16, seed=0):
    """16 pairs on 8 devices (2 each) where the same query and document ids recur across devices."""
    rng = np.random.default_rng(seed)
    qids = np.array([0, 1, 2, 3, 0, 4, 5, 1, 6, 2, 7, 8, 0, 9, 10, 3], np.int32)
    dids = np.array([0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9, 2, 10, 11, 5, 12], np.int32)
    qtexts = [f"query number {q} about topic {q * 7 % 5}" for q in qids]
    dtexts = [f"document {d} discusses topic {d % 5} in some detail" for d in dids]
    q = tok.encode(qtexts, 16)
    d = tok.encode(dtexts, 16)
    from bixse_jax.data.batching import pad_batch
    qi, qm = pad_batch(q, 16, tok.pad_id)
    di, dm = pad_batch(d, 16, tok.pad_id)
    return {"query_input_ids": qi, "query_attention_mask": qm, "doc_input_ids": di,
            "doc_attention_mask": dm, "query_ids": qids, "doc_ids": dids,
            "grades": rng.uniform(0.2, 1.0, size=b).astype(np.float32)}


def _bixse_reference(q, d, qids, dids, grades, t, b):
    """float64 numpy BiXSE with targets from a brute-force search over the batch's pairs."""
    q, d = np.asarray(q, np.float64), np.asarray(d, np.float64)
    logits = math.exp(t) * q @ d.T + b
    n = len(qids)
    targets = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            for k in range(n):
                if qids[k] == qids[i] and dids[k] == dids[j]:
                    targets[i, j] = max(targets[i, j], grades[k])
    bce = np.logaddexp(0, logits) - targets * logits
    return bce.sum() / n


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from bixse_jax.data.tokenizer import Tokenizer
    config, params, _ = hf_io.load_pretrained(tiny_model_dir, hidden_dropout_prob=0.0)
    return SentenceEncoder(config), params, Tokenizer.from_model_dir(tiny_model_dir)


def test_eight_devices_equal_one_device(tiny):
    """Loss and gradients on an 8-device mesh equal 1 device, with ids repeating across devices."""
    encoder, enc_params, tok = tiny
    assert jax.device_count() == 8
    cfg = base_config().loss
    cfg.follow_logit_params = "adam"  # the loss at the given t, b (the refit on 8 devices: test_blocked_loss)
    batch = _batch_with_cross_device_duplicates(tok)
    params = {"encoder": enc_params, "log_temperature": jnp.float32(math.log(10.0)), "bias": jnp.float32(-10.0)}
    results = {}
    for n in (1, 8):
        mesh = parallel.make_mesh(n)
        loss_fn = step_lib.make_loss_fn(encoder, cfg, mesh, use_dropout=False)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        p = jax.device_put(params, parallel.replicated(mesh))
        (loss, _), grads = grad_fn(p, parallel.global_batch(batch, mesh), jax.random.PRNGKey(0))
        assert len(parallel.global_batch(batch, mesh)["grades"].sharding.device_set) == n
        results[n] = (float(loss), jax.device_get(grads))
    assert results[8][0] == pytest.approx(results[1][0], rel=1e-5)
    # The word-embedding gradient sums every token's contribution, in another order on 8 devices:
    # float32 reassociation moves entries by up to ~1e-6 of the largest (measured: 7e-7 with jax's
    # attention, 9e-7 with einsum_attention); a wrong gradient is off by far more.
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[8][1])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6 * max(1.0, float(np.abs(a).max())))
    # And both equal an independent float64 computation with the labels in the right order.
    q = encoder(enc_params, batch["query_input_ids"], batch["query_attention_mask"])
    d = encoder(enc_params, batch["doc_input_ids"], batch["doc_attention_mask"])
    want = _bixse_reference(q, d, batch["query_ids"], batch["doc_ids"], batch["grades"], math.log(10.0), -10.0)
    assert results[8][0] == pytest.approx(want, rel=1e-5)


def test_ablations_change_the_targets(tiny):
    encoder, enc_params, tok = tiny
    batch = {k: jnp.asarray(v) for k, v in _batch_with_cross_device_duplicates(tok).items()}
    cfg = base_config().loss
    targets, labelled, mask = step_lib.batch_targets(batch, cfg)
    assert int(labelled.sum()) > 16  # duplicates label off-diagonal cells
    cfg.diagonal_only = True
    t_diag, l_diag, _ = step_lib.batch_targets(batch, cfg)
    assert int(l_diag.sum()) == 16 and np.allclose(np.diag(t_diag), batch["grades"])
    cfg.diagonal_only, cfg.binarize_threshold = False, 0.5
    t_bin, _, _ = step_lib.batch_targets(batch, cfg)
    assert set(np.unique(np.asarray(t_bin))) <= {0.0, 1.0}


def test_resume_is_bit_identical(tiny_model_dir, tmp_path):
    """Stopped at step 6 and resumed to 12 ends exactly where an uninterrupted 12-step run ends."""
    data = _pairs_jsonl(tmp_path / "pairs.jsonl")
    config = _config(tiny_model_dir, data)
    full_summary, full = train.train(config, tmp_path / "full", show_progress=False)
    assert full_summary["steps"] == 12
    part_summary, _ = train.train(config, tmp_path / "resumed", stop_after_step=6, show_progress=False)
    assert part_summary["steps"] == 6
    resumed_summary, resumed = train.train(config, tmp_path / "resumed", show_progress=False)
    assert resumed_summary["resumed_from_step"] == 6 and resumed_summary["steps"] == 12
    for a, b in zip(_flat_params(full), _flat_params(resumed)):
        np.testing.assert_array_equal(a, b)
    opt_a, opt_b = jax.tree.leaves(jax.device_get(full.opt_state)), jax.tree.leaves(jax.device_get(resumed.opt_state))
    for a, b in zip(opt_a, opt_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The parameters moved, and the metrics log covers every logging step.
    start = hf_io.load_pretrained(tiny_model_dir)[1]
    assert not np.array_equal(_flat_params(full)[-1], np.asarray(jax.tree.leaves(start)[-1]))
    rows = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 3, 6, 9, 12]  # 0: the fitted t, b of the fresh start, not again on resume
    assert "init/bias" in rows[0] and "loss" not in rows[0]


def test_loss_goes_down_on_a_fixed_task(tiny_model_dir, tmp_path):
    """The encoder alone lowers the loss: t and b are frozen, so b rising cannot do it for it."""
    data = _pairs_jsonl(tmp_path / "pairs.jsonl")
    config = _config(tiny_model_dir, data, num_steps=30, log_every=10, learning_rate=3e-3)
    config.loss.learn_temperature, config.loss.learn_bias = False, False
    train.train(config, tmp_path / "run", show_progress=False)
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    # Logged values are float32 means over the logged steps: equal to the init up to an ulp.
    assert all(m["bias"] == pytest.approx(config.loss.init_bias, rel=1e-6) for m in logged)
    assert all(m["log_temperature"] == pytest.approx(config.loss.init_log_temperature, rel=1e-6) for m in logged)
    assert logged[-1]["loss"] < 0.8 * logged[0]["loss"]  # measured: 8.07 -> 4.65
    for key in ("loss", "learning_rate", "log_temperature", "bias", "positive_logit", "negative_logit",
                "grad_norm", "pairs_per_second"):
        assert all(np.isfinite(m[key]) for m in logged), key


def test_failed_start_leaves_workdir_untouched(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "document": "b", "score": 0.5}\n{"query": "a", "document": "c", "score": 1.5}\n')
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("precious")
    with pytest.raises(ValueError, match=r"bad.jsonl:2.*score"):
        train.train(_config(tiny_model_dir, bad), workdir, show_progress=False)
    assert [p.name for p in workdir.iterdir()] == ["keep.txt"]
    assert (workdir / "keep.txt").read_text() == "precious"
    missing_model = _config(tiny_model_dir, bad)
    missing_model.model.name_or_path = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="nowhere"):
        train.train(missing_model, tmp_path / "run2", show_progress=False)
    assert not (tmp_path / "run2").exists()


def test_cli_train_writes_checkpoints_and_metrics(tiny_model_dir, tmp_path):
    data = _pairs_jsonl(tmp_path / "pairs.jsonl")
    workdir = tmp_path / "cli_run"
    # train.adam_b1 is read by the optimiser: an override of it must reach the run (it once raised).
    cmd = [sys.executable, "-m", "bixse_jax.cli", "train", "--workdir", str(workdir),
           *cli_overrides(tiny_model_dir, data, **{"train.num_steps": 4, "train.log_every": 2,
                                                   "train.checkpoint_every": 2, "train.adam_b1": 0.95})]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((workdir / "summary.jsonl").read_text())  # the JSON goes there, not to the terminal
    assert summary["steps"] == 4 and summary["command"].startswith("bixse-jax train --workdir")
    # The terminal ends with what a person wants next: where the model is and the commands to use it.
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("bixse-jax: trained 4 steps in ") and "{" not in out.stdout
    assert f"model: {workdir} (checkpoint 4); full summary: {workdir}/summary.jsonl" in lines
    assert f"  bixse-jax export --workdir {workdir} --format sentence-transformers --out {workdir}-st" in lines
    assert lines[-1].startswith(f"  bixse-jax eval --model {workdir} --beir BEIR_FOLDER")
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")] == [0, 2, 4]  # 0: the t, b fit
    assert json.loads((workdir / "config.json").read_text())["train"]["adam_b1"] == 0.95


def test_grad_cache_switch_trains_like_the_plain_step(tiny_model_dir, tmp_path):
    """Three steps with and without caching end alike. With t and b under Adam: the tiny random model's
    cosines do not rise with the targets, so a refit sits at exp(t)'s floor, where float noise moves it."""
    data = _pairs_jsonl(tmp_path / "pairs.jsonl")

    def config(**overrides):
        c = _config(tiny_model_dir, data, num_steps=3, **overrides)
        c.loss.follow_logit_params = "adam"
        return c
    _, plain = train.train(config(), tmp_path / "plain", show_progress=False)
    _, cached = train.train(config(grad_cache_chunk=8), tmp_path / "cached", show_progress=False)
    for a, b in zip(_flat_params(plain), _flat_params(cached)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="12"):
        train.train(_config(tiny_model_dir, data, grad_cache_chunk=12), tmp_path / "bad", show_progress=False)
    assert not (tmp_path / "bad").exists()
