"""A loss defined and registered in this file alone trains through the real step, in every form.

The toy loss is the Brier score, (sigmoid(L) - T)^2 summed per row and averaged over rows: a sum
over each row's cells, so it declares `additive` and its ring fold (and that fold's gradient) is
derived from its row form by the registry. No library file names it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bixse_jax import blocked_loss, logit_init, losses, parallel, step
from bixse_jax.default_config import base_config
from bixse_jax.errors import ConfigError
from bixse_jax.losses.numerics import prepare, row_mean
from bixse_jax.models.bert import EncoderConfig, init_params
from bixse_jax.models.encoder import SentenceEncoder
from test_targets import brute_force_targets

NAME = "toy_brier"
B, T = 16, 6
TINY = dict(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0)


def brier_rows(logits, targets, mask):
    logits, targets, mask = prepare(logits, targets, mask)
    sq = jnp.where(mask, jnp.square(jax.nn.sigmoid(logits) - targets), 0.0)
    return jnp.sum(sq, axis=-1), jnp.any(mask, axis=-1)


def brier(logits, targets, mask=None):
    return row_mean(*brier_rows(logits, targets, mask))


@pytest.fixture
def toy():
    loss = losses.register(losses.Loss(NAME, dense=brier, rows=brier_rows, additive=True))
    yield loss
    del losses.REGISTRY[NAME]  # leave the registry as the other tests expect it


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {"query_input_ids": rng.integers(1, TINY["vocab_size"], (B, T)).astype(np.int32),
            "query_attention_mask": np.ones((B, T), np.int32),
            "doc_input_ids": rng.integers(1, TINY["vocab_size"], (B, T)).astype(np.int32),
            "doc_attention_mask": (np.arange(T)[None] < rng.integers(2, T + 1, (B, 1))).astype(np.int32),
            "query_ids": rng.integers(0, B // 2, B).astype(np.int32),  # repeats: off-diagonal labels
            "doc_ids": rng.integers(0, B // 2, B).astype(np.int32),
            "grades": rng.choice([0.0, 0.3, 0.7, 1.0], B).astype(np.float32)}


def _brier_reference(q, d, batch, t, b):
    """float64 numpy Brier score with targets from a brute-force search over the batch's pairs."""
    q, d = np.asarray(q, np.float64), np.asarray(d, np.float64)
    z = np.exp(t) * q @ d.T + b
    targets, _ = brute_force_targets(batch["query_ids"], batch["doc_ids"], batch["grades"].astype(np.float64))
    return np.sum((1 / (1 + np.exp(-z)) - targets) ** 2) / len(z)


def _one_step(cfg, mesh, encoder, encoder_params, batch):
    tx, schedule = step.make_optimizer(cfg.train)
    state = step.init_sharded_state(encoder_params, cfg, tx, mesh)
    start = jax.device_get(state.params)
    loss_fn = step.make_loss_fn(encoder, cfg.loss, mesh, use_dropout=False)
    train_step = step.jit_train_step(step.make_train_step(loss_fn, tx, schedule), mesh, state)
    state, metrics = train_step(state, parallel.global_batch(batch, mesh))
    return start, jax.device_get(state.params), jax.device_get(metrics)


def test_toy_loss_has_every_form(toy):
    assert toy.impls == ("dense", "blocked", "ring")
    assert NAME in losses.supporting("ring") and not toy.logistic_optimum


@pytest.mark.parametrize("impl", ["dense", "blocked", "ring"])
def test_toy_loss_trains_a_step_on_8_devices(toy, impl):
    """One real train step under the toy loss: its loss is the toy's, computed independently, and
    the step moves the encoder, t and b by the same amounts whichever form computed it."""
    cfg = base_config()
    cfg.loss.name, cfg.loss.impl, cfg.loss.block_size = NAME, impl, 4
    cfg.loss.init_log_temperature, cfg.loss.init_bias = 1.0, -0.5
    cfg.train.update(dict(schedule="constant", warmup_steps=0, learning_rate=1e-2))
    mesh = parallel.make_mesh(8)
    assert blocked_loss.choose_impl(cfg.loss, mesh, B) == impl
    encoder = SentenceEncoder(EncoderConfig(**TINY))
    encoder_params = jax.device_get(init_params(encoder.config, jax.random.key(0)))
    batch = _batch()

    start, end, metrics = _one_step(cfg, mesh, encoder, encoder_params, batch)
    q = encoder(encoder_params, jnp.asarray(batch["query_input_ids"]), jnp.asarray(batch["query_attention_mask"]))
    d = encoder(encoder_params, jnp.asarray(batch["doc_input_ids"]), jnp.asarray(batch["doc_attention_mask"]))
    want = _brier_reference(q, d, batch, 1.0, -0.5)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["nonfinite"]) == 0.0
    for key in ("log_temperature", "bias"):
        assert abs(float(end[key] - start[key])) > 1e-3  # Adam steps each scalar by about the rate x 100
    moved = [np.abs(e - s).max() for e, s in zip(jax.tree.leaves(end["encoder"]), jax.tree.leaves(start["encoder"]))]
    assert max(moved) > 1e-3

    if impl != "dense":  # the derived blocked and ring forms take the dense form's step
        cfg.loss.impl = "dense"
        _, dense_end, _ = _one_step(cfg, mesh, encoder, encoder_params, batch)
        for g, w in zip(jax.tree.leaves(end), jax.tree.leaves(dense_end)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_toy_loss_is_refused_where_it_declares_nothing(toy):
    cfg = base_config().loss
    cfg.name, cfg.init_logit_params, cfg.follow_logit_params = NAME, "auto", "refit"
    assert logit_init.init_mode(cfg) == "fixed"  # no optimum declared: nothing to fit at the start
    with pytest.raises(ConfigError, match="has no such optimum"):
        logit_init.check_follow(cfg)
    with pytest.raises(ValueError, match="already registered"):
        losses.register(toy)


def test_an_unregistered_name_is_a_config_error():
    cfg = base_config().loss
    cfg.name = NAME
    with pytest.raises(ConfigError, match="is not one of"):
        step.make_objective(cfg, None)
