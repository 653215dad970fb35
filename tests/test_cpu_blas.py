"""The MKL matmul path (`dense_impl="mkl"`, models/cpu_blas.py) computes what XLA's dots compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bixse_jax.models import bert, cpu_blas
from conftest import TINY_BERT, skip_unless_ci


@pytest.fixture(scope="module", autouse=True)
def mkl_ready():
    if cpu_blas.find_mkl() is None:
        skip_unless_ci("Intel MKL is not installed (pip install 'bixse-jax[mkl]')")
    if cpu_blas.find_compiler() is None:
        pytest.skip("no C++ compiler to build the MKL matmul handler (c++, g++, clang++ or $CXX)")
    assert cpu_blas.unavailable_reason() is None
    cpu_blas.ready()


def _close(a, b, rtol=1e-5):
    """Equal up to float32 reassociation: rtol of the largest entry."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=rtol * max(np.abs(b).max(), 1e-30))


def test_matmul_and_its_gradients_match_xla():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 5, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 20)), jnp.float32)
    _close(jax.jit(cpu_blas.matmul)(x, w), x @ w)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
    for got, want in zip(jax.grad(loss(cpu_blas.matmul), (0, 1))(x, w), jax.grad(loss(jnp.matmul), (0, 1))(x, w)):
        _close(got, want)


def test_empty_contraction_gives_zeros():
    out = cpu_blas.matmul(jnp.ones((2, 0), jnp.float32), jnp.ones((0, 3), jnp.float32))
    np.testing.assert_array_equal(np.asarray(out), np.zeros((2, 3), np.float32))


def test_encoder_and_its_gradients_match_xla_with_padding():
    config = bert.EncoderConfig(**TINY_BERT)
    ids = jnp.asarray(np.random.default_rng(2).integers(1, 1000, (3, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] < np.array([12, 7, 1])[:, None], jnp.int32)
    params = bert.init_params(config, jax.random.key(0))
    outputs, grads = [], []
    for impl in ("xla", "mkl"):
        model = bert.BertModel(dataclasses.replace(config, dense_impl=impl))
        forward = lambda p: model.apply({"params": p}, ids, mask)
        outputs.append(jax.jit(forward)(params))
        grads.append(jax.grad(lambda p: jnp.sum(forward(p) * mask[..., None]))(params))
    _close(outputs[1], outputs[0])
    # Against the largest gradient entry: some leaves (the key biases) are zero up to rounding.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0]))
    for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * scale)


def test_encode_texts_on_eight_devices_matches_xla(tiny_model_dir):
    """The encode path splits batches over the 8 test devices (shard_map), then gathers them."""
    from bixse_jax.eval.evaluate import load_text_encoder
    assert jax.device_count() == 8
    texts = [f"document {i} " + "word " * (i % 13) for i in range(37)]
    want = load_text_encoder(tiny_model_dir, batch_size=16).documents(texts)
    got = load_text_encoder(tiny_model_dir, batch_size=16, dense_impl="mkl").documents(texts)
    _close(got, want)


def test_other_contractions_and_dtypes_are_refused():
    x, w = jnp.ones((4, 3), jnp.float32), jnp.ones((4, 5), jnp.float32)
    with pytest.raises(ValueError, match="float32 x"):
        cpu_blas.dot_general(x, w, (((0,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="float32 x"):
        cpu_blas.dot_general(x.T.astype(jnp.bfloat16), w, (((1,), (0,)), ((), ())))
    with pytest.raises(ValueError, match="dense_impl 'mkl' multiplies in float32"):
        bert.EncoderConfig(dense_impl="mkl", matmul_dtype="bfloat16")
    with pytest.raises(ValueError, match="dense_impl 'blas' is not one of"):
        bert.EncoderConfig(dense_impl="blas")


def test_faster_impl_measures_once_and_caches(monkeypatch, tmp_path):
    """The real measurement (small width, so fast) runs, picks one, and is reused."""
    monkeypatch.setenv("BIXSE_CACHE", str(tmp_path))
    first = cpu_blas.faster_impl(hidden=32)
    assert first["why"] == "measured now" and first["choice"] in ("mkl", "xla")
    assert first["xla_s"] > 0 and first["mkl_s"] > 0
    assert first["choice"] == ("mkl" if first["mkl_s"] < first["xla_s"] else "xla")
    monkeypatch.setattr(cpu_blas, "measure", lambda hidden: pytest.fail("measured twice"))
    again = cpu_blas.faster_impl(hidden=32)
    assert again["choice"] == first["choice"] and again["why"].startswith("measured earlier")
