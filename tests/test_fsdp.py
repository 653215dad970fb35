"""Parameter sharding: a 2x4 (data x fsdp) mesh computes what an 8x1 mesh computes."""

import math

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bixse_jax import parallel, step as step_lib
from bixse_jax.default_config import base_config
from bixse_jax.models import hf_io
from bixse_jax.models.encoder import SentenceEncoder
from train_utils import adamw_reference


def _random_batch(b=16, length=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = lambda: rng.integers(1000, 3000, size=(b, length)).astype(np.int32)
    mask = np.ones((b, length), np.int32)
    mask[::3, 8:] = 0
    return {"query_input_ids": ids(), "query_attention_mask": mask, "doc_input_ids": ids(),
            "doc_attention_mask": mask[::-1].copy(), "query_ids": (np.arange(b) % 11).astype(np.int32),
            "doc_ids": np.arange(b, dtype=np.int32), "grades": rng.uniform(size=b).astype(np.float32)}


def test_param_shardings_follow_logical_rules():
    mesh = parallel.make_mesh(2, 4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    params = {"encoder": {"embeddings": {"word_embeddings": {"embedding": np.zeros((100, 32))}},
                          "encoder": {"layer": {"0": {"intermediate": {"dense": {"kernel": np.zeros((32, 64)),
                                                                                  "bias": np.zeros(64)}}}}}},
              "bias": np.float32(0)}
    shardings = parallel.param_shardings(params, mesh)
    assert shardings["encoder"]["embeddings"]["word_embeddings"]["embedding"].spec == P(None, "fsdp")
    assert shardings["encoder"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"].spec == P("fsdp", None)
    assert shardings["encoder"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["bias"].spec == P(None)
    assert shardings["bias"].spec == P()
    # A width the fsdp axis does not divide stays whole instead of failing.
    odd = parallel.param_shardings({"encoder": {"x": {"kernel": np.zeros((30, 30))}}}, mesh)
    assert odd["encoder"]["x"]["kernel"].spec == P(None, None)


def test_two_by_four_mesh_equals_eight_by_one(tiny_model_dir):
    config, enc_params, _ = hf_io.load_pretrained(tiny_model_dir, hidden_dropout_prob=0.0)
    encoder = SentenceEncoder(config)
    cfg = base_config()
    cfg.train.warmup_steps = 0  # so that the one step moves the parameters
    cfg.loss.follow_logit_params = "adam"  # the step checked against AdamW, t and b included
    tx, schedule = step_lib.make_optimizer(cfg.train)
    batch = _random_batch()
    results = {}
    for data, fsdp in ((8, 1), (2, 4)):
        mesh = parallel.make_mesh(data, fsdp)
        cfg.mesh.fsdp = fsdp
        state = step_lib.init_sharded_state(enc_params, cfg, tx, mesh)
        start = jax.device_get(state.params)  # before the step donates the state
        kernel = state.params["encoder"]["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"]
        assert kernel.sharding.spec == P("fsdp", None)
        assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape[0] == 32 // fsdp
        loss_fn = step_lib.make_loss_fn(encoder, cfg.loss, mesh, use_dropout=False)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        global_batch = parallel.global_batch(batch, mesh)
        (loss, _), grads = grad_fn(state.params, global_batch, jax.random.PRNGKey(0))
        step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, schedule), mesh, state)
        new_state, metrics = step(state, global_batch)
        results[(data, fsdp)] = (float(loss), jax.device_get(grads), jax.device_get(new_state.params),
                                 jax.device_get(new_state.opt_state))
    (l8, g8, p8, o8), (l2, g2, p2, o2) = results[(8, 1)], results[(2, 4)]
    assert math.isfinite(l8) and l2 == pytest.approx(l8, rel=1e-5)
    # Sums run in another order over another layout: equal to 1e-5 of the gradient's scale.
    scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(g8))
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * scale)
    # The optimiser step, compared as updates (new - start) against the rate, not as parameters
    # (a tolerance relative to |p| ~ 1 would hide half a step of 2e-5). The 8x1 step is AdamW
    # from its own gradient to float32 rounding; the 2x4 step equals it to 2e-3 of the rate (Adam
    # divides by |g|, so gradients near 0 amplify the layouts' float noise; measured 5e-4).
    lr = cfg.train.learning_rate
    want = adamw_reference(start, [g8], cfg.train, lrs=[lr])
    for (path, a), b, w, s in zip(jax.tree_util.tree_flatten_with_path(p8)[0], jax.tree.leaves(p2),
                                  jax.tree.leaves(want), jax.tree.leaves(start), strict=True):
        rate = lr if path[0].key == "encoder" else cfg.train.logit_params_lr
        ulps = 2 * np.spacing(np.abs(np.asarray(s, np.float32))).astype(np.float64)
        a, b, w = (np.asarray(x, np.float64) for x in (a, b, w))
        off_8x1, off_2x4 = float(np.max(np.abs(a - w) - ulps)) / rate, float(np.max(np.abs(b - a) - ulps)) / rate
        assert off_8x1 <= 1e-4, f"{jax.tree_util.keystr(path)}: 8x1 update off AdamW by {off_8x1:.2g} x the rate"
        assert off_2x4 <= 2e-3, f"{jax.tree_util.keystr(path)}: 2x4 update off 8x1's by {off_2x4:.2g} x the rate"
    # Adam's first step hides the gradient's scale (g / |g|); its moments keep it, so the clip by
    # the encoder's global norm, computed over sharded gradients, must agree here.
    adam = lambda o: [x for x in jax.tree.leaves(o, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
                      if isinstance(x, optax.ScaleByAdamState)]
    assert len(adam(o8)) == len(adam(o2)) == 2  # the encoder's and t, b's
    for s8, s2 in zip(adam(o8), adam(o2)):
        assert int(s8.count) == int(s2.count) == 1
        for m8, m2 in ((s8.mu, s2.mu), (s8.nu, s2.nu)):
            scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(m8))
            for a, b in zip(jax.tree.leaves(m8), jax.tree.leaves(m2), strict=True):
                np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-5 * scale)
