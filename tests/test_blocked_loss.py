"""The blocked and ring losses equal the dense loss (value, metrics, gradients), with no [B, B] array."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bixse_jax import blocked_loss, cell_stats, grad_cache, losses, parallel, step, targets
from bixse_jax.default_config import base_config
from bixse_jax.errors import ConfigError
from bixse_jax.targets import graded_targets, loss_mask

B, H = 48, 8
VARIANTS = {
    "plain": {},
    "diagonal_only": {"diagonal_only": True},
    "binarize": {"binarize_threshold": 0.5},
    "mask_repeated": {"mask_unlabelled_of_repeated_queries": True},
}


def _batch(seed: int = 0, n: int = B) -> dict[str, np.ndarray]:
    """Queries and documents that repeat (so off-diagonal cells are labelled), duplicate pairs included."""
    rng = np.random.default_rng(seed)
    return {"query_ids": rng.integers(0, n // 4, n).astype(np.int32),
            "doc_ids": rng.integers(0, n // 2, n).astype(np.int32),
            "grades": rng.choice([0.0, 0.3, 0.6, 1.0], n).astype(np.float32)}


def _embeddings(seed: int = 1, n: int = B):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, H)).astype(np.float32), rng.normal(size=(n, H)).astype(np.float32)


PARAMS = {"log_temperature": np.float32(0.8), "bias": np.float32(-2.0)}


def _cfg(name: str, impl: str, variant: str = "plain", block_size: int = 7, **extra):
    """The loss at PARAMS' t and b (Adam follows them; a refit would replace them: its own test below)."""
    cfg = base_config().loss
    cfg.name, cfg.impl, cfg.block_size, cfg.follow_logit_params = name, impl, block_size, "adam"
    for k, v in {**VARIANTS[variant], **extra}.items():
        setattr(cfg, k, v)
    return cfg


def _value_and_grad(cfg, mesh=None, batch=None, q_d=None):
    """((loss, metrics), (d params, dq, dd)) of step.objective under jit, on the mesh if one is given."""
    batch = _batch() if batch is None else batch
    q, d = _embeddings() if q_d is None else q_d
    objective = step.make_objective(cfg, mesh)
    if mesh is None:
        batch, q, d = {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(q), jnp.asarray(d)
    else:
        batch = parallel.global_batch(batch, mesh)
        q, d = (jax.device_put(x, parallel.batch_sharding(mesh)) for x in (q, d))
    fn = jax.value_and_grad(lambda p, q, d: objective(p, q, d, batch), argnums=(0, 1, 2), has_aux=True)
    return jax.device_get(jax.jit(fn)(PARAMS, q, d))


def _assert_equal_to(got, want):
    (loss, metrics), grads = got
    (want_loss, want_metrics), want_grads = want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for k in cell_stats.NAMES:
        np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-6, atol=1e-6, err_msg=k)
    # Absolute slack of 1e-6 of the largest gradient: dL/db of InfoNCE is 0 and holds float noise.
    scale = max(float(np.abs(w).max()) for w in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * scale)
    assert float(np.abs(want_grads[1]).max()) > 1e-3  # the comparison is not between zeros


def _dense(name, variant="plain", **extra):
    return _value_and_grad(_cfg(name, "dense", variant, **extra))


# --- targets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_sorted_table_lookup_equals_graded_targets(seed):
    batch = {k: jnp.asarray(v) for k, v in _batch(seed, 64).items()}
    want_t, want_l = graded_targets(batch["query_ids"], batch["doc_ids"], batch["grades"])
    table = targets.pair_table(batch["query_ids"], batch["doc_ids"], batch["grades"])
    got_t, got_l = targets.lookup(table, batch["query_ids"], batch["doc_ids"])
    assert int(want_l.sum()) > 64  # duplicate ids label off-diagonal cells
    np.testing.assert_array_equal(got_l, want_l)
    np.testing.assert_array_equal(got_t, want_t)
    repeated = targets.repeated_queries(table, batch["query_ids"])
    np.testing.assert_array_equal(~repeated[:, None] | want_l, loss_mask(batch["query_ids"], want_l, True))


# --- blocked on one device -----------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", losses.supporting("blocked"))
def test_blocked_equals_dense(name, variant):
    """Block of 7 rows: 48 is not a multiple, so the last block is padded."""
    _assert_equal_to(_value_and_grad(_cfg(name, "blocked", variant)), _dense(name, variant))


@pytest.mark.parametrize("block_size", [1, 16, 48, 100])
def test_blocked_any_block_size(block_size):
    cfg = _cfg("bixse", "blocked", "mask_repeated", block_size=block_size, learn_temperature=False)
    got = _value_and_grad(cfg)
    _assert_equal_to(got, _dense("bixse", "mask_repeated", learn_temperature=False))
    assert got[1][0]["log_temperature"] == 0.0


# --- ring over 8 devices -------------------------------------------------------------------------

@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("name", losses.supporting("ring"))
def test_ring_equals_dense_on_8_devices(name, variant):
    _assert_equal_to(_value_and_grad(_cfg(name, "ring", variant), parallel.make_mesh(8)), _dense(name, variant))


@pytest.mark.parametrize("variant", ["plain", "mask_repeated", "binarize"])
def test_refit_is_the_same_fit_on_every_path(variant):
    """`follow_logit_params=refit` (BiXSE's default): every path fits the same (t, b) to the step's
    cells and takes the same loss and embedding gradients there; t and b themselves get none (the step
    stores the fit). Documents lean towards their query by its grade, so the fit is well posed. The
    8-device paths fit cosines summed in another order; the fit's float32 Newton steps carry that
    last-bit noise into t and b at about 1e-5 (measured: 7.5e-5 at most in t, 8.4e-5 of the largest
    embedding gradient), hence 2e-4 there against 1e-6 for the loss."""
    batch = _batch()
    rng = np.random.default_rng(5)
    q = rng.normal(size=(B, H)).astype(np.float32)
    d = (3 * batch["grades"][:, None] * q + rng.normal(size=(B, H))).astype(np.float32)
    mesh8 = parallel.make_mesh(8)
    (want_loss, want), want_grads = _value_and_grad(_cfg("bixse", "dense", variant, follow_logit_params="refit"),
                                                    q_d=(q, d))
    assert abs(float(want["log_temperature"]) - PARAMS["log_temperature"]) > 0.1  # the fit moved t
    scale = float(np.abs(want_grads[1]).max())
    for impl, mesh in (("blocked", None), ("ring", mesh8), ("dense", mesh8)):
        (loss, metrics), grads = _value_and_grad(_cfg("bixse", impl, variant, follow_logit_params="refit"), mesh,
                                                 q_d=(q, d))
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6, err_msg=impl)
        for k in ("log_temperature", "bias"):
            assert float(metrics[k]) == pytest.approx(float(want[k]), abs=2e-4), (impl, k)
            assert float(metrics[f"refit/{k}"]) == float(metrics[k]) and float(grads[0][k]) == 0.0
        for g, w in zip(grads[1:], want_grads[1:]):
            np.testing.assert_allclose(g, w, rtol=0, atol=2e-4 * scale, err_msg=impl)


@pytest.mark.parametrize("name,variant,block_size", [("bixse", "mask_repeated", 4), ("infonce", "diagonal_only", 1),
                                                     ("graded_infonce", "mask_repeated", 4)])
def test_ring_in_row_chunks_equals_dense(name, variant, block_size):
    """6 rows a device met in chunks of 4 (the last padded) or 1."""
    _assert_equal_to(_value_and_grad(_cfg(name, "ring", variant, block_size=block_size), parallel.make_mesh(8)),
                     _dense(name, variant))


def test_ring_over_data_and_fsdp_axes():
    mesh = parallel.make_mesh(4, 2)
    _assert_equal_to(_value_and_grad(_cfg("infonce", "ring"), mesh), _dense("infonce"))


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value a jaxpr (and its sub-jaxprs: scan, map, shard_map, custom_vjp) computes."""
    found = set()
    for eqn in jaxpr.eqns:
        found |= {tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if isinstance(inner, jax.extend.core.Jaxpr):
                    found |= _shapes(inner)
    return found


@pytest.mark.parametrize("impl,devices", [("dense", 1), ("blocked", 1), ("ring", 8)])
def test_no_b_by_b_array_in_the_gradient(impl, devices):
    """Traced value and gradient: only the dense impl ever forms a [B, B] (or [B, B/8]) array."""
    mesh = parallel.make_mesh(devices) if impl == "ring" else None
    objective = step.make_objective(_cfg("infonce", impl, block_size=8), mesh)
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    q, d = (jnp.asarray(x) for x in _embeddings())
    fn = jax.value_and_grad(lambda p, q, d: objective(p, q, d, batch), argnums=(0, 1, 2), has_aux=True)
    shapes = _shapes(jax.make_jaxpr(fn)(PARAMS, q, d).jaxpr)
    big = {s for s in shapes if len(s) >= 2 and sum(x >= B // 8 for x in s) >= 2 and math.prod(s) > 8 * B}
    if impl == "dense":
        assert (B, B) in big
    else:
        assert not big, big
        assert {"blocked": (8, B), "ring": (B // 8, B // 8)}[impl] in shapes  # the scan saw inside the blocks


# --- gradient caching with the ring --------------------------------------------------------------

V = 64


def _embed(encoder_params, ids, mask, rng):
    """A bag-of-words encoder: cheap, and its parameter gradient is the embeddings' gradient, scattered."""
    e = encoder_params["embedding"][ids] * mask[..., None]
    return jnp.tanh(e.sum(1) / jnp.maximum(mask.sum(1, keepdims=True), 1))


def test_ring_in_the_cached_step_equals_dense():
    rng = np.random.default_rng(3)
    batch = {**_batch(), "query_input_ids": rng.integers(0, V, (B, 5)).astype(np.int32),
             "query_attention_mask": np.ones((B, 5), np.int32),
             "doc_input_ids": rng.integers(0, V, (B, 7)).astype(np.int32),
             "doc_attention_mask": (np.arange(7)[None] < rng.integers(2, 8, (B, 1))).astype(np.int32)}
    params = {**PARAMS, "encoder": {"embedding": rng.normal(size=(V, H)).astype(np.float32)}}
    key = jax.random.PRNGKey(0)

    def plain_loss(params, batch, key):
        q = _embed(params["encoder"], batch["query_input_ids"], batch["query_attention_mask"], key)
        d = _embed(params["encoder"], batch["doc_input_ids"], batch["doc_attention_mask"], key)
        return step.make_objective(_cfg("bixse", "dense", "mask_repeated"), None)(params, q, d, batch)

    (want_loss, _), want = jax.jit(jax.value_and_grad(plain_loss, has_aux=True))(
        params, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    mesh = parallel.make_mesh(8)
    cached = grad_cache.make_cached_value_and_grad(
        _embed, step.make_objective(_cfg("bixse", "auto", "mask_repeated"), mesh), chunk=16, mesh=mesh)
    (loss, _), grads = jax.jit(cached)(jax.device_put(params, parallel.replicated(mesh)),
                                       parallel.global_batch(batch, mesh), key)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(jax.device_get(grads)), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6 * float(np.abs(w).max()))
    assert float(np.abs(want["encoder"]["embedding"]).max()) > 1e-3


# --- configuration -------------------------------------------------------------------------------

def test_auto_is_dense_within_one_block_then_ring_on_a_mesh_else_blocked():
    mesh8, mesh1 = parallel.make_mesh(8), parallel.make_mesh(1)
    choose = blocked_loss.choose_impl
    assert choose(_cfg("bixse", "auto", block_size=1024), mesh8, 1024) == "dense"
    assert choose(_cfg("bixse", "auto", block_size=1024), mesh8, 1032) == "ring"
    assert choose(_cfg("bixse", "auto"), mesh8, B) == "ring"
    assert choose(_cfg("pairwise_bce", "auto"), mesh8, B) == "blocked"
    assert choose(_cfg("bixse", "auto", block_size=1024), mesh1, 4096) == "blocked"
    assert choose(_cfg("bixse", "auto", block_size=1024), None, 1024) == "dense"
    assert choose(_cfg("soft_infonce", "auto"), mesh8, 4096) == "dense"
    assert choose(_cfg("margin_mse", "dense"), mesh8, 4096) == "dense"


@pytest.mark.parametrize("cfg,mesh,words", [
    (dict(name="soft_infonce", impl="blocked"), None, ["blocked", "bixse", "infonce", "pairwise_bce"]),
    (dict(name="margin_mse", impl="ring"), 8, ["ring", "'bixse', 'infonce'", "margin_mse"]),
    (dict(name="pairwise_bce", impl="ring"), 8, ["ring", "pairwise_bce"]),
    (dict(name="bixse", impl="ring"), None, ["mesh"]),
    (dict(name="bixse", impl="sparse"), None, ["loss.impl", "sparse"]),
    (dict(name="bixse", impl="blocked", block_size=0), None, ["block_size=0"]),
])
def test_unsupported_combinations_are_refused(cfg, mesh, words):
    loss_cfg = base_config().loss
    for k, v in cfg.items():
        setattr(loss_cfg, k, v)
    with pytest.raises(ConfigError) as err:
        step.make_objective(loss_cfg, parallel.make_mesh(mesh) if mesh else None)
    for w in words:
        assert w in str(err.value)


# --- two processes x 4 devices -------------------------------------------------------------------

def test_ring_over_two_processes_equals_dense(tmp_path):
    """The ring's ppermute crosses the process boundary (gloo) and still gives the dense loss."""
    import json
    import os
    import pathlib
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = pathlib.Path(__file__).resolve().parent
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(here.parent), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(here / "two_process_ring.py"), str(port), str(i), "infonce",
                               "mask_repeated"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    loss, metrics, grads = json.loads(outs[0][0].strip().splitlines()[-1])  # gloo also writes to stdout
    got = ((np.float32(loss), {k: np.float32(v) for k, v in metrics.items()}),
           ({k: np.float32(v) for k, v in grads[0].items()}, np.asarray(grads[1], np.float32),
            np.asarray(grads[2], np.float32)))
    _assert_equal_to(got, _dense("infonce", "mask_repeated"))
