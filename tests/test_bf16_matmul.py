"""The CPU bfloat16 compute path (models/bf16_matmul.py, cpu_blas.gemm_bf16, compute_policy): every
matmul of a train step takes bfloat16 inputs into float32, and the loss and gradients stay within
bfloat16 rounding of the float32 step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import skip_unless_ci

from bixse_jax import step
from bixse_jax.default_config import base_config
from bixse_jax.models import architectures, bf16_matmul, compute_policy, cpu_blas
from bixse_jax.models.bert import EncoderConfig
from bixse_jax.models.decoder import DecoderConfig
from bixse_jax.models.encoder import SentenceEncoder

TINY_BERT = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=64, hidden_dropout_prob=0.0)
TINY_LLAMA = dict(model_type="llama", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64)
BF16_REL = 3e-2  # a few bfloat16 roundings (2^-8 each) through two layers


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture
def mkl_weight_grad(monkeypatch):
    """The weight gradient by MKL's bfloat16 gemm, as on a one-device CPU run (the suite has 8 devices,
    where it falls back to XLA's dot)."""
    if not cpu_blas.available():
        skip_unless_ci(f"MKL's bfloat16 gemm cannot run here: {cpu_blas.unavailable_reason()}")
    monkeypatch.setattr(bf16_matmul, "_mkl_weight_grad", lambda: True)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_gemm_bf16_equals_float32_product_of_rounded_inputs(trans_a, trans_b):
    if not cpu_blas.available():
        skip_unless_ci(f"MKL cannot run here: {cpu_blas.unavailable_reason()}")
    rng = np.random.default_rng(0)
    m, k, n = 19, 37, 23
    a = jnp.asarray(rng.standard_normal((k, m) if trans_a else (m, k)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((n, k) if trans_b else (k, n)), jnp.bfloat16)
    got = jax.jit(lambda a, b: cpu_blas.gemm_bf16(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    want = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    assert got.dtype == jnp.float32 and got.shape == (m, n)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)  # exact products, float32 sums


def test_gemm_bf16_refuses_operands_that_do_not_contract():
    a = jnp.zeros((4, 5), jnp.bfloat16)
    with pytest.raises(ValueError, match="do not contract"):
        cpu_blas.gemm_bf16(a, a)
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_blas.gemm_bf16(a.astype(jnp.float32), a, trans_b=True)


@pytest.mark.parametrize("use_mkl", [False, True])
def test_dense_gradients_within_bf16_of_float32(use_mkl, monkeypatch):
    if use_mkl:
        if not cpu_blas.available():
            skip_unless_ci(f"MKL cannot run here: {cpu_blas.unavailable_reason()}")
        monkeypatch.setattr(bf16_matmul, "_mkl_weight_grad", lambda: True)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 24)) / 4, jnp.float32)
    fast = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(bf16_matmul.dense(x, w))), (0, 1)))
    exact = jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(x @ w)), (0, 1))
    (v, (dx, dw)), (v0, (dx0, dw0)) = fast(x, w), exact(x, w)
    assert dx.dtype == dw.dtype == jnp.float32
    assert _rel(v, v0) < BF16_REL and _rel(dx, dx0) < BF16_REL and _rel(dw, dw0) < BF16_REL
    assert _rel(dw, dw0) > 0  # it did round: not silently the float32 path


def test_einsum_gradients_within_bf16_of_float32():
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 5, 2, 3, 8)), jnp.float32)  # b t k g d
    k = jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32)  # b s k d
    spec = "btkgd,bskd->bkgts"
    fast = jax.grad(lambda q, k: jnp.sum(jnp.tanh(bf16_matmul.einsum(spec, q, k))), (0, 1))(q, k)
    exact = jax.grad(lambda q, k: jnp.sum(jnp.tanh(jnp.einsum(spec, q, k))), (0, 1))(q, k)
    for got, want in zip(fast, exact):
        assert got.shape == want.shape and _rel(got, want) < BF16_REL


def test_einsum_refuses_specs_it_cannot_transpose():
    with pytest.raises(ValueError, match="two-operand einsum"):
        bf16_matmul.einsum("ii,ij->j", jnp.ones((3, 3)), jnp.ones((3, 2)))


def _batch(b: int = 8) -> dict:
    """Queries of 12 and documents of 20 tokens, some padded, graded pairs on the diagonal."""
    rng = np.random.default_rng(3)
    batch = {"query_input_ids": jnp.asarray(rng.integers(5, 97, (b, 12)), jnp.int32),
             "doc_input_ids": jnp.asarray(rng.integers(5, 97, (b, 20)), jnp.int32),
             "query_ids": jnp.arange(b, dtype=jnp.int32), "doc_ids": jnp.arange(b, dtype=jnp.int32),
             "grades": jnp.asarray(rng.uniform(0.2, 1.0, b), jnp.float32)}
    batch["query_attention_mask"] = jnp.ones_like(batch["query_input_ids"]).at[:, 9:].set(0)
    batch["doc_attention_mask"] = jnp.ones_like(batch["doc_input_ids"]).at[::2, 15:].set(0)
    return batch


def _loss_and_grads(enc_config, pooling):
    encoder = SentenceEncoder(enc_config, pooling=pooling)
    cfg = base_config()
    # At the given t, b: random encoders' cosines do not rise with the targets, so a refit would sit at
    # exp(t)'s floor, where the encoder's gradient is all but zero.
    cfg.loss.follow_logit_params = "adam"
    tx, _ = step.make_optimizer(cfg.train)
    params = step.init_state(architectures.init_params(enc_config, jax.random.key(0)), cfg.loss, tx, seed=0).params
    batch = _batch()
    loss_fn = step.make_loss_fn(encoder, cfg.loss, None, False)
    value_and_grad = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0]))
    return value_and_grad, params


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_train_step_loss_and_gradients_within_bf16_of_float32(family, mkl_weight_grad):
    make = (lambda **kw: EncoderConfig(**TINY_BERT, **kw)) if family == "bert" else \
        (lambda **kw: DecoderConfig(**TINY_LLAMA, **kw))
    pooling = "mean" if family == "bert" else "last"
    fast_fn, params = _loss_and_grads(make(matmul_dtype="bfloat16"), pooling)
    exact_fn, _ = _loss_and_grads(make(), pooling)
    (loss, grads), (loss0, grads0) = fast_fn(params), exact_fn(params)
    assert abs(float(loss) - float(loss0)) < BF16_REL * abs(float(loss0))
    flat, flat0 = jax.tree.leaves(grads["encoder"]), jax.tree.leaves(grads0["encoder"])
    big = [(g, g0) for g, g0 in zip(flat, flat0) if float(jnp.abs(g0).max()) > 1e-6]
    assert len(big) > len(flat) // 2
    # Each gradient within a few bfloat16 roundings of float32 relative to its largest entry, and
    # the whole encoder gradient pointing the same way.
    assert max(_rel(g, g0) for g, g0 in big) < 0.1
    cos = sum(float(jnp.vdot(g, g0)) for g, g0 in zip(flat, flat0)) / np.sqrt(
        sum(float(jnp.vdot(g, g)) for g in flat) * sum(float(jnp.vdot(g, g)) for g in flat0))
    assert cos > 0.999
    # dL/dt and dL/db sum terms of both signs over every cell (dL/dt is near 0 here), so an absolute
    # bound: logits move by about exp(t) x 2^-8 x |cos| < 0.04 under bfloat16 inputs.
    for key in ("log_temperature", "bias"):
        assert abs(float(grads[key]) - float(grads0[key])) < 2e-3


def test_every_large_matmul_of_the_step_takes_bf16_inputs_into_float32(mkl_weight_grad):
    """In the lowered program (forward and backward of a tiny Llama): each dot_general of more than
    a few FLOPs multiplies bfloat16 by bfloat16 into float32, and the weight gradients are MKL calls."""
    fn, params = _loss_and_grads(DecoderConfig(**TINY_LLAMA, matmul_dtype="bfloat16"), "last")
    text = fn.lower(params).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*?:\s*\((tensor<[^>]*>), (tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)", text)
    assert dots, "no dot_general found in the lowered program"

    def size(t):
        return int(np.prod([int(d) for d in re.findall(r"(\d+)x", t)] or [1]))

    large = [d for d in dots if size(d[2]) >= 64 * 32]  # beyond the [8, 8] similarity matrices
    assert large and all(l.endswith("xbf16>") and r.endswith("xbf16>") and o.endswith("xf32>") for l, r, o in large), \
        [d for d in large if not d[0].endswith("xbf16>")][:3]
    layers, dense_per_layer, sides = TINY_LLAMA["num_hidden_layers"], 7, 2
    assert text.count(cpu_blas.TARGET_BF16) == layers * dense_per_layer * sides


def test_auto_policy(monkeypatch):
    resolve = compute_policy.resolve_matmul_dtype
    assert resolve("float32", "float32", training=True)[0] == "float32"
    assert resolve(None, "float32", training=False)[0] is None
    monkeypatch.setattr(compute_policy, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert resolve("auto", "float32", training=False)[0] == "bfloat16"
    assert resolve("auto", "bfloat16", training=False)[0] is None  # bfloat16 compute stays as asked
    dtype, why = resolve("auto", "float32", training=True)  # the suite's 8 simulated devices
    assert dtype is None and "8 CPU devices" in why
    monkeypatch.setattr(compute_policy, "cpu_bf16_flags", lambda: ())
    dtype, why = resolve("auto", "float32", training=False)
    assert dtype is None and "no native bfloat16" in why


def test_gradient_caching_on_the_fast_path_equals_its_plain_step(mkl_weight_grad):
    """The cached step runs the encoder under shard_map, where MKL's result must carry the mesh axes
    it varies over (the regime config's path): its gradients equal the uncached fast-path step's."""
    from bixse_jax import grad_cache, parallel
    enc_config = DecoderConfig(**TINY_LLAMA, matmul_dtype="bfloat16")
    plain_fn, params = _loss_and_grads(enc_config, "last")
    loss0, grads0 = plain_fn(params)
    encoder = SentenceEncoder(enc_config, pooling="last")
    mesh = parallel.make_mesh(1)
    cfg = base_config().loss
    cfg.follow_logit_params = "adam"  # as _loss_and_grads
    cached = grad_cache.make_cached_loss_fn(step.make_embed_fn(encoder, False), step.make_objective(cfg, mesh),
                                            chunk=4, mesh=mesh)
    batch = _batch()
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    loss, grads = jax.jit(jax.value_and_grad(lambda p: cached(p, batch, jax.random.key(0))[0]))(params)
    assert abs(float(loss) - float(loss0)) < 1e-4 * abs(float(loss0))
    for g, g0 in zip(jax.tree.leaves(grads["encoder"]), jax.tree.leaves(grads0["encoder"])):
        assert _rel(g, g0) < 1e-3  # the same bfloat16 products, summed per sub-batch
