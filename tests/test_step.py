"""What the optimiser and the objective mean, against references written independently of optax and jax.

The optimiser tests feed chosen gradients through the real step (a loss linear in the parameters,
so its gradient is exactly the chosen tree) and compare the parameters with AdamW written out in
float64 numpy (train_utils.adamw_reference). The gradient tests compare jax's gradients of the
real objective with the analytic float64 gradients of BiXSE and InfoNCE, themselves checked by
float64 finite differences of a numpy loss. The objective computes in float32 by design (losses
cast their inputs), so differencing it under x64 would difference float32 rounding; the analytic
route needs no global x64 switch and pins the float32 result at a float32 tolerance.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bixse_jax import step
from bixse_jax.default_config import base_config
from bixse_jax.models.bert import EncoderConfig, init_params
from test_targets import brute_force_targets
from train_utils import adamw_reference

TINY = dict(vocab_size=64, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, hidden_dropout_prob=0.0)


@functools.cache
def _encoder_tree():
    """The real encoder's parameter shapes (eval_shape: no compile)."""
    return jax.eval_shape(lambda key: init_params(EncoderConfig(**TINY), key), jax.random.key(0))


def _encoder_params():
    """The real encoder tree (word/position embeddings, kernels, biases, LayerNorm), every leaf random
    and nonzero, so that decay on any of them would show."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: (0.5 * rng.standard_normal(x.shape)).astype(np.float32), _encoder_tree())


def _configs(**train):
    """Constant rate from step 0, no clipping unless asked, visible decay, t and b at 7x the encoder's rate."""
    cfg = base_config()
    cfg.loss.init_log_temperature, cfg.loss.init_bias = 0.7, -3.0
    cfg.train.update(dict(schedule="constant", warmup_steps=0, learning_rate=1e-2, weight_decay=0.3,
                          logit_params_lr=7e-2, grad_clip_norm=0.0))
    cfg.train.update(train)
    return cfg


def _random_grads(seed, scale=1e-2, logit=(0.3, -0.2)):
    """A gradient tree like the state's params: random encoder leaves, chosen dL/dt and dL/db."""
    rng = np.random.default_rng(seed)
    encoder = jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), _encoder_params())
    return {"encoder": encoder, "log_temperature": np.float32(logit[0]), "bias": np.float32(logit[1])}


def _with(train_cfg, **changes):
    out = train_cfg.copy_and_resolve_references()
    out.update(changes)
    return out


def _run_steps(cfg, grads_seq):
    """(start params, params after the steps) of the real step with gradients `grads_seq`."""
    tx, schedule = step.make_optimizer(cfg.train)
    state = step.init_state(_encoder_params(), cfg.loss, tx, seed=0)
    start = jax.device_get(state.params)

    def linear_loss(params, batch, rng):  # d/dparams = batch["g"], exactly
        loss = sum(jnp.vdot(g, p) for g, p in zip(jax.tree.leaves(batch["g"]), jax.tree.leaves(params)))
        return loss, {"loss": loss}

    train_step = jax.jit(step.make_train_step(linear_loss, tx, schedule))
    for grads in grads_seq:
        state, metrics = train_step(state, {"g": grads})
        assert float(metrics["nonfinite"]) == 0.0
    return start, jax.device_get(state.params)


def _assert_params_equal(got, want, start, lr, logit_lr=7e-2):
    """Updates (new - start) equal to 1e-4 of the leaf's rate, plus the float32 rounding of the parameter.

    float32 bias correction alone is off by ~1e-5: 1 - float32(0.999) = 0.00099998713."""
    for (path, g), w, s in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want),
                               jax.tree.leaves(start), strict=True):
        g, w, s32 = np.asarray(g, np.float64), np.asarray(w, np.float64), np.asarray(s, np.float32)
        s = s32.astype(np.float64)
        rate = lr if path[0].key == "encoder" else logit_lr
        tol = 1e-4 * rate + 2 * np.spacing(np.abs(s32)).astype(np.float64)
        err = np.abs((g - s) - (w - s))
        assert np.all(err <= tol), f"{jax.tree_util.keystr(path)}: update off by {err.max():.3g} (rate {rate})"


def test_two_adamw_steps_match_the_formula():
    """Rates per group (t, b at train.logit_params_lr), decay on the encoder's matrices and embeddings only,
    AdamW's moments and bias correction over two steps, against the numpy formula."""
    cfg = _configs()
    grads = [_random_grads(1), _random_grads(2)]
    start, got = _run_steps(cfg, grads)
    want = adamw_reference(start, grads, cfg.train, lrs=[1e-2, 1e-2])
    _assert_params_equal(got, want, start, lr=1e-2)
    # The tree really holds what the rule must skip: LayerNorm scales and biases, dense biases.
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(start["encoder"])[0]}
    assert any("LayerNorm']['scale']" in n for n in names) and any("dense']['bias']" in n for n in names)
    # Readable corollaries of the same numbers: LayerNorm is not decayed, a kernel is (by about
    # 2 steps x lr x wd x |p|), and t steps at 7x the encoder's rate.
    ln = ("encoder", "embeddings", "LayerNorm", "scale")
    kernel = ("encoder", "encoder", "layer", "0", "intermediate", "dense", "kernel")
    pick = lambda tree, path: tree[path[0]] if len(path) == 1 else pick(tree[path[0]], path[1:])
    undecayed = adamw_reference(start, grads, _with(cfg.train, weight_decay=0.0), lrs=[1e-2, 1e-2])
    np.testing.assert_allclose(pick(got, ln), pick(undecayed, ln), rtol=0, atol=1e-6)
    assert np.abs(pick(got, kernel) - pick(undecayed, kernel)).max() > 1e-3
    # Same dL/dt (0.3 >> eps) both steps: t moves 2 x 7 x the rate, without decay.
    assert float(got["log_temperature"] - start["log_temperature"]) == pytest.approx(-2 * 7 * 1e-2, rel=1e-4)


@pytest.mark.parametrize("key,value", [("adam_b1", 0.95), ("adam_b2", 0.9), ("adam_eps", 3e-3)])
def test_adam_overrides_change_the_update_as_the_formula_says(key, value):
    """`--config.train.adam_b1=0.95` and friends: the keys exist in the (locked) schema and reach AdamW."""
    cfg = _configs()
    cfg.lock()
    setattr(cfg.train, key, value)  # raised AttributeError while the keys were missing from the schema
    grads = [_random_grads(1, logit=(0.3, -0.2)), _random_grads(2, scale=3e-3, logit=(-0.1, 0.05))]
    start, got = _run_steps(cfg, grads)
    _assert_params_equal(got, adamw_reference(start, grads, cfg.train, lrs=[1e-2, 1e-2]), start, lr=1e-2)
    default = adamw_reference(start, grads, _configs().train, lrs=[1e-2, 1e-2])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(default)))
    assert moved > 100 * 1e-4 * 1e-2  # the override moved the result 100x the tolerance or more


def test_logit_params_rate_is_absolute_warmed_up_and_never_decayed():
    """t and b's rate follows the encoder's warm-up, then stays at train.logit_params_lr to the last
    step, whatever the encoder's peak rate and decay (so t and b can follow the encoder to the end)."""
    cfg = base_config().train
    cfg.update(dict(learning_rate=2e-5, warmup_steps=10, num_steps=100, schedule="linear", logit_params_lr=0.05))
    rate, encoder = step.logit_params_schedule(cfg), step.make_schedule(cfg)
    assert float(rate(5)) == pytest.approx(0.025) and float(encoder(5)) == pytest.approx(1e-5)
    for k in (10, 50, 99, 100, 1000):
        assert float(rate(k)) == pytest.approx(0.05), k
    assert float(encoder(99)) < 1e-6  # the encoder's rate did decay


@pytest.mark.parametrize("key", ["adam_b1", "adam_b2", "adam_eps", "weight_decay", "grad_clip_norm",
                                 "logit_params_lr", "learning_rate", "schedule"])
def test_optimizer_reads_its_keys_from_the_schema(key):
    """No fallback defaults in the code: a train config without the key cannot build the optimiser."""
    cfg = base_config().train
    step.make_optimizer(cfg)
    delattr(cfg, key)
    with pytest.raises((AttributeError, KeyError)):
        step.make_optimizer(cfg)


@pytest.mark.parametrize("case", ["encoder_below_clip_logit_large", "encoder_above_clip"])
def test_clip_is_the_encoders_own_global_norm(case):
    """`grad_clip_norm` clips the encoder by the encoder's gradient norm alone; t and b are not clipped.

    eps is set near the gradients' size so that a first Adam step shows the gradient's scale."""
    cfg = _configs(grad_clip_norm=1.0, adam_eps=1e-3)
    n = sum(x.size for x in jax.tree.leaves(_encoder_params()))
    g = _random_grads(3, scale=1.0 / math.sqrt(n))  # encoder norm ~1
    enc_norm = lambda grads: math.sqrt(sum(float(np.sum(np.square(x, dtype=np.float64)))
                                           for x in jax.tree.leaves(grads["encoder"])))
    if case == "encoder_below_clip_logit_large":
        g["encoder"] = jax.tree.map(lambda x: x * np.float32(0.5 / enc_norm(g)), g["encoder"])
        g["log_temperature"], g["bias"] = np.float32(60.0), np.float32(-80.0)  # 100x the clip
        assert enc_norm(g) == pytest.approx(0.5, rel=1e-5)
    else:
        g["encoder"] = jax.tree.map(lambda x: x * np.float32(10.0 / enc_norm(g)), g["encoder"])
        g["log_temperature"], g["bias"] = np.float32(2e-3), np.float32(-1e-3)  # near eps: a scale shows
    start, got = _run_steps(cfg, [g])
    want = adamw_reference(start, [g], cfg.train, lrs=[1e-2])
    _assert_params_equal(got, want, start, lr=1e-2)
    if case == "encoder_below_clip_logit_large":  # the encoder step is the unclipped one
        unclipped = adamw_reference(start, [g], _with(cfg.train, grad_clip_norm=0.0), lrs=[1e-2])
        _assert_params_equal(got, unclipped, start, lr=1e-2)
    else:  # t and b take their whole gradient even though the encoder is clipped 10x
        t_step = float(got["log_temperature"] - start["log_temperature"])
        assert t_step == pytest.approx(-7e-2 * 2e-3 / (2e-3 + 1e-3), rel=1e-4)


@pytest.mark.parametrize("frozen", ["bias", "log_temperature"])
def test_frozen_logit_scalar_stays_bit_exact(frozen):
    """learn_bias=False (learn_temperature=False) leaves b (t) bit-exact through three real steps of
    the BiXSE objective, with weight decay and t and b's own rate on; the other scalar and
    the "encoder" (here the embeddings themselves, as decayed kernels) do move."""
    cfg = base_config()
    cfg.train.update(dict(warmup_steps=0, schedule="constant", learning_rate=1e-3, weight_decay=0.1))
    cfg.train.logit_params_lr = 1e-2
    cfg.loss.learn_bias, cfg.loss.learn_temperature = frozen != "bias", frozen != "log_temperature"
    tx, schedule = step.make_optimizer(cfg.train)
    rng = np.random.default_rng(0)
    embeddings = {side: {"kernel": (0.5 * rng.standard_normal((8, 5))).astype(np.float32)} for side in ("q", "d")}
    state = step.init_state(embeddings, cfg.loss, tx, seed=0)
    start = jax.device_get(state.params)
    embedding_loss = step.make_objective(cfg.loss, None)
    loss_fn = lambda p, batch, _: embedding_loss(p, p["encoder"]["q"]["kernel"], p["encoder"]["d"]["kernel"], batch)
    train_step = jax.jit(step.make_train_step(loss_fn, tx, schedule))
    batch = {"query_ids": np.array([0, 1, 2, 0, 3, 4, 1, 5], np.int32), "doc_ids": np.arange(8, dtype=np.int32),
             "grades": rng.uniform(0.2, 1.0, 8).astype(np.float32)}
    for _ in range(3):
        state, _ = train_step(state, batch)
    end = jax.device_get(state.params)
    other = "log_temperature" if frozen == "bias" else "bias"
    assert np.asarray(end[frozen]).tobytes() == np.asarray(start[frozen]).tobytes()
    assert abs(float(end[other] - start[other])) > 1e-2  # ~3 steps of 1e-2
    assert np.abs(end["encoder"]["q"]["kernel"] - start["encoder"]["q"]["kernel"]).max() > 1e-3


# --- gradients of the real objective against float64 references -------------------------------


def _numpy_loss_and_dlogits(name, z, targets, mask, threshold):
    """float64 loss and dL/dlogits, derived by hand.

    BiXSE: L = sum_mask (softplus(z) - T z) / rows, dL/dz = (sigmoid(z) - T) / rows.
    InfoNCE: L = mean over rows with a positive of -mean_pos log softmax_mask(z),
    dL/dz_ij = (softmax_ij - pos_ij / npos_i) / rows_with_pos.
    """
    if name == "bixse":
        rows = mask.any(axis=1).sum()
        loss = np.sum(np.where(mask, np.logaddexp(0, z) - targets * z, 0)) / rows
        return loss, np.where(mask, 1 / (1 + np.exp(-z)) - targets, 0) / rows
    pos = (targets >= threshold) & mask
    npos = pos.sum(axis=1)
    zm = np.where(mask, z, -np.inf)
    lse = np.log(np.sum(np.exp(zm - zm.max(axis=1, keepdims=True)), axis=1, keepdims=True)) + zm.max(axis=1, keepdims=True)
    soft = np.where(mask, np.exp(zm - lse), 0)
    rows = (npos > 0).sum()
    nll = -np.sum(np.where(pos, z - lse, 0), axis=1) / np.maximum(npos, 1)
    loss = np.sum(np.where(npos > 0, nll, 0)) / rows
    dz = np.where((npos > 0)[:, None], soft - pos / np.maximum(npos, 1)[:, None], 0) / rows
    return loss, dz


def _numpy_objective(name, t, b, q, d, targets, mask, threshold):
    """(loss, dL/dt, dL/db, dL/dq, dL/dd) in float64 for logits z = exp(t) q d^T + b."""
    s = q @ d.T
    z = math.exp(t) * s + b
    loss, dz = _numpy_loss_and_dlogits(name, z, targets, mask, threshold)
    return loss, np.sum(dz * math.exp(t) * s), np.sum(dz), math.exp(t) * dz @ d, math.exp(t) * dz.T @ q


@pytest.mark.parametrize("mask_repeated", [False, True])
@pytest.mark.parametrize("name", ["bixse", "infonce"])
def test_embedding_loss_gradients_match_float64_reference(name, mask_repeated):
    """dL/dt, dL/db, dL/dq, dL/dd of step.objective against the analytic float64 gradients;
    those are first checked against float64 central differences of the numpy loss."""
    cfg = base_config().loss
    cfg.name, cfg.mask_unlabelled_of_repeated_queries = name, mask_repeated
    cfg.follow_logit_params = "adam"  # the reference is at the given t, b
    rng = np.random.default_rng(1)
    b, h = 8, 5
    qids = np.array([0, 1, 2, 0, 3, 4, 1, 0], np.int32)  # q0 thrice, q1 twice
    dids = np.array([0, 1, 2, 3, 4, 1, 5, 2], np.int32)  # d1, d2 twice: off-diagonal labels
    grades = np.array([0.9, 0.7, 0.2, 0.6, 0.3, 1.0, 0.8, 0.4], np.float32)  # q2, q3: no InfoNCE positive
    q = rng.standard_normal((b, h)).astype(np.float32) * 0.5
    d = rng.standard_normal((b, h)).astype(np.float32) * 0.5
    t, bias = np.float32(math.log(4.0)), np.float32(-1.5)
    batch = {"query_ids": jnp.asarray(qids), "doc_ids": jnp.asarray(dids), "grades": jnp.asarray(grades)}

    targets, labelled = brute_force_targets(qids, dids, grades.astype(np.float64))
    assert labelled.sum() > b  # off-diagonal labels exist
    repeated = np.array([np.sum(qids == x) > 1 for x in qids])
    mask = (~repeated[:, None] | labelled) if mask_repeated else np.ones((b, b), bool)
    args = (targets, mask, cfg.infonce_threshold)
    q64, d64, t64, b64 = q.astype(np.float64), d.astype(np.float64), float(t), float(bias)
    want = _numpy_objective(name, t64, b64, q64, d64, *args)

    # The analytic gradients are those of the numpy loss (float64 central differences).
    f = lambda t_, b_, q_, d_: _numpy_objective(name, t_, b_, q_, d_, *args)[0]
    eps = 1e-6
    fd_t = (f(t64 + eps, b64, q64, d64) - f(t64 - eps, b64, q64, d64)) / (2 * eps)
    fd_b = (f(t64, b64 + eps, q64, d64) - f(t64, b64 - eps, q64, d64)) / (2 * eps)
    unit = lambda i: np.eye(b * h)[i].reshape(b, h) * eps
    fd_q = np.array([(f(t64, b64, q64 + unit(i), d64) - f(t64, b64, q64 - unit(i), d64)) / (2 * eps)
                     for i in range(b * h)]).reshape(b, h)
    fd_d = np.array([(f(t64, b64, q64, d64 + unit(i)) - f(t64, b64, q64, d64 - unit(i))) / (2 * eps)
                     for i in range(b * h)]).reshape(b, h)
    for fd, analytic in zip((fd_t, fd_b, fd_q, fd_d), want[1:]):
        np.testing.assert_allclose(fd, analytic, rtol=1e-6, atol=1e-8)

    loss_fn = step.make_objective(cfg, None)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, q_, d_: loss_fn(p, q_, d_, batch)[0], argnums=(0, 1, 2)))
    loss, (g_p, g_q, g_d) = grad_fn({"log_temperature": t, "bias": bias}, q, d)
    # float32 logits of size ~5 and sums over 64 cells: 1e-5 relative is a few float32 ulps.
    assert float(loss) == pytest.approx(want[0], rel=1e-5)
    scale = max(np.abs(want[3]).max(), np.abs(want[4]).max())
    assert float(g_p["log_temperature"]) == pytest.approx(want[1], rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(g_q, want[3], rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(g_d, want[4], rtol=1e-5, atol=1e-6 * scale)
    if name == "bixse":
        assert float(g_p["bias"]) == pytest.approx(want[2], rel=1e-5, abs=1e-6)
        assert abs(want[2]) > 0.1
    else:  # softmax is shift-invariant: b gets no gradient under InfoNCE
        assert abs(want[2]) < 1e-12 and abs(float(g_p["bias"])) < 1e-6
