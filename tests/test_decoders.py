"""Decoder LLMs (llama, qwen2, qwen3) against transformers (PyTorch, float32), padding, loading, axes.

Tiny random models are written by transformers' `save_pretrained` and read by bixse-jax. The
reference for every text is transformers run on that text alone, unpadded; bixse-jax runs the
texts as one batch of uneven lengths, padded on the right and on the left. The largest
difference of each check is printed (pytest -s) for the record.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import traverse_util

from bixse_jax.models import architectures, hf_io
from bixse_jax.models.decoder import DecoderConfig
from bixse_jax.models.architectures import init_params
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.data.batching import pad_batch
from bixse_jax.label.jax_teacher import left_pad

from conftest import skip_unless_ci
from train_utils import logged

try:
    import torch
    import transformers
except ImportError:
    skip_unless_ci("torch and transformers are needed for the decoder parity tests (pip install -e .[test])")

TINY = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=256, eos_token_id=2, bos_token_id=1)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),  # q/k norms; head_dim != hidden/heads
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE}),
    "llama_tied_biased": ("LlamaConfig", "LlamaForCausalLM",
                          {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
}
LENGTHS = (7, 3, 9, 1)


def _write_model(case: str, out, seed: int = 0):
    config_cls, model_cls, extra = CASES[case]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # every weight random, norms and biases included, so each one matters
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return model


def _texts(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, TINY["vocab_size"], size=n).astype(np.int32) for n in LENGTHS]


def _batch(texts, side):
    """(ids, mask) padded with 0 to the longest text, by the package's own right / left padders."""
    pad = pad_batch if side == "right" else left_pad
    return pad(texts, max(len(x) for x in texts), 0)


def _reference(model, texts, bidirectional=False):
    """transformers' last hidden states of each text alone; bidirectional through an all-zero 4D mask."""
    out = []
    with torch.no_grad():
        for x in texts:
            kwargs = {"attention_mask": torch.zeros(1, 1, len(x), len(x))} if bidirectional else {}
            out.append(model.model(torch.tensor(x[None], dtype=torch.long), **kwargs).last_hidden_state[0].numpy())
    return out


def _hidden(config, params, ids, mask):
    return np.asarray(SentenceEncoder(config).module.apply({"params": params}, ids, mask))


@pytest.mark.parametrize("case", list(CASES))
def test_hidden_states_and_last_token_embeddings_equal_transformers(case, tmp_path):
    model = _write_model(case, tmp_path)
    if case == "llama_tied_biased":
        from safetensors import safe_open
        with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as f:
            assert not any(k.startswith("lm_head") for k in f.keys())  # tied: no separate head in the file
    config, params, _ = hf_io.load_pretrained(tmp_path)
    assert config.model_type == CASES[case][0].removesuffix("Config").lower()
    np.testing.assert_allclose(config.inverse_frequencies(), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
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
            hf = model.model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                             position_ids=torch.tensor(positions, dtype=torch.long)).last_hidden_state.numpy()
        worst[f"hf_batch_{side}"] = max(np.abs(hidden[i][mask[i] == 1] - hf[i][mask[i] == 1]).max()
                                        for i in range(len(texts)))
        pooled = np.asarray(SentenceEncoder(config, "last", normalize=False)(params, ids, mask))
        want = np.stack([r[-1] for r in ref])
        worst[f"last_token_{side}"] = np.abs(pooled - want).max()
        unit = np.asarray(SentenceEncoder(config, "last", normalize=True)(params, ids, mask))
        worst[f"normalised_{side}"] = np.abs(unit - want / np.linalg.norm(want, axis=1, keepdims=True)).max()
    print(case, {k: f"{v:.1e}" for k, v in worst.items()})
    assert max(worst.values()) <= 1e-5, worst


def test_bidirectional_equals_transformers_without_causal_mask_and_ignores_padding(tmp_path):
    """Reference: transformers (eager attention) given an all-zero additive 4D mask, each text unpadded."""
    model = _write_model("qwen3", tmp_path)
    model.config._attn_implementation = "eager"
    config, params, _ = hf_io.load_pretrained(tmp_path, bidirectional=True)
    assert config.bidirectional
    causal_config = dataclasses.replace(config, bidirectional=False)
    texts = _texts(seed=1)
    ref = _reference(model, texts, bidirectional=True)
    worst = 0.0
    for side in ("right", "left"):
        ids, mask = _batch(texts, side)
        hidden = _hidden(config, params, ids, mask)
        worst = max(worst, max(np.abs(hidden[i][mask[i] == 1] - ref[i]).max() for i in range(len(texts))))
        causal = _hidden(causal_config, params, ids, mask)
        row = int(np.argmax(LENGTHS))  # a long text: its first token sees the rest only bidirectionally
        assert np.abs(hidden[row][mask[row] == 1][0] - causal[row][mask[row] == 1][0]).max() > 1e-2
    print("bidirectional", f"{worst:.1e}")
    assert worst <= 1e-5


def test_sharded_bfloat16_folder_loads_as_float32(tmp_path):
    model = _write_model("qwen2", tmp_path / "f32")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "bf16" / "model.safetensors").exists()
    config, params, _ = hf_io.load_pretrained(tmp_path / "bf16")
    q = params["model"]["layers"]["1"]["self_attn"]["q_proj"]
    want = model.model.layers[1].self_attn.q_proj
    np.testing.assert_array_equal(q["kernel"], want.weight.detach().float().numpy().T)
    np.testing.assert_array_equal(q["bias"], want.bias.detach().float().numpy())
    assert q["kernel"].dtype == np.float32


def test_parameter_tree_keeps_transformers_names_and_every_parameter_has_logical_axes():
    config = DecoderConfig(**{k: v for k, v in TINY.items() if k != "bos_token_id"}, model_type="qwen3", head_dim=16)
    params = init_params(config, jax.random.key(0))
    flat = traverse_util.flatten_dict(params)
    names = {"/".join(k) for k in flat}
    for expected in ("model/embed_tokens/embedding", "model/norm/weight", "model/layers/1/input_layernorm/weight",
                     "model/layers/0/self_attn/q_proj/kernel", "model/layers/0/self_attn/k_norm/weight",
                     "model/layers/1/mlp/down_proj/kernel", "model/layers/1/post_attention_layernorm/weight"):
        assert expected in names
    assert flat["model", "layers", "0", "self_attn", "k_proj", "kernel"].shape == (32, 2 * 16)
    axes = traverse_util.flatten_dict(architectures.param_axes(config), is_leaf=lambda _, x: isinstance(x, tuple))
    assert axes.keys() == flat.keys()
    assert all(len(axes[k]) == flat[k].ndim for k in flat)
    assert axes["model", "layers", "0", "self_attn", "k_proj", "kernel"] == ("embed", "kv_heads")
    assert axes["model", "layers", "0", "self_attn", "o_proj", "kernel"] == ("heads", "embed")
    assert axes["model", "layers", "0", "mlp", "down_proj", "kernel"] == ("mlp", "embed")
    assert axes["model", "embed_tokens", "embedding"] == ("vocab", "embed")


def test_fsdp_shardings_follow_the_declared_axes():
    from jax.sharding import PartitionSpec as P

    from bixse_jax import parallel
    config = DecoderConfig(**{k: v for k, v in TINY.items() if k != "bos_token_id"}, model_type="qwen3", head_dim=16)
    params = {"encoder": init_params(config, jax.random.key(0)), "bias": np.float32(0)}
    mesh = parallel.make_mesh(data_parallelism=4, fsdp=2)
    shardings = parallel.param_shardings(params, mesh, encoder_axes=architectures.param_axes(config))
    layer = shardings["encoder"]["model"]["layers"]["0"]
    assert layer["self_attn"]["k_proj"]["kernel"].spec == P("fsdp", None)
    assert layer["self_attn"]["o_proj"]["kernel"].spec == P(None, "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"].spec == P(None, "fsdp")
    assert layer["self_attn"]["q_norm"]["weight"].spec == P(None)  # head_dim: never split
    assert shardings["encoder"]["model"]["embed_tokens"]["embedding"].spec == P(None, "fsdp")
    jax.device_put(params, shardings)  # every spec fits its array


def test_last_token_pooling_finds_the_last_real_token_on_either_side():
    from bixse_jax.models.pooling import pool
    hidden = np.arange(2 * 4 * 1, dtype=np.float32).reshape(2, 4, 1)
    left = np.array([[0, 0, 1, 1], [0, 1, 1, 1]])
    right = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert np.asarray(pool(hidden, left, "last"))[:, 0].tolist() == [3.0, 7.0]
    assert np.asarray(pool(hidden, right, "last"))[:, 0].tolist() == [1.0, 6.0]


def test_unsupported_folders_fail_in_one_line_naming_the_choices(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "mistral"}))
    with pytest.raises(hf_io.ModelLoadError) as err:
        hf_io.load_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "'mistral'" in msg and "'llama', 'qwen2', 'qwen3'" in msg and "'bert'" in msg
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "qwen2", "use_sliding_window": True}))
    with pytest.raises(hf_io.ModelLoadError, match="sliding-window"):
        hf_io.load_pretrained(tmp_path)
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama", "rope_parameters": rope}))
    with pytest.raises(hf_io.ModelLoadError, match="rope_type 'yarn' is not supported"):
        hf_io.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32,
                                                      "num_attention_heads": 4}))
    with pytest.raises(hf_io.ModelLoadError, match="model.bidirectional is for decoder models"):
        hf_io.load_pretrained(tmp_path, bidirectional=True)


WORDS = ["red", "blue", "cat", "dog", "runs", "sleeps", "fast", "slow", "big", "small", "question"]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny Llama as transformers writes it, with a word-level tokenizer that adds <s> (as Llama 3's
    adds its BOS) and has no pad token (as most decoders' do not)."""
    import tokenizers
    out = tmp_path_factory.mktemp("tiny_llama")
    _write_model("llama", out)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    return out


def test_plain_decoder_folder_loads_as_last_token_normalised_encoder(tiny_llama_dir):
    from bixse_jax.models.sentence_model import load_encoder
    model = load_encoder(tiny_llama_dir)
    assert (model.encoder.pooling, model.encoder.normalize) == ("last", True)
    assert model.tokenizer.pad_id == 2  # no pad token: config.json's pad_token_id, else its eos_token_id
    assert model.tokenizer.encode(["red cat runs"], 8)[0].tolist() == [1, 3, 5, 7]
    eos = load_encoder(tiny_llama_dir, append_eos=True)
    assert eos.tokenizer.encode(["red cat runs"], 8)[0].tolist() == [1, 3, 5, 7, 2]
    assert eos.tokenizer.encode(["red cat runs"], 3)[0].tolist() == [1, 3, 2]  # truncation keeps room for eos


def test_cli_trains_a_decoder_with_fsdp(tiny_llama_dir, tmp_path):
    import os
    import subprocess
    import sys

    from train_utils import cli_overrides, pairs_jsonl
    data = pairs_jsonl(tmp_path / "pairs.jsonl")
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bixse_jax.cli", "train", "--workdir", str(workdir),
           *cli_overrides(tiny_llama_dir, data, **{"train.num_steps": 2, "train.log_every": 1,
                                                   "train.checkpoint_every": 2, "mesh.fsdp": 2,
                                                   "model.append_eos": True})]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((workdir / "summary.jsonl").read_text())["steps"] == 2
    losses = logged(workdir)
    assert len(losses) == 2 and all(np.isfinite(losses)), losses
    from bixse_jax import checkpoint
    trained = checkpoint.restore_model(workdir)  # the run's decoder, with its settings
    assert (trained.config.model_type, trained.encoder.pooling, trained.tokenizer.append_id) == ("llama", "last", 2)
    base = hf_io.load_pretrained(tiny_llama_dir)[1]
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(base))]
    assert max(moved) > 0


def test_xla_attention_remat_and_bfloat16_agree_with_the_default(tmp_path):
    _write_model("qwen3", tmp_path)
    config, params, _ = hf_io.load_pretrained(tmp_path)
    ids, mask = _batch(_texts(), "left")
    real = mask == 1
    ref = _hidden(config, params, ids, mask)[real]
    for variant in (dict(attention_impl="xla"), dict(remat="full")):
        got = _hidden(dataclasses.replace(config, **variant), params, ids, mask)[real]
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=str(variant))
    half = _hidden(dataclasses.replace(config, dtype="bfloat16"), params, ids, mask)[real].astype(np.float32)
    assert np.abs(half - ref).max() <= 0.1 * np.abs(ref).max()


def test_transformers_4_rope_scaling_reads_like_transformers_5_rope_parameters():
    base = {k: v for k, v in TINY.items() if k != "bos_token_id"} | {"model_type": "llama"}
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = architectures.config_from_hf(base | {"rope_theta": 5e5, "rope_scaling": scaling})
    v5 = architectures.config_from_hf(base | {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5}})
    assert v4 == v5 and v4.rope_type == "llama3" and v4.rope_theta == 5e5
    old_style = architectures.config_from_hf(base | {"rope_theta": 5e5, "rope_scaling": {
        "type": "llama3", **{k: v for k, v in scaling.items() if k != "rope_type"}}})
    assert old_style == v5
