"""The encoder: HF parameter layout, loading errors, pooling, dtype/remat variants, real-MiniLM parity."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from bixse_jax import parallel
from bixse_jax.models import architectures, hf_io, lora
from bixse_jax.models.bert import BertModel, EncoderConfig, einsum_attention, init_params
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.models.pooling import l2_normalize, pool

from conftest import TINY_BERT


def _ids(batch=3, length=10, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 2000, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_parameter_tree_is_hf_flax_layout():
    params = init_params(EncoderConfig(**TINY_BERT), jax.random.key(0))
    keys = {"/".join(k) for k in traverse_util.flatten_dict(params)}
    for expected in ("embeddings/word_embeddings/embedding", "embeddings/position_embeddings/embedding",
                     "embeddings/token_type_embeddings/embedding", "embeddings/LayerNorm/scale",
                     "encoder/layer/0/attention/self/query/kernel", "encoder/layer/1/attention/self/value/bias",
                     "encoder/layer/0/attention/output/dense/kernel", "encoder/layer/0/attention/output/LayerNorm/bias",
                     "encoder/layer/1/intermediate/dense/kernel", "encoder/layer/1/output/dense/kernel",
                     "encoder/layer/1/output/LayerNorm/scale"):
        assert expected in keys
    assert len(keys) == 5 + 16 * 2
    assert params["encoder"]["layer"]["0"]["intermediate"]["dense"]["kernel"].shape == (32, 64)


def test_torch_names_round_trip(tiny_model_dir):
    config, params, _ = hf_io.load_pretrained(tiny_model_dir)
    back = hf_io.flax_to_torch(params)
    assert "encoder.layer.0.attention.self.query.weight" in back
    again = hf_io.convert_weights(back, config, "roundtrip")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_padding_does_not_change_embeddings(tiny_model_dir):
    config, params, _ = hf_io.load_pretrained(tiny_model_dir)
    enc = SentenceEncoder(config, "mean", True)
    ids, mask = _ids()
    short = enc(params, ids[2:, :3], mask[2:, :3])
    padded = enc(params, ids[2:], mask[2:])
    np.testing.assert_allclose(short, padded, atol=1e-6)


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
def test_pooling_against_numpy(mode):
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], np.int32)
    got = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(mask), mode))
    for i in range(3):
        n = mask[i].sum()
        want = {"mean": hidden[i, :n].mean(0), "cls": hidden[i, 0], "last": hidden[i, n - 1]}[mode]
        np.testing.assert_allclose(got[i], want, rtol=1e-6)
    norm = np.linalg.norm(np.asarray(l2_normalize(jnp.asarray(got))), axis=1)
    np.testing.assert_allclose(norm, 1.0, rtol=1e-6)


def test_bfloat16_and_remat_close_to_float32(tiny_model_dir):
    config, params, _ = hf_io.load_pretrained(tiny_model_dir)
    ids, mask = _ids()
    ref = SentenceEncoder(config)(params, ids, mask)
    for variant in (dict(dtype="bfloat16"), dict(matmul_dtype="bfloat16"), dict(remat="full"), dict(remat="dots")):
        cfg = EncoderConfig(**{**TINY_BERT, **variant})
        out = SentenceEncoder(cfg)(params, ids, mask)
        assert out.dtype == jnp.float32
        tol = 3e-2 if "remat" not in variant else 1e-6
        np.testing.assert_allclose(out, ref, atol=tol)
        if "remat" not in variant:  # rounded, so not the float32 result
            assert np.abs(np.asarray(out) - np.asarray(ref)).max() > 1e-6
    # bfloat16 matmul inputs alone keep the activations float32
    hidden = lambda **kw: BertModel(EncoderConfig(**{**TINY_BERT, **kw})).apply({"params": params}, ids, mask)
    assert hidden(matmul_dtype="bfloat16").dtype == jnp.float32 and hidden(dtype="bfloat16").dtype == jnp.bfloat16
    # remat must give the same gradients too
    loss = lambda p, cfg: jnp.sum(SentenceEncoder(cfg)(p, ids, mask) ** 3)
    g0 = jax.grad(loss)(params, config)
    g1 = jax.grad(loss)(params, EncoderConfig(**{**TINY_BERT, "remat": "full"}))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_einsum_attention_equals_jax_attention_values_and_gradients():
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 7, 4, 8)).astype(np.float32)) for _ in range(3))
    mask = np.ones((3, 7), np.int32)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)[:, None, None, :].astype(bool),
                                                       implementation="xla")
    ours = lambda q, k, v: einsum_attention(q, k, v, jnp.asarray(mask))
    np.testing.assert_allclose(ours(q, k, v), ref(q, k, v), atol=1e-6)
    weights = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, k, v) for f in (ours, ref)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_einsum_attention_fully_masked_row_is_finite_and_bfloat16_close():
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 4)).astype(np.float32)) for _ in range(3))
    out = einsum_attention(q, k, v, jnp.asarray([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[1], jnp.broadcast_to(v[1].mean(0), out[1].shape), atol=1e-6)  # uniform weights
    half = einsum_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)), jnp.ones((2, 5), jnp.int32))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(half.astype(jnp.float32), einsum_attention(q, k, v, jnp.ones((2, 5), jnp.int32)),
                               atol=3e-2)


@pytest.mark.parametrize("impl", [None, "xla"])
def test_attention_implementations_give_the_same_embeddings(tiny_model_dir, impl):
    config, params, _ = hf_io.load_pretrained(tiny_model_dir)
    ids, mask = _ids()
    einsum = SentenceEncoder(EncoderConfig(**{**TINY_BERT, "attention_impl": "einsum"}))(params, ids, mask)
    other = SentenceEncoder(EncoderConfig(**{**TINY_BERT, "attention_impl": impl}))(params, ids, mask)
    np.testing.assert_allclose(other, einsum, atol=1e-6)
    with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
        EncoderConfig(attention_impl="flash")
    with pytest.raises(ValueError, match="matmul_dtype 'float16' is not one of"):
        EncoderConfig(matmul_dtype="float16")


def test_roberta_positions_start_after_padding_id():
    cfg = EncoderConfig(**{**TINY_BERT, "model_type": "roberta", "pad_token_id": 1, "type_vocab_size": 1})
    assert cfg.position_offset == 2
    params = init_params(cfg, jax.random.key(0))
    ids, mask = _ids()
    # Changing position embedding rows 0 and 1 (never used by RoBERTa) changes nothing.
    pos = params["embeddings"]["position_embeddings"]["embedding"]
    params2 = jax.tree.map(lambda x: x, params)
    params2["embeddings"]["position_embeddings"]["embedding"] = pos.at[:2].set(5.0)
    a = BertModel(cfg).apply({"params": params}, ids, mask)
    b = BertModel(cfg).apply({"params": params2}, ids, mask)
    np.testing.assert_allclose(np.asarray(a)[mask == 1], np.asarray(b)[mask == 1], atol=1e-6)


def test_mismatched_weights_list_missing_unexpected_and_shapes(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 48
    cfg["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf_io.ModelLoadError) as err:
        hf_io.load_pretrained(bad)
    msg = str(err.value)
    assert "model.safetensors" in msg and "missing" in msg and "wrong shape" in msg
    assert "encoder/layer/2/attention/self/query/kernel" in msg
    assert "encoder/layer/0/intermediate/dense/kernel: file (32, 64), model (32, 48)" in msg


def test_model_folder_without_config_or_weights(tiny_model_dir, tmp_path):
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_model_dir / "config.json", no_weights)
    with pytest.raises(hf_io.ModelLoadError, match="no model.safetensors"):
        hf_io.load_pretrained(no_weights)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    with pytest.raises(hf_io.ModelLoadError, match="no config.json"):
        hf_io.load_pretrained(no_config)
    with pytest.raises(hf_io.ModelLoadError, match="not supported"):
        (no_config / "config.json").write_text(json.dumps({**TINY_BERT, "model_type": "gpt2"}))
        hf_io.load_pretrained(no_config)


def test_sentence_settings_of_minilm(minilm_path):
    s = hf_io.read_sentence_settings(minilm_path)
    assert (s.pooling, s.normalize, s.max_seq_length) == ("mean", True, 256)


def test_minilm_sts_spearman_matches_reference(shared_data, minilm_path):
    """The port is faithful: STS-B test Spearman 0.8203 like sentence-transformers (float32)."""
    from scipy.stats import spearmanr

    from bixse_jax.data.tokenizer import Tokenizer
    from bixse_jax.data.sources import read_sts
    from bixse_jax.eval.encode import encode_texts

    config, params, _ = hf_io.load_pretrained(minilm_path)
    enc = SentenceEncoder(config, "mean", True)
    tok = Tokenizer.from_model_dir(minilm_path)
    pairs = read_sts(shared_data / "stsbenchmark" / "sts-test.csv")
    assert len(pairs) == 1379
    a = encode_texts(enc, params, tok, [p.query for p in pairs], max_len=256)
    b = encode_texts(enc, params, tok, [p.document for p in pairs], max_len=256)
    rho = spearmanr(np.sum(a * b, axis=1), [p.grade for p in pairs]).correlation
    assert abs(rho - 0.8203) <= 0.0005, rho


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_declared_logical_axes_are_those_the_paths_implied(model_type):
    """BERT declares its axes on its layers; they are the ones parallel.logical_axes reads from the
    HF Flax paths (so a run shards as before), LoRA's A and B included."""
    config = architectures.with_lora(EncoderConfig(**TINY_BERT, model_type=model_type),
                                     lora.LoraSpec(2, 4.0, targets=("query", "dense")))
    declared = traverse_util.flatten_dict(architectures.param_axes(config), is_leaf=lambda _, x: isinstance(x, tuple))
    shapes = traverse_util.flatten_dict(architectures.param_shapes(config))
    assert declared.keys() == shapes.keys() and any(k[-1] == "lora_b" for k in declared)
    for path, shape in shapes.items():
        assert declared[path] == parallel.logical_axes(("encoder",) + path, len(shape.shape)), path
