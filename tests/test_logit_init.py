"""`loss.init_logit_params='auto'`: the logistic fit of (t, b), and training starting from it."""

import json
import math

import jax
import numpy as np
import pytest

from bixse_jax import logit_init, parallel, step as step_lib, train
from bixse_jax.errors import ConfigError
from bixse_jax.experiment import load_model, make_batcher
from train_utils import pairs_jsonl, tiny_config


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _synthetic(n=200_000, scale=12.0, bias=-5.0, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.uniform(-0.2, 0.9, n)
    return s, _sigmoid(scale * s + bias)


def test_soft_targets_from_a_logistic_model_give_back_its_parameters():
    """T = sigmoid(a s + b) exactly: the BCE's minimiser is (a, b) itself, from a far start."""
    s, p = _synthetic(n=5000)
    a, b, info = logit_init.fit_logistic(s, p, init_scale=10.0, init_bias=-10.0)
    assert (a, b) == pytest.approx((12.0, -5.0), rel=1e-6)
    assert info["cells"] == 5000 and info["iterations"] < 30


def test_sampled_binary_targets_recover_the_parameters():
    s, p = _synthetic()
    labels = (np.random.default_rng(1).uniform(size=p.shape) < p).astype(float)
    a, b, _ = logit_init.fit_logistic(s, labels, init_scale=math.exp(math.log(10.0)), init_bias=-10.0)
    assert a == pytest.approx(12.0, rel=0.05) and b == pytest.approx(-5.0, rel=0.05)


def test_frozen_coordinate_stays_and_the_other_is_its_conditional_optimum():
    s, p = _synthetic(n=5000)
    a, b, _ = logit_init.fit_logistic(s, p, init_scale=12.0, init_bias=0.0, fit_scale=False)
    assert a == 12.0 and b == pytest.approx(-5.0, rel=1e-6)  # at the true a, the best b is the true b
    a, b, _ = logit_init.fit_logistic(s, p, init_scale=3.0, init_bias=-5.0, fit_bias=False)
    assert b == -5.0 and a == pytest.approx(12.0, rel=1e-6)
    # A frozen b away from the truth: a is still a stationary point of F in a.
    a, b, _ = logit_init.fit_logistic(s, p, init_scale=3.0, init_bias=-2.0, fit_bias=False)
    grad_a = np.sum((_sigmoid(a * s + b) - p) * s)
    assert b == -2.0 and abs(grad_a) < 1e-6 * len(s)


def test_anti_correlated_scores_stop_at_the_scale_floor():
    s, p = _synthetic(n=2000, scale=-5.0, bias=0.0)
    a, _, info = logit_init.fit_logistic(s, p, init_scale=10.0, init_bias=-10.0)
    assert a > 0 and info["at_scale_floor"]


def test_auto_fits_only_where_there_is_an_optimum_and_something_to_fit():
    """`auto` is the default for every loss: it fits BiXSE's learnable (t, b) and is `fixed` for a
    loss without the logistic optimum or with both frozen; an unknown mode is a ConfigError."""
    from bixse_jax.default_config import base_config
    cfg = base_config().loss
    assert (cfg.init_logit_params, logit_init.init_mode(cfg)) == ("auto", "auto")
    for changes in ({"name": "infonce"}, {"learn_temperature": False, "learn_bias": False}):
        other = base_config().loss
        other.update(changes)
        assert logit_init.init_mode(other) == "fixed", changes
    cfg.learn_bias = False  # "no bias": t alone is fitted
    assert logit_init.init_mode(cfg) == "auto"
    cfg.init_logit_params = "guess"
    with pytest.raises(ConfigError, match="is not one of"):
        logit_init.check(cfg)
    cfg.init_logit_params, cfg.init_fit_batches = "auto", 0
    with pytest.raises(ConfigError, match="must be >= 1"):
        logit_init.check(cfg)


def _direct_fit(config, steps):
    """The fit computed independently: one-device dense embeddings of the first batches, targets and
    mask from step.batch_targets (the dense loss's own), every row."""
    model = load_model(config.model)
    batcher = make_batcher(config, model)
    scores, targets = [], []
    for s in range(steps):
        batch = jax.tree.map(np.asarray, batcher.batch(s))
        q = np.asarray(model.encoder(model.params, batch["query_input_ids"], batch["query_attention_mask"]), np.float64)
        d = np.asarray(model.encoder(model.params, batch["doc_input_ids"], batch["doc_attention_mask"]), np.float64)
        t, _, m = step_lib.batch_targets(batch, config.loss)
        m = np.asarray(m)
        scores.append((q @ d.T)[m])
        targets.append(np.asarray(t, np.float64)[m])
    return logit_init.fit_logistic(np.concatenate(scores), np.concatenate(targets), init_scale=10.0, init_bias=-10.0)


def test_training_starts_from_the_fit_on_eight_devices_and_a_resume_keeps_it(tiny_model_dir, tmp_path):
    """The fit over the first 2 global batches (16 pairs on 8 devices, queries repeating across them)
    equals the direct one-device computation; the first step's logged t and b (the values the step
    used) are the fitted ones; a resumed run does not refit: its step uses the checkpoint's t and b."""
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    config = tiny_config(tiny_model_dir, data, num_steps=2, log_every=1, checkpoint_every=1, warmup_steps=0)
    config.loss.init_logit_params, config.loss.init_fit_batches = "auto", 2
    config.loss.follow_logit_params = "adam"  # the step then moves t and b by Adam from the fit (a refit would replace it)
    config.loss.mask_unlabelled_of_repeated_queries = True  # the mask must be the loss's own too
    assert parallel.make_mesh().size == 8
    a, b, _ = _direct_fit(config, 2)
    assert abs(math.log(a) - math.log(10.0)) > 0.05 and abs(b + 10.0) > 0.05  # the fit moved both

    workdir = tmp_path / "run"
    summary, state = train.train(config, workdir, stop_after_step=1, show_progress=False)
    fit = summary["init_logit_params"]
    assert fit["log_temperature"] == pytest.approx(math.log(a), abs=2e-4)
    assert fit["bias"] == pytest.approx(b, abs=2e-4)
    logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert logged[0]["step"] == 0 and logged[0]["init/bias"] == fit["bias"]
    assert logged[1]["step"] == 1
    assert logged[1]["log_temperature"] == pytest.approx(fit["log_temperature"], abs=1e-6)
    assert logged[1]["bias"] == pytest.approx(fit["bias"], abs=1e-6)
    after_one = jax.device_get(state.params)
    assert summary["bias"] == float(after_one["bias"]) != pytest.approx(fit["bias"], abs=1e-6)  # step 1 moved b

    resumed_summary, _ = train.train(config, workdir, show_progress=False)
    assert resumed_summary["resumed_from_step"] == 1 and "init_logit_params" not in resumed_summary
    second = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    assert second["step"] == 2
    assert second["bias"] == pytest.approx(float(after_one["bias"]), abs=1e-6)
    assert second["log_temperature"] == pytest.approx(float(after_one["log_temperature"]), abs=1e-6)
    record = json.loads((workdir / "summary.jsonl").read_text())  # only the finished run writes one
    assert record["steps"] == 2 and set(record) >= {"log_temperature", "bias"}


# --- loss.follow_logit_params='refit': the fit inside every step ---------------------------------

def test_jax_fit_equals_the_numpy_fit_on_the_masked_cells():
    rng = np.random.default_rng(3)
    s = rng.uniform(-0.2, 0.9, (64, 96)).astype(np.float32)
    y = (rng.uniform(size=s.shape) < _sigmoid(9.0 * s - 6.0)).astype(np.float32)
    m = rng.uniform(size=s.shape) < 0.8
    want_a, want_b, _ = logit_init.fit_logistic(s[m], y[m], init_scale=10.0, init_bias=-10.0)
    a, b = logit_init.fit_logistic_jax(s, y, m, np.float32(10.0), np.float32(-10.0), fit_scale=True, fit_bias=True,
                                       iterations=30)
    assert (float(a), float(b)) == pytest.approx((want_a, want_b), rel=1e-3)
    # Masked-out cells matter: the unmasked fit is another one.
    a_all, _, _ = logit_init.fit_logistic(s, np.where(m, y, 1.0), init_scale=10.0, init_bias=-10.0)
    assert abs(a_all - want_a) > 0.1
    a, b = logit_init.fit_logistic_jax(s, y, m, np.float32(3.0), np.float32(-2.0), fit_scale=True, fit_bias=False,
                                       iterations=30)
    assert float(b) == -2.0 and float(a) == pytest.approx(
        logit_init.fit_logistic(s[m], y[m], init_scale=3.0, init_bias=-2.0, fit_bias=False)[0], rel=1e-3)


@pytest.mark.parametrize("learn_bias", [True, False])
def test_refit_step_stores_the_fit_of_its_own_cells(learn_bias):
    """After one step, t and b are the logistic fit (numpy, float64) of that step's starting cosines,
    the loss's own targets and mask; a frozen b stays bit-exact."""
    from bixse_jax.default_config import base_config
    cfg = base_config()
    cfg.train.update(dict(warmup_steps=0, schedule="constant", learning_rate=1e-3))
    cfg.loss.update(dict(follow_logit_params="refit", learn_bias=learn_bias, init_bias=-4.0))
    tx, schedule = step_lib.make_optimizer(cfg.train)
    rng = np.random.default_rng(0)
    embeddings = {side: {"kernel": rng.standard_normal((16, 6)).astype(np.float32)} for side in ("q", "d")}
    state = step_lib.init_state(embeddings, cfg.loss, tx, seed=0)
    objective = step_lib.make_objective(cfg.loss, None)
    unit = lambda x: x / jax.numpy.linalg.norm(x, axis=-1, keepdims=True)
    loss_fn = lambda p, batch, _: objective(p, unit(p["encoder"]["q"]["kernel"]), unit(p["encoder"]["d"]["kernel"]),
                                            batch)
    batch = {"query_ids": np.array([0, 1, 2, 0, 3, 4, 1, 5] * 2, np.int32), "doc_ids": np.arange(16, dtype=np.int32),
             "grades": rng.uniform(0.2, 1.0, 16).astype(np.float32)}
    new, metrics = jax.jit(step_lib.make_train_step(loss_fn, tx, schedule))(state, batch)
    q, d = (np.asarray(unit(embeddings[k]["kernel"]), np.float64) for k in ("q", "d"))
    targets, _, mask = jax.device_get(step_lib.batch_targets(batch, cfg.loss))
    mask = np.asarray(mask, bool)
    a, b, _ = logit_init.fit_logistic((q @ d.T)[mask], np.asarray(targets, np.float64)[mask], init_scale=10.0,
                                      init_bias=-4.0, fit_bias=learn_bias)
    assert float(new.params["log_temperature"]) == pytest.approx(math.log(a), abs=1e-3)
    assert float(metrics["log_temperature"]) == float(new.params["log_temperature"])  # the loss used the fit
    assert not any(k in metrics for k in step_lib.REFIT_KEYS)
    if learn_bias:
        assert float(new.params["bias"]) == pytest.approx(b, abs=1e-3) and abs(b + 4.0) > 0.1
    else:
        assert np.asarray(new.params["bias"]).tobytes() == np.asarray(state.params["bias"]).tobytes()
    assert np.abs(new.params["encoder"]["q"]["kernel"] - embeddings["q"]["kernel"]).max() > 1e-4  # it trained


def test_refit_is_refused_for_a_loss_without_the_optimum():
    from bixse_jax.default_config import base_config
    cfg = base_config().loss
    cfg.name, cfg.follow_logit_params = "infonce", "refit"
    with pytest.raises(ConfigError, match="no such optimum"):
        step_lib.make_objective(cfg, None)
    cfg.name, cfg.follow_logit_params = "bixse", "often"
    with pytest.raises(ConfigError, match="is not one of"):
        step_lib.make_objective(cfg, None)


def test_auto_follow_refits_bixse_and_leaves_the_others_to_adam():
    from bixse_jax.default_config import base_config
    cfg = base_config().loss
    cfg.follow_logit_params = "auto"
    assert logit_init.follow_mode(cfg) == "refit"
    cfg.name = "infonce"
    assert logit_init.follow_mode(cfg) == "adam"
    step_lib.make_objective(cfg, None)  # auto is accepted for a loss without the optimum
    frozen = base_config().loss
    frozen.learn_temperature, frozen.learn_bias = False, False
    assert logit_init.follow_mode(frozen) == "adam"  # nothing to refit: no fit on every step


def test_refit_with_matryoshka_prefixes_is_refused_and_auto_takes_adam():
    """One t and b serve every prefix, and the fit is of one width: an explicit refit is refused,
    `auto` (so the default) leaves them to Adam."""
    from bixse_jax.default_config import base_config
    cfg = base_config().loss
    cfg.follow_logit_params, cfg.matryoshka_dims = "refit", (4, "full")
    with pytest.raises(ConfigError, match="matryoshka_dims"):
        logit_init.check_follow(cfg)
    cfg.follow_logit_params = "auto"
    assert logit_init.follow_mode(cfg) == "adam"
    cfg.matryoshka_dims = ()
    assert logit_init.follow_mode(cfg) == "refit"
