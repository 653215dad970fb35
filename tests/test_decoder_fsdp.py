"""A decoder (qwen3: grouped-query attention, q/k norms) under FSDP and gradient caching: a 2x4 (data x fsdp)
mesh computes the 8x1 mesh's loss, gradients and update, with parameters and Adam moments really split;
the gradient-cached step equals the plain one."""

import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bixse_jax import grad_cache, parallel, step as step_lib
from bixse_jax.default_config import base_config
from bixse_jax.models import architectures
from bixse_jax.models.architectures import init_params
from bixse_jax.models.decoder import DecoderConfig
from bixse_jax.models.encoder import SentenceEncoder

CONFIG = DecoderConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, intermediate_size=64, model_type="qwen3", eos_token_id=2)
B = 16


def _batch(seed=0):
    """Left-padded queries and right-padded documents of uneven lengths (both sides must work)."""
    rng = np.random.default_rng(seed)
    q_len, d_len = rng.integers(2, 9, size=(B, 1)), rng.integers(3, 13, size=(B, 1))
    return {"query_input_ids": rng.integers(3, 128, size=(B, 8)).astype(np.int32),
            "query_attention_mask": (np.arange(8)[None, ::-1] < q_len).astype(np.int32),
            "doc_input_ids": rng.integers(3, 128, size=(B, 12)).astype(np.int32),
            "doc_attention_mask": (np.arange(12)[None, :] < d_len).astype(np.int32),
            "query_ids": (np.arange(B) % 5).astype(np.int32), "doc_ids": np.arange(B, dtype=np.int32),
            "grades": rng.uniform(size=B).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
    # Twice HF's init scale, so the embeddings (and the gradients) are far from trivial.
    params = jax.tree.map(lambda x: np.asarray(x) * 2.0, jax.device_get(init_params(CONFIG, jax.random.key(0))))
    return SentenceEncoder(CONFIG, pooling="last"), params, architectures.param_axes(CONFIG)


def _run(setup, data, fsdp, chunk=None):
    encoder, enc_params, axes = setup
    cfg = base_config()
    cfg.train.warmup_steps, cfg.train.learning_rate, cfg.mesh.fsdp = 0, 1e-3, fsdp
    # t, b under Adam: the random decoder's cosines do not rise with the targets, so a refit would sit
    # at exp(t)'s floor, where the encoder's gradient is all but zero (nothing to compare).
    cfg.loss.follow_logit_params = "adam"
    tx, schedule = step_lib.make_optimizer(cfg.train)
    mesh = parallel.make_mesh(data, fsdp)
    state = step_lib.init_sharded_state(enc_params, cfg, tx, mesh, encoder_axes=axes)
    q = state.params["encoder"]["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]  # [embed 32, heads 64]
    mu = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0].mu["encoder"]["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    shapes = ({s.data.shape for s in q.addressable_shards}, {s.data.shape for s in mu.addressable_shards},
              q.sharding.spec, mu.sharding.spec)
    start = jax.device_get(state.params)
    loss_fn = step_lib.make_loss_fn(encoder, cfg.loss, mesh, use_dropout=False)
    batch = parallel.global_batch(_batch(), mesh)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, batch, jax.random.PRNGKey(0))
    if chunk:
        step_fn = grad_cache.make_cached_train_step(step_lib.make_embed_fn(encoder, False),
                                                    step_lib.make_objective(cfg.loss, mesh), tx, schedule,
                                                    chunk=chunk, mesh=mesh,
                                                    encoder_specs=grad_cache.param_specs(state.params["encoder"]))
    else:
        step_fn = step_lib.make_train_step(loss_fn, tx, schedule)
    new_state, metrics = step_lib.jit_train_step(step_fn, mesh, state)(state, batch)
    return dict(loss=float(loss), grads=jax.device_get(grads), start=start, shapes=shapes,
                params=jax.device_get(new_state.params), metrics=jax.device_get(metrics))


def _close(got, want, tol=1e-5):
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    worst = 0.0
    for (path, w), g in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale, err_msg=jax.tree_util.keystr(path))
        worst = max(worst, float(np.abs(np.asarray(g) - np.asarray(w)).max()))
    return worst


@pytest.fixture(scope="module")
def two_by_four(setup):
    return _run(setup, 2, 4)


def test_decoder_two_by_four_mesh_equals_eight_by_one(setup, two_by_four):
    a, b = _run(setup, 8, 1), two_by_four
    # Split 4 ways: q_proj by its input (embed) axis, down_proj's Adam moment by its output (embed) axis.
    assert b["shapes"] == ({(8, 64)}, {(64, 8)}, P("fsdp", None), P(None, "fsdp"))
    assert a["shapes"][:2] == ({(32, 64)}, {(64, 32)})
    assert math.isfinite(a["loss"]) and b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    assert float(optax.tree.norm(a["grads"]["encoder"])) > 1e-3
    worst_grad = _close(b["grads"], a["grads"])
    moved = max(float(np.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(a["start"])))
    assert moved > 1e-4  # the step moved the parameters
    worst_param = _close(b["params"], a["params"])
    print(f"[decoder fsdp] loss {a['loss']:.6f} vs {b['loss']:.6f}; max |grad diff| {worst_grad:.2g}, "
          f"max |param diff| {worst_param:.2g}")


def test_decoder_gradient_cached_step_equals_plain_step(setup, two_by_four):
    plain, cached = two_by_four, _run(setup, 2, 4, chunk=8)  # two sub-batches of 8 pairs, one per device
    assert float(cached["metrics"]["loss"]) == pytest.approx(float(plain["metrics"]["loss"]), rel=1e-5)
    assert float(cached["metrics"]["grad_norm"]) == pytest.approx(float(plain["metrics"]["grad_norm"]), rel=1e-5)
    worst = _close(cached["params"], plain["params"])
    print(f"[decoder grad cache] loss {float(cached['metrics']['loss']):.6f}, max |param diff| {worst:.2g}")
