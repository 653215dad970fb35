"""ModernBERT against transformers (PyTorch, float32, SDPA on a CPU): padding, sliding windows, loading, axes.

Tiny random models are written by transformers' `save_pretrained` and read by bixse-jax. The
reference for every text is transformers run on that text alone, unpadded; bixse-jax runs the
texts as one batch of uneven lengths, padded on the right and on the left. The longest text is
longer than the local window, so the sliding-window layers matter. The largest difference of each
check is printed (pytest -s) for the record.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from bixse_jax.models import architectures, hf_io
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.models.modernbert import ModernBertConfig
from bixse_jax.models.architectures import init_params
from bixse_jax.data.batching import pad_batch
from bixse_jax.label.jax_teacher import left_pad

from conftest import skip_unless_ci
from train_utils import logged

try:
    import torch
    import transformers
except ImportError:
    skip_unless_ci("torch and transformers are needed for the ModernBERT parity tests (pip install -e .[test])")

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_attention_heads=4, max_position_embeddings=256,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
CASES = {
    # biases everywhere; window 8 (4 each side); global layers 0 and 2
    "biased": ("ModernBertModel", dict(num_hidden_layers=3, local_attention=8, global_attn_every_n_layers=2,
                                       norm_bias=True, attention_bias=True, mlp_bias=True,
                                       global_rope_theta=1000.0, local_rope_theta=50.0)),
    # ModernBERT's defaults (no biases), as the MLM model saves it (`model.` prefix, a head to ignore);
    # window 6 (3 each side); global layers 0 and 3
    "masked_lm": ("ModernBertForMaskedLM", dict(num_hidden_layers=4, local_attention=6, global_attn_every_n_layers=3)),
}
LENGTHS = (12, 3, 17, 1)


def _write_model(case: str, out, seed: int = 0):
    model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    config = transformers.ModernBertConfig(**TINY, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # every weight random, norms and biases included, so each one matters
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return model.model if hasattr(model, "model") else model


def _texts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY["vocab_size"], size=n).astype(np.int32) for n in LENGTHS]


def _batch(texts, side):
    """(ids, mask) padded with 0 to the longest text, by the package's own right / left padders."""
    pad = pad_batch if side == "right" else left_pad
    return pad(texts, max(len(x) for x in texts), 0)


def _reference(model, texts):
    with torch.no_grad():
        return [model(torch.tensor(x[None], dtype=torch.long)).last_hidden_state[0].numpy() for x in texts]


def _hidden(config, params, ids, mask):
    return np.asarray(SentenceEncoder(config).module.apply({"params": params}, ids, mask))


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_and_pooled_embeddings_equal_transformers(case, tmp_path):
    model = _write_model(case, tmp_path)
    config, params, _ = hf_io.load_pretrained(tmp_path)
    assert config.model_type == "modernbert" and config.layer_types == tuple(model.config.layer_types)
    assert config.half_window == model.config.sliding_window and max(LENGTHS) > 2 * config.half_window + 1
    for layer_type in ("full_attention", "sliding_attention"):
        np.testing.assert_allclose(config.inverse_frequencies(layer_type),
                                   getattr(model.rotary_emb, f"{layer_type}_inv_freq").numpy(), rtol=1e-6)
    texts = _texts()
    ref = _reference(model, texts)
    worst = {}
    for side in ("right", "left"):
        ids, mask = _batch(texts, side)
        hidden = _hidden(config, params, ids, mask)
        got = [hidden[i][mask[i] == 1] for i in range(len(texts))]
        worst[f"hidden_{side}"] = max(np.abs(g - r).max() for g, r in zip(got, ref))
        # transformers on the same padded batch, given positions that count real tokens only
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        with torch.no_grad():
            hf = model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(positions, dtype=torch.long)).last_hidden_state.numpy()
        worst[f"hf_batch_{side}"] = max(np.abs(hidden[i][mask[i] == 1] - hf[i][mask[i] == 1]).max()
                                        for i in range(len(texts)))
        for mode, want in (("mean", np.stack([r.mean(axis=0) for r in ref])), ("cls", np.stack([r[0] for r in ref]))):
            if mode == "cls" and side == "left":
                continue  # CLS pooling reads position 0: right padding only, as ModernBERT's tokenizers pad
            pooled = np.asarray(SentenceEncoder(config, mode, normalize=False)(params, ids, mask))
            worst[f"{mode}_{side}"] = np.abs(pooled - want).max()
            unit = np.asarray(SentenceEncoder(config, mode, normalize=True)(params, ids, mask))
            worst[f"{mode}_normalised_{side}"] = np.abs(unit - want / np.linalg.norm(want, axis=1, keepdims=True)).max()
    # The sliding window matters: without it the long text's states change.
    ids, mask = _batch(texts, "right")
    row = int(np.argmax(LENGTHS))
    wide = _hidden(dataclasses.replace(config, local_attention=10_000), params, ids, mask)
    assert np.abs(wide[row] - _hidden(config, params, ids, mask)[row]).max() > 1e-2
    print(case, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-5, worst


def test_parameter_tree_keeps_transformers_names_and_every_parameter_has_logical_axes():
    config = ModernBertConfig(**{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                      "num_attention_heads")}, num_hidden_layers=3, norm_bias=True)
    flat = traverse_util.flatten_dict(init_params(config, jax.random.key(0)))
    names = {"/".join(k) for k in flat}
    for expected in ("embeddings/tok_embeddings/embedding", "embeddings/norm/weight", "embeddings/norm/bias",
                     "layers/0/attn/Wqkv/kernel", "layers/0/attn/Wo/kernel", "layers/0/mlp/Wi/kernel",
                     "layers/0/mlp/Wo/kernel", "layers/0/mlp_norm/weight", "layers/1/attn_norm/weight",
                     "final_norm/weight", "final_norm/bias"):
        assert expected in names
    assert not any(n.startswith("layers/0/attn_norm") for n in names)  # transformers' Identity
    assert flat["layers", "0", "mlp", "Wi", "kernel"].shape == (32, 2 * 48)
    assert flat["layers", "0", "attn", "Wqkv", "kernel"].shape == (32, 3 * 32)
    axes = traverse_util.flatten_dict(architectures.param_axes(config), is_leaf=lambda _, x: isinstance(x, tuple))
    assert axes.keys() == flat.keys()
    assert all(len(axes[k]) == flat[k].ndim for k in flat)
    assert axes["layers", "0", "attn", "Wqkv", "kernel"] == ("embed", "heads")
    assert axes["layers", "0", "mlp", "Wo", "kernel"] == ("mlp", "embed")
    assert axes["embeddings", "tok_embeddings", "embedding"] == ("vocab", "embed")


def test_one_training_step_on_an_fsdp_mesh_moves_the_params():
    from jax.sharding import PartitionSpec as P

    from bixse_jax import parallel, step as step_lib
    from bixse_jax.default_config import base_config
    config = ModernBertConfig(**{k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                      "num_attention_heads")}, num_hidden_layers=2,
                              local_attention=4, global_attn_every_n_layers=2)
    encoder = SentenceEncoder(config)
    cfg = base_config()
    cfg.train.warmup_steps = 0  # so that the one step moves the parameters
    cfg.mesh.fsdp = 2
    tx, schedule = step_lib.make_optimizer(cfg.train)
    mesh = parallel.make_mesh(4, 2)
    state = step_lib.init_sharded_state(init_params(config, jax.random.key(0)), cfg, tx, mesh, encoder.param_axes())
    wqkv = state.params["encoder"]["layers"]["1"]["attn"]["Wqkv"]["kernel"]
    assert wqkv.sharding.spec == P("fsdp", None) and wqkv.addressable_shards[0].data.shape == (16, 96)
    assert state.params["encoder"]["layers"]["1"]["mlp"]["Wo"]["kernel"].sharding.spec == P(None, "fsdp")
    assert state.params["encoder"]["final_norm"]["weight"].sharding.spec == P("fsdp")
    start = jax.device_get(state.params)
    rng = np.random.default_rng(0)
    b, t = 8, 12
    mask = np.ones((b, t), np.int32)
    mask[::3, 7:] = 0
    batch = {"query_input_ids": rng.integers(3, 128, (b, t)).astype(np.int32), "query_attention_mask": mask,
             "doc_input_ids": rng.integers(3, 128, (b, t)).astype(np.int32), "doc_attention_mask": mask[::-1].copy(),
             "query_ids": np.arange(b, dtype=np.int32), "doc_ids": np.arange(b, dtype=np.int32),
             "grades": rng.uniform(size=b).astype(np.float32)}
    loss_fn = step_lib.make_loss_fn(encoder, cfg.loss, mesh, use_dropout=False)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(loss_fn, tx, schedule), mesh, state)
    state, metrics = train_step(state, parallel.global_batch(batch, mesh))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite"]) == 0.0
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         jax.device_get(state.params["encoder"]), start["encoder"])
    assert min(jax.tree.leaves(moved)) > 0, moved


def test_transformers_4_config_fields_read_like_transformers_5():
    base = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads")}
    v4 = architectures.config_from_hf({**base, "model_type": "modernbert", "num_hidden_layers": 4,
                                       "global_attn_every_n_layers": 2, "global_rope_theta": 1e5,
                                       "local_rope_theta": 1e3, "dtype": "bfloat16"})
    rope_parameters = {"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}}
    v5 = architectures.config_from_hf({**base, "model_type": "modernbert", "num_hidden_layers": 4,
                                       "layer_types": ["full_attention", "sliding_attention"] * 2,
                                       "rope_parameters": rope_parameters})
    assert v4 == v5 and v4.dtype == "float32"  # config.json's dtype is the storage's, not the compute's
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        architectures.config_from_hf({**base, "model_type": "modernbert", "rope_parameters": {
            "full_attention": {"rope_type": "linear", "rope_theta": 1e5, "factor": 2.0}}})
    with pytest.raises(ValueError, match="model.bidirectional is for decoder models"):
        architectures.config_from_hf({**base, "model_type": "modernbert"}, bidirectional=True)
    with pytest.raises(ValueError, match="attention_impl 'cudnn'"):
        architectures.config_from_hf({**base, "model_type": "modernbert"}, attention_impl="cudnn")


def test_xla_attention_remat_and_bfloat16_agree_with_the_default(tmp_path):
    _write_model("biased", tmp_path)
    config, params, _ = hf_io.load_pretrained(tmp_path)
    ids, mask = _batch(_texts(), "left")
    real = mask == 1
    ref = _hidden(config, params, ids, mask)[real]
    for variant in (dict(attention_impl="xla"), dict(remat="full")):
        got = _hidden(dataclasses.replace(config, **variant), params, ids, mask)[real]
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=str(variant))
    half = _hidden(dataclasses.replace(config, dtype="bfloat16"), params, ids, mask)[real].astype(np.float32)
    assert np.abs(half - ref).max() <= 0.1 * np.abs(ref).max()


def _folder(case, out):
    """A tiny random ModernBERT folder with a word-level tokenizer adding [CLS] ... [SEP], as ModernBERT's does,
    and a tokenizer_config.json naming its special tokens (transformers' AutoTokenizer pads with [PAD])."""
    from test_decoder_export import word_tokenizer
    _write_model(case, out)
    word_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "[CLS] $A [SEP]", "[UNK]").save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "sep_token": "[SEP]", "unk_token": "[UNK]"}))
    return out


def test_cli_trains_a_modernbert_with_fsdp_and_exports_it(tmp_path):
    """Trained on a (data, fsdp) mesh by the CLI; its checkpoint exports as a sentence-transformers folder
    that embeds as bixse-jax does."""
    import os
    import subprocess
    import sys

    from test_decoder_export import check_export
    from train_utils import cli_overrides, pairs_jsonl
    model_dir = _folder("masked_lm", tmp_path / "tiny_modernbert")
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bixse_jax.cli", "train", "--workdir", str(workdir),
           *cli_overrides(model_dir, data, **{"train.num_steps": 2, "train.log_every": 1,
                                             "train.checkpoint_every": 2, "mesh.fsdp": 2})]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = logged(workdir)
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    from bixse_jax import checkpoint, export
    trained = checkpoint.restore_model(workdir)
    assert (trained.config.model_type, trained.encoder.pooling) == ("modernbert", "mean")  # a plain folder: mean
    base = hf_io.load_pretrained(model_dir)[1]
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(base))]
    assert max(moved) > 0
    out = export.export_checkpoint(workdir, tmp_path / "st", "sentence-transformers")
    check_export(out, trained, True, "trained modernbert, sentence-transformers folder")


def test_modernbert_exports_embed_like_bixse(tmp_path):
    """`hf` and `sentence-transformers` exports of a tiny random ModernBERT (mean pooling, a word-level
    tokenizer that adds [CLS] ... [SEP]): sentence-transformers and AutoModel (ModernBertModel, float32)
    embed as bixse-jax does within 1e-5; hf-flax is refused."""
    import bixse_jax
    from bixse_jax import export
    from safetensors.numpy import load_file
    from test_decoder_export import TEXTS, TOLERANCE, _hf_embed, check_export

    model = bixse_jax.load_encoder(_folder("biased", tmp_path / "model"))
    assert (model.config.model_type, model.settings.pooling) == ("modernbert", "mean")
    st = check_export(export.export_model(model, tmp_path / "st", "sentence-transformers"), model, True,
                      "modernbert sentence-transformers folder")
    assert type(st[0].auto_model).__name__ == "ModernBertModel"
    hf_out = export.export_model(model, tmp_path / "hf", "hf")
    assert json.loads((hf_out / "config.json").read_text())["architectures"] == ["ModernBertModel"]
    worst = float(np.abs(_hf_embed(hf_out, TEXTS, True, "mean") - bixse_jax.encode(model, TEXTS)).max())
    print(f"[export] modernbert hf folder: AutoModel max abs diff {worst:.1e}")
    assert worst < TOLERANCE
    wqkv = load_file(str(hf_out / "model.safetensors"))["layers.1.attn.Wqkv.weight"]
    np.testing.assert_array_equal(wqkv, model.params["layers"]["1"]["attn"]["Wqkv"]["kernel"].T)
    again = bixse_jax.load_encoder(hf_out)  # and bixse-jax reads its own export back
    np.testing.assert_array_equal(bixse_jax.encode(again, TEXTS), bixse_jax.encode(model, TEXTS))
    with pytest.raises(export.ExportError, match="no Flax ModernBERT"):
        export.export_model(model, tmp_path / "flax", "hf-flax")
    assert not (tmp_path / "flax").exists()
