"""Matryoshka: the loss over prefixes equals the losses of truncated, renormalised embeddings added
by hand (dense, blocked, ring, gradient caching); evaluators report each prefix; encode --dim; the
export records the dims."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bixse_jax import grad_cache, losses, matryoshka, parallel, step
from bixse_jax.default_config import base_config
from bixse_jax.errors import ConfigError

B, H = 32, 16
DIMS, WEIGHTS = (4, 8, "full"), (0.5, 1.0, 2.0)
PARAMS = {"log_temperature": np.float32(1.2), "bias": np.float32(-2.0)}


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Repeating query and document ids, so off-diagonal cells are labelled too."""
    rng = np.random.default_rng(seed)
    return {"query_ids": rng.integers(0, B // 4, B).astype(np.int32),
            "doc_ids": rng.integers(0, B // 2, B).astype(np.int32),
            "grades": rng.choice([0.0, 0.3, 0.6, 1.0], B).astype(np.float32)}


def _unit_embeddings(seed: int = 1):
    rng = np.random.default_rng(seed)
    q, d = rng.normal(size=(2, B, H)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)


def _cfg(name="bixse", impl="dense", dims=(), weights=(), block_size=7):
    cfg = base_config().loss
    cfg.name, cfg.impl, cfg.block_size = name, impl, block_size
    cfg.matryoshka_dims, cfg.matryoshka_weights = dims, weights
    return cfg


def _by_hand(name, q, d, batch):
    """sum_k w_k * (plain dense loss of q[:, :k], d[:, :k], each row rescaled to unit length), written out."""
    objective = step.make_objective(_cfg(name), None)

    def total(p, q, d):
        out = 0.0
        for k, w in zip((4, 8, H), WEIGHTS):
            qk, dk = q[:, :k], d[:, :k]
            qk = qk / jnp.linalg.norm(qk, axis=1, keepdims=True)
            dk = dk / jnp.linalg.norm(dk, axis=1, keepdims=True)
            out = out + w * objective(p, qk, dk, batch)[0]
        return out
    return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(PARAMS, jnp.asarray(q), jnp.asarray(d))


def _matryoshka(cfg, q, d, batch, mesh=None):
    objective = step.make_objective(cfg, mesh)
    if mesh is not None:
        batch = parallel.global_batch(batch, mesh)
        q, d = (jax.device_put(x, parallel.batch_sharding(mesh)) for x in (q, d))
    fn = jax.value_and_grad(lambda p, q, d: objective(p, q, d, batch), argnums=(0, 1, 2), has_aux=True)
    return jax.device_get(jax.jit(fn)(PARAMS, q, d))


def _assert_close(got, want):
    (loss, _), grads = got
    want_loss, want_grads = want
    np.testing.assert_allclose(loss, want_loss, rtol=2e-6)
    scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6 * scale)
    assert float(np.abs(want_grads[1]).max()) > 1e-3  # not a comparison of zeros


CASES = ([(name, "dense", 1) for name in losses.supporting("dense")]
         + [(name, "blocked", 1) for name in losses.supporting("blocked")]
         + [("bixse", "ring", 8), ("infonce", "ring", 8)])


@pytest.mark.parametrize("name,impl,devices", CASES)
def test_loss_is_the_weighted_sum_over_truncated_renormalised_embeddings(name, impl, devices):
    batch = _batch()
    q, d = _unit_embeddings()
    want = _by_hand(name, q, d, {k: jnp.asarray(v) for k, v in batch.items()})
    mesh = parallel.make_mesh(devices) if impl == "ring" else None
    got = _matryoshka(_cfg(name, impl, DIMS, WEIGHTS), q, d, batch, mesh)
    _assert_close(got, want)
    metrics = got[0][1]
    assert sorted(k for k in metrics if k.startswith("loss/")) == ["loss/dim16", "loss/dim4", "loss/dim8"]
    added = sum(w * float(metrics[f"loss/dim{k}"]) for k, w in zip((4, 8, H), WEIGHTS))
    assert float(metrics["loss"]) == pytest.approx(added, rel=1e-6)
    assert float(metrics["loss/dim4"]) != pytest.approx(float(metrics["loss/dim16"]), rel=1e-3)


def test_no_dims_leaves_the_objective_as_it_was():
    cfg = _cfg()
    plain = step.make_objective(cfg, None)
    assert matryoshka.wrap_objective(plain, cfg, True) is plain
    q, d = _unit_embeddings()
    (_, metrics), _ = _matryoshka(cfg, q, d, _batch())
    assert not any(k.startswith("loss/") for k in metrics)


def test_a_dot_product_model_is_truncated_without_renormalising():
    x = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(matryoshka.truncate(x, 2, normalize=False), x[:, :2])
    unit = matryoshka.truncate(x, 2, normalize=True)
    assert isinstance(unit, np.ndarray)
    np.testing.assert_allclose(unit, x[:, :2] / np.linalg.norm(x[:, :2], axis=1, keepdims=True), rtol=1e-6)
    assert isinstance(matryoshka.truncate(jnp.asarray(x), 2), jax.Array)


@pytest.mark.parametrize("dims,weights,message", [
    ((8, 4), (), "increase strictly"),
    ((4, 32), (), "1..16"),
    ((4, "all"), (), "'all'"),
    ((4, 8), (1.0,), "one weight per entry"),
    ((4, 8), (1.0, 0.0), "positive"),
    ((), (1.0,), "matryoshka_dims is empty"),
])
def test_bad_settings_name_the_key(dims, weights, message):
    with pytest.raises(ConfigError, match="loss.matryoshka_") as info:
        matryoshka.check(_cfg(dims=dims, weights=weights), H)
    assert message in str(info.value)


def test_gradient_caching_equals_plain_backprop(tiny_model_dir):
    """The cached step differentiates the same Matryoshka objective: loss, per-dim losses and gradients
    equal train.py's plain loss fn on 8 devices (the tiny model is 32 wide: prefixes 8, 16, 32)."""
    from bixse_jax.models import hf_io
    from bixse_jax.models.encoder import SentenceEncoder
    config, enc_params, _ = hf_io.load_pretrained(tiny_model_dir, hidden_dropout_prob=0.0)
    encoder = SentenceEncoder(config)
    params = {"encoder": enc_params, "log_temperature": jnp.float32(math.log(10.0)), "bias": jnp.float32(-3.0)}
    rng = np.random.default_rng(0)
    batch = {"query_input_ids": rng.integers(1000, 30000, (B, 8)).astype(np.int32),
             "query_attention_mask": np.ones((B, 8), np.int32),
             "doc_input_ids": rng.integers(1000, 30000, (B, 12)).astype(np.int32),
             "doc_attention_mask": (np.arange(12)[None] < rng.integers(3, 13, (B, 1))).astype(np.int32),
             **_batch()}
    cfg = _cfg(dims=(8, 16, "full"), weights=(1.0, 0.5, 1.0))
    key = jax.random.PRNGKey(0)
    plain = step.make_loss_fn(encoder, cfg, None, use_dropout=False)
    (want_loss, want_metrics), want = jax.jit(jax.value_and_grad(plain, has_aux=True))(
        params, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    mesh = parallel.make_mesh(8)
    cached = grad_cache.make_cached_loss_fn(step.make_embed_fn(encoder, False), step.make_objective(cfg, mesh),
                                            chunk=16, mesh=mesh)
    (loss, metrics), got = jax.jit(jax.value_and_grad(cached, has_aux=True))(
        jax.device_put(params, parallel.replicated(mesh)), parallel.global_batch(batch, mesh), key)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for k in ("loss/dim8", "loss/dim16", "loss/dim32"):
        assert float(metrics[k]) == pytest.approx(float(want_metrics[k]), rel=1e-5), k
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale)
    assert abs(float(want["bias"])) > 1e-3
