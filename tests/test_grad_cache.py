"""Gradient caching: the cached step's loss and gradients equal plain backprop, on 1 and 8 devices."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bixse_jax import grad_cache, parallel, step as step_lib
from bixse_jax.default_config import base_config
from bixse_jax.models import hf_io
from bixse_jax.models.encoder import SentenceEncoder

B = 32


def _batch(seed: int = 0) -> dict[str, np.ndarray]:
    """32 random pairs with ragged document padding and queries that repeat across devices."""
    rng = np.random.default_rng(seed)
    doc_len = rng.integers(3, 17, size=(B, 1))
    return {
        "query_input_ids": rng.integers(1000, 30000, size=(B, 8)).astype(np.int32),
        "query_attention_mask": np.ones((B, 8), np.int32),
        "doc_input_ids": rng.integers(1000, 30000, size=(B, 16)).astype(np.int32),
        "doc_attention_mask": (np.arange(16)[None, :] < doc_len).astype(np.int32),
        "query_ids": (np.arange(B) % 10).astype(np.int32),  # query 0 is at rows 0, 10, 20, 30
        "doc_ids": (np.arange(B) % 24).astype(np.int32),
        "grades": rng.uniform(0.2, 1.0, size=B).astype(np.float32),
    }


def _loss_cfg():
    """The loss at the given t, b, whose gradients these tests compare (a refit gives them none; the
    refit on every path: test_blocked_loss.test_refit_is_the_same_fit_on_every_path)."""
    cfg = base_config().loss
    cfg.follow_logit_params = "adam"
    return cfg


def _load(tiny_model_dir, dropout: float):
    config, enc_params, _ = hf_io.load_pretrained(tiny_model_dir, hidden_dropout_prob=dropout)
    params = {"encoder": enc_params, "log_temperature": jnp.float32(math.log(10.0)), "bias": jnp.float32(-10.0)}
    return SentenceEncoder(config), params


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return _load(tiny_model_dir, dropout=0.0)


def _on_mesh(params, mesh):
    batch = _batch()
    if mesh is None:
        return params, {k: jnp.asarray(v) for k, v in batch.items()}
    return jax.device_put(params, parallel.replicated(mesh)), parallel.global_batch(batch, mesh)


def _assert_grads_close(got, want):
    """Per leaf to 1e-5 relative; absolute slack of 1e-6 of the largest gradient, because some leaves
    (attention key biases: softmax ignores them) have a true gradient of 0 and hold float noise."""
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(want)),
                            jax.tree.leaves(jax.device_get(got))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))
    diff = jax.tree.map(lambda a, b: a - b, got, want)
    assert float(optax.tree.norm(diff)) <= 1e-5 * float(optax.tree.norm(want))


@pytest.fixture(scope="module")
def plain(tiny):
    """train.py's plain (uncached) loss and gradients on one device: the reference for every layout."""
    encoder, params = tiny
    _, batch = _on_mesh(params, None)
    loss_fn = step_lib.make_loss_fn(encoder, _loss_cfg(), None, use_dropout=False)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.PRNGKey(3))
    assert float(optax.tree.norm(grads["encoder"])) > 1e-3 and abs(float(grads["bias"])) > 1e-3  # not trivially 0
    return float(loss), jax.device_get(metrics), jax.device_get(grads)


@pytest.mark.parametrize("devices,chunk", [(1, 16), (8, 8)])  # and 8 devices, chunk 16, in the FSDP train-step test
def test_cached_loss_and_gradients_equal_plain_backprop(tiny, plain, devices, chunk):
    """Dropout off: GradCache is exact, so it must match the plain loss fn of train.py."""
    encoder, params = tiny
    want_loss, want_metrics, want = plain
    mesh = parallel.make_mesh(devices)
    params, batch = _on_mesh(params, mesh)
    cfg = _loss_cfg()
    cached_fn = grad_cache.make_cached_loss_fn(step_lib.make_embed_fn(encoder, False),
                                               step_lib.make_objective(cfg, mesh), chunk=chunk, mesh=mesh)
    (got_loss, got_metrics), got = jax.jit(jax.value_and_grad(cached_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(3))
    assert len(batch["grades"].sharding.device_set) == devices
    assert float(got_loss) == pytest.approx(want_loss, rel=1e-5)
    for k in want_metrics:
        assert float(got_metrics[k]) == pytest.approx(float(want_metrics[k]), rel=1e-5, abs=1e-6), k
    _assert_grads_close(got, want)


def test_cached_train_step_equals_plain_update_with_fsdp(tiny, plain):
    """The whole jitted step through step_lib.jit_train_step on a 4 (data) x 2 (fsdp) mesh with the
    parameters and optimiser state sharded: its metrics and AdamW update equal those computed
    from the plain gradients."""
    encoder, params = tiny
    want_loss, _, want_grads = plain
    config = base_config()
    config.loss = _loss_cfg()
    config.train.learning_rate, config.train.warmup_steps, config.mesh.fsdp = 1e-3, 0, 2
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    tx, schedule = step_lib.make_optimizer(config.train)
    start = jax.device_get(step_lib.init_state(params["encoder"], config.loss, tx, seed=0))  # host copy: the step donates
    state = step_lib.init_sharded_state(params["encoder"], config, tx, mesh)
    kernel = state.params["encoder"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
    assert "fsdp" in str(kernel.sharding.spec)  # the layout under test really is sharded
    step_fn = grad_cache.make_cached_train_step(
        step_lib.make_embed_fn(encoder, False), step_lib.make_objective(config.loss, mesh), tx, schedule,
        chunk=16, mesh=mesh, encoder_specs=grad_cache.param_specs(state.params["encoder"]))
    state, metrics = step_lib.jit_train_step(step_fn, mesh, state)(state, parallel.global_batch(_batch(), mesh))
    state, metrics = jax.device_get((state, metrics))
    assert int(state.step) == 1 and float(metrics["nonfinite"]) == 0.0
    assert float(metrics["loss"]) == pytest.approx(want_loss, rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(want_grads)), rel=1e-5)
    update = jax.jit(lambda g, opt_state, p: optax.apply_updates(p, tx.update(g, opt_state, p)[0]))
    want_params = jax.device_get(update(want_grads, start.opt_state, start.params))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(start.params)))
    assert moved > 1e-4  # the parameters did change
    for a, b in zip(jax.tree.leaves(want_params), jax.tree.leaves(state.params)):
        # Adam divides by |g|: gradients near 0 amplify float noise, so compare to 0.1% of the rate.
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-3 * config.train.learning_rate)


def test_dropout_cached_equals_backprop_with_the_same_sub_batch_keys(tiny_model_dir, plain):
    """Dropout on: the cached gradient equals plain backprop through the same sub-batched forward
    (`make_chunked_loss_fn`, same per-sub-batch, per-device keys); dropout is really active, and
    the same key gives the same result."""
    encoder, params = _load(tiny_model_dir, dropout=0.1)
    mesh = parallel.make_mesh(8)
    params, batch = _on_mesh(params, mesh)
    cfg = _loss_cfg()
    kwargs = dict(chunk=8, mesh=mesh)
    embed_loss = step_lib.make_objective(cfg, mesh)
    cached = jax.jit(jax.value_and_grad(grad_cache.make_cached_loss_fn(
        step_lib.make_embed_fn(encoder, True), embed_loss, **kwargs), has_aux=True))
    reference = jax.jit(jax.value_and_grad(grad_cache.make_chunked_loss_fn(
        step_lib.make_embed_fn(encoder, True), embed_loss, **kwargs), has_aux=True))
    rng = jax.random.PRNGKey(7)
    (got_loss, _), got = cached(params, batch, rng)
    (want_loss, _), want = reference(params, batch, rng)
    assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)
    _assert_grads_close(got, want)
    (again_loss, _), again = cached(params, batch, rng)
    assert float(again_loss) == float(got_loss)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    other_loss = float(cached(params, batch, jax.random.PRNGKey(8))[0][0])
    assert other_loss != float(got_loss) and plain[0] != pytest.approx(float(got_loss), rel=1e-4)


def test_bad_chunk_is_a_clear_error(tiny):
    encoder, params = tiny
    mesh = parallel.make_mesh(8)
    cfg = _loss_cfg()
    with pytest.raises(ValueError, match=r"grad_cache_chunk=12 does not divide the global batch of 32"):
        grad_cache.check_chunk(32, 12, mesh)
    with pytest.raises(ValueError, match=r"grad_cache_chunk=4 is not a multiple of the 8 devices"):
        grad_cache.check_chunk(32, 4, mesh)
    with pytest.raises(ValueError, match=r"grad_cache_chunk=0"):
        grad_cache.check_chunk(32, 0, None)
    assert grad_cache.check_chunk(32, 8, mesh) == 4 and grad_cache.check_chunk(32, 4, None) == 8
    # The step itself refuses a chunk that does not fit the batch it is given, at trace time.
    params, batch = _on_mesh(params, mesh)
    loss_fn = grad_cache.make_cached_loss_fn(step_lib.make_embed_fn(encoder, False),
                                             step_lib.make_objective(cfg, mesh), chunk=12, mesh=mesh)
    with pytest.raises(ValueError, match="does not divide"):
        jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch, jax.random.PRNGKey(0))
