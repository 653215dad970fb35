"""Matryoshka: the loss over prefixes equals the losses of truncated, renormalised embeddings added
by hand (dense, blocked, ring, gradient caching); evaluators report each prefix; encode --dim; the
export records the dims."""

import json
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
    cfg = base_config().loss  # at the given t, b (a refit of them has its own tests: test_blocked_loss)
    cfg.name, cfg.impl, cfg.block_size, cfg.follow_logit_params = name, impl, block_size, "adam"
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


# The wrapper is the same for every loss; these cover a loss of the logits and one of the cosines
# (margin_mse) densely, the row form blocked, and a declared ring fold (infonce's online logsumexp).
CASES = [("bixse", "dense", 1), ("margin_mse", "dense", 1), ("bixse", "blocked", 1), ("infonce", "ring", 8)]


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


def _bag_of_words(encoder_params, ids, mask, rng):
    """A stand-in encoder for gradient caching: masked sum of a token table, L2-normalised."""
    x = jnp.sum(encoder_params["table"][ids] * mask[..., None], axis=1)
    return x / jnp.linalg.norm(x, axis=1, keepdims=True)


def test_gradient_caching_equals_plain_backprop():
    """The cached step differentiates the same Matryoshka objective: loss, per-dim losses and gradients
    equal plain backprop through embed-then-objective, on 8 devices (sub-batches of 8 pairs)."""
    rng = np.random.default_rng(0)
    params = {"encoder": {"table": jnp.asarray(rng.normal(size=(50, H)), jnp.float32)}, **PARAMS}
    batch = {"query_input_ids": rng.integers(0, 50, (B, 6)).astype(np.int32),
             "query_attention_mask": np.ones((B, 6), np.int32),
             "doc_input_ids": rng.integers(0, 50, (B, 9)).astype(np.int32),
             "doc_attention_mask": (np.arange(9)[None] < rng.integers(2, 10, (B, 1))).astype(np.int32), **_batch()}
    cfg = _cfg(dims=DIMS, weights=WEIGHTS)
    key = jax.random.PRNGKey(0)

    def plain(params, batch, rng):
        q = _bag_of_words(params["encoder"], batch["query_input_ids"], batch["query_attention_mask"], None)
        d = _bag_of_words(params["encoder"], batch["doc_input_ids"], batch["doc_attention_mask"], None)
        return step.make_objective(cfg, None)(params, q, d, batch)
    (want_loss, want_metrics), want = jax.jit(jax.value_and_grad(plain, has_aux=True))(
        params, {k: jnp.asarray(v) for k, v in batch.items()}, key)
    mesh = parallel.make_mesh(8)
    cached = grad_cache.make_cached_loss_fn(_bag_of_words, step.make_objective(cfg, mesh), chunk=8, mesh=mesh)
    (loss, metrics), got = jax.device_get(jax.jit(jax.value_and_grad(cached, has_aux=True))(
        jax.device_put(params, parallel.replicated(mesh)), parallel.global_batch(batch, mesh), key))
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    for k in ("loss/dim4", "loss/dim8", "loss/dim16"):
        assert float(metrics[k]) == pytest.approx(float(want_metrics[k]), rel=1e-5), k
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(jax.device_get(want))):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6 * scale)
    assert float(np.abs(want["encoder"]["table"]).max()) > 1e-3 and abs(float(want["bias"])) > 1e-3


# --- evaluators, encode --dim, export ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from bixse_jax.models.sentence_model import load_encoder
    return load_encoder(tiny_model_dir)


def _unit_prefix(x: np.ndarray, k: int) -> np.ndarray:
    return x[:, :k] / np.linalg.norm(x[:, :k], axis=1, keepdims=True)


def test_evaluators_report_each_prefix_and_encode_once(tiny_model, tmp_path, monkeypatch):
    """dims from the loss (sts) or the evaluator's own (beir); dimK/METRIC equals the metric of the
    truncated, renormalised embeddings computed by hand; each text list is encoded once for all dims."""
    import tiny_data
    from bixse_jax.data import sources
    from bixse_jax.default_config import evaluator
    from bixse_jax.eval import evaluate, metrics, registry
    root = tiny_data.tiny_data_root(tmp_path)
    config = base_config()
    config.data.query_max_len = config.data.doc_max_len = 16
    config.loss.matryoshka_dims = (8, "full")
    config.evals.sts = evaluator("sts", path=str(root / "stsbenchmark" / "sts-test.csv"), batch_size=64)
    config.evals.ir = evaluator("beir", path=str(root / "scifact"), dims=(4, 16), ks=(5,), top_k=10, batch_size=64)
    built = registry.build_all(config, tiny_model)
    calls = []
    real = evaluate.encode_texts
    monkeypatch.setattr(evaluate, "encode_texts", lambda *a, **k: calls.append(1) or real(*a, **k))
    sts = built["sts"].evaluate(tiny_model.params)
    assert sorted(sts) == ["dim8/pearson", "dim8/spearman", "pearson", "spearman"] and len(calls) == 2
    pairs = sources.read_sts(root / "stsbenchmark" / "sts-test.csv")
    enc = registry.text_encoder(config.evals.sts, tiny_model, config)
    a, b = enc.documents([p.query for p in pairs]), enc.documents([p.document for p in pairs])
    gold = np.array([p.grade for p in pairs])
    hand = metrics.spearman(np.sum(_unit_prefix(a, 8) * _unit_prefix(b, 8), axis=1), gold)
    assert sts["dim8/spearman"] == pytest.approx(hand, abs=1e-9)
    assert sts["dim8/spearman"] != pytest.approx(sts["spearman"], abs=1e-3)
    ir = built["ir"].evaluate(tiny_model.params)
    assert {"dim4/ndcg@5", "dim16/ndcg@5", "ndcg@5"} <= set(ir) and "dim8/ndcg@5" not in ir
    config.evals.ir.dims = (64,)
    with pytest.raises(ConfigError, match=r"evals.ir \(beir\): dims=\(64,\).*1..32"):
        registry.build_all(config, tiny_model)


def test_encode_dim_is_the_renormalised_prefix(tiny_model_dir, tmp_path, capsys):
    from bixse_jax import cli
    from bixse_jax.commands import encode as encode_cmd
    (tmp_path / "in.txt").write_text("red cat runs fast\nblue dog sleeps\na small dog\n")
    common = ["--model", str(tiny_model_dir), "--input", str(tmp_path / "in.txt")]
    encode_cmd.main(["bixse-jax encode", *common, "--out", str(tmp_path / "full.npy")])
    encode_cmd.main(["bixse-jax encode", *common, "--out", str(tmp_path / "d8.npy"), "--dim", "8"])
    out = capsys.readouterr().out
    info = json.loads(out.strip().splitlines()[-1])
    assert info["shape"] == [3, 8] and info["dim"] == 8
    full, d8 = np.load(tmp_path / "full.npy"), np.load(tmp_path / "d8.npy")
    np.testing.assert_allclose(d8, _unit_prefix(full, 8), rtol=1e-5, atol=1e-6)
    with pytest.raises(SystemExit):
        cli.main(["bixse-jax", "encode", *common, "--out", str(tmp_path / "x.npy"), "--dim", "33"])
    assert "--dim 33 is more than the model's 32 embedding coordinates" in capsys.readouterr().err


def test_eval_dim_scores_the_prefix_as_the_evaluators_do(tiny_model_dir, tmp_path, capsys):
    """`eval --dim 8` (a model flag, so mine and eval --mteb have it too) equals the training
    evaluators' dim8/ metrics of the same model."""
    import tiny_data
    from bixse_jax import cli, experiment
    from bixse_jax.default_config import base_config, evaluator
    from bixse_jax.eval import registry
    root = tiny_data.tiny_data_root(tmp_path)
    sts = str(root / "stsbenchmark" / "sts-test.csv")
    cli.main(["bixse-jax", "eval", "--model", str(tiny_model_dir), "--sts", sts, "--max-len", "16", "--dim", "8"])
    got = json.loads(capsys.readouterr().out)
    config = base_config()
    config.model.name_or_path = str(tiny_model_dir)
    config.data.query_max_len = config.data.doc_max_len = 16
    config.evals.sts = evaluator("sts", path=sts, dims=(8,))
    model = experiment.load_model(config.model)
    want = registry.build_all(config, model)["sts"].evaluate(model.params)
    assert got["dim"] == 8 and got["metrics"]["spearman"] == pytest.approx(want["dim8/spearman"], abs=1e-6)
    assert got["metrics"]["spearman"] != pytest.approx(want["spearman"], abs=1e-3)
    with pytest.raises(SystemExit):
        cli.main(["bixse-jax", "eval", "--model", str(tiny_model_dir), "--sts", sts, "--dim", "0"])
    assert "--dim must be >= 1, got 0" in capsys.readouterr().err


def test_export_records_the_dims(tiny_model, tmp_path):
    """bixse.json and the model card carry the dims and `load_encoder` reads them back
    (tests/interop/test_sentence_transformers.py loads such a folder with truncate_dim)."""
    import dataclasses

    from bixse_jax import export
    from bixse_jax.models.sentence_model import load_encoder
    model = dataclasses.replace(tiny_model, matryoshka_dims=(8, 16, 32))
    out = export.export_model(model, tmp_path / "st", "sentence-transformers")
    assert json.loads((out / "bixse.json").read_text())["matryoshka_dims"] == [8, 16, 32]
    card = (out / "README.md").read_text()
    assert "- matryoshka" in card and "truncate_dim=8" in card and "## Matryoshka dimensions" in card
    assert load_encoder(out).matryoshka_dims == (8, 16, 32)
    plain = export.export_model(tiny_model, tmp_path / "plain", "sentence-transformers")
    assert json.loads((plain / "bixse.json").read_text())["matryoshka_dims"] is None
    assert "matryoshka" not in (plain / "README.md").read_text().lower()
