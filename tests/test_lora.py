"""LoRA (model.lora.*, bixse_jax/models/lora.py): adapters attach to the named projections of every family,
step 0 is the base model, training moves the adapters and never the base, a resume is bit-identical and
refused on another base, and the exports (merged, and PEFT's adapter folder) embed as bixse-jax does."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

import bixse_jax
from bixse_jax import checkpoint, export
from bixse_jax.default_config import base_config
from bixse_jax.errors import ConfigError
from bixse_jax.models import architectures, bert, decoder, hf_io, lora, modernbert
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.train import train

from conftest import TINY_BERT, skip_unless_ci
from train_utils import pairs_jsonl, tiny_config

TEXTS = ["red cat runs fast", "blue dog", "a big slow cat sleeps and a small fast dog runs", "question red"]
FAMILIES = {  # family -> (tiny config, targets asked for, layer paths they must adapt, paths they must not)
    "bert": (bert.EncoderConfig(**{**TINY_BERT, "vocab_size": 64}), ("value", "output.dense"),
             ("attention.self.value", "attention.output.dense", "output.dense"), ("attention.self.query", "intermediate.dense")),
    "modernbert": (modernbert.ModernBertConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4), ("Wqkv", "mlp.Wo"),
                   ("attn.Wqkv", "mlp.Wo"), ("attn.Wo", "mlp.Wi")),
    "llama": (decoder.DecoderConfig(vocab_size=64, num_key_value_heads=2), ("q_proj", "v_proj", "down_proj"),
              ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"), ("self_attn.k_proj", "mlp.up_proj")),
    "qwen2": (decoder.DecoderConfig(vocab_size=64, model_type="qwen2"), ("k_proj", "o_proj"),
              ("self_attn.k_proj", "self_attn.o_proj"), ("self_attn.q_proj", "mlp.gate_proj")),
    "qwen3": (decoder.DecoderConfig(vocab_size=64, model_type="qwen3", head_dim=16), ("self_attn.q_proj", "up_proj"),
              ("self_attn.q_proj", "mlp.up_proj"), ("self_attn.v_proj", "mlp.down_proj")),
}


def _flat(tree):
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


@functools.lru_cache(maxsize=None)
def _encode_fn(config):
    ids = jax.random.randint(jax.random.key(0), (3, 9), 1, 64)
    mask = jnp.asarray([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7])
    return jax.jit(lambda params: SentenceEncoder(config, pooling="mean")(params, ids, mask))


def _embed(config, params):
    return np.asarray(_encode_fn(config)(params))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapters_attach_to_the_named_targets_and_step_0_is_the_base(family):
    config, targets, adapted, untouched = FAMILIES[family]
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=targets)
    with_lora = architectures.with_lora(config, spec)
    base = jax.device_get(architectures.init_params(config, jax.random.key(1)))
    shapes = architectures.param_shapes(with_lora)
    adapters = lora.init_adapters(shapes, seed=0)
    flat = _flat(adapters)
    layer = "0" if family != "bert" else "layer/0"
    for path in adapted:  # A [in, r] and B [r, out] beside the kernel, B zero
        prefix = next(k.rsplit("/lora_a", 1)[0] for k in flat if k.endswith(f"{layer}/{path.replace('.', '/')}/lora_a"))
        kernel = _flat(base)[prefix + "/kernel"]
        assert flat[prefix + "/lora_a"].shape == (kernel.shape[0], 3) and np.abs(flat[prefix + "/lora_a"]).max() > 0
        assert flat[prefix + "/lora_b"].shape == (3, kernel.shape[1]) and not flat[prefix + "/lora_b"].any()
    for path in untouched:
        assert not [k for k in flat if f"/{path.replace('.', '/')}/" in k], path
    assert len(flat) == 2 * len(adapted) * 2  # two layers
    # The base's names and shapes are untouched: HF weights still load by name.
    assert {k: v.shape for k, v in _flat(lora.split(shapes)[1]).items()} == {k: v.shape for k, v in _flat(base).items()}
    joined = lora.join(base, adapters)
    # B = 0: the base model (to the last bits XLA's fusions, which differ between the two graphs, leave)
    np.testing.assert_allclose(_embed(with_lora, joined), _embed(config, base), atol=3e-7, rtol=0)
    moved = jax.tree.map(lambda x: x + 0.05 if x.shape[0] == 3 else x, adapters)  # B non-zero now
    assert np.abs(_embed(with_lora, lora.join(base, moved)) - _embed(config, base)).max() > 1e-4
    # merge() folds W + (alpha / r) A B into the kernels: the plain family model embeds the same
    np.testing.assert_allclose(_embed(config, lora.merge(lora.join(base, moved), with_lora.lora)),
                               _embed(with_lora, lora.join(base, moved)), atol=2e-6)
    if family != "bert":  # adapters declare the kernel's logical axes on their side: they shard with it
        axes = _flat(architectures.param_axes(with_lora))
        key = next(k for k in axes if k.endswith("/lora_a"))
        kernel_axes = axes[key.replace("lora_a", "kernel")]
        assert axes[key] == (kernel_axes[0], "lora") and axes[key.replace("lora_a", "lora_b")] == ("lora", kernel_axes[1])


def test_config_errors_name_the_key():
    def spec(**kw):
        c = base_config().model.lora
        c.update(kw)
        return lora.spec_from_config(c)
    assert spec() is None  # rank 0: off
    for kw, match in [({"rank": -1}, "model.lora.rank"), ({"rank": 4, "alpha": 0.0}, "model.lora.alpha"),
                      ({"rank": 4, "dropout": 1.0}, "model.lora.dropout"),
                      ({"base_dtype": "float16"}, "model.lora.base_dtype")]:
        with pytest.raises(ConfigError, match=match):
            spec(**kw)
    with pytest.raises(ConfigError, match=r"model.lora.targets: 'query' names no projection of llama; "
                                          r"valid names: .*q_proj, .*self_attn.q_proj"):
        architectures.with_lora(FAMILIES["llama"][0], spec(rank=4, targets=("query",)))
    with pytest.raises(ConfigError, match="valid names: .*Wqkv"):
        architectures.with_lora(FAMILIES["modernbert"][0], spec(rank=4, targets=("q_proj",)))
    defaults = architectures.with_lora(FAMILIES["bert"][0], spec(rank=4)).lora.targets
    assert defaults == bert.LORA_DEFAULT_TARGETS


def test_runs_saved_before_lora_existed_still_resume():
    current = json.loads(base_config().to_json_best_effort())
    older = json.loads(json.dumps(current))
    del older["model"]["lora"]  # a config.json written before model.lora.* existed
    assert checkpoint.config_differences(older, current) == []
    changed = json.loads(json.dumps(current))
    changed["model"]["lora"]["rank"] = 8
    assert checkpoint.config_differences(older, changed) == ["model.lora.rank: checkpoint None, now 8"]
    assert checkpoint.config_differences(current, changed) == ["model.lora.rank: checkpoint 0, now 8"]


# --- a tiny BERT trained with LoRA --------------------------------------------------------------------

def _config(base_dir, data, **train):
    c = tiny_config(base_dir, data, **{"num_steps": 4, "checkpoint_every": 2, "log_every": 2, **train})
    c.model.lora.rank = 4
    c.model.lora.alpha = 8.0
    c.model.lora.targets = ("query", "value", "dense")
    return c


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_dir = root / "base"
    shutil.copytree(tiny_model_dir, base_dir)
    data = pairs_jsonl(root / "pairs.jsonl")
    config = _config(base_dir, data)
    summary, state = train(config, root / "run", show_progress=False)
    return root, base_dir, data, config, summary, jax.device_get(state)


def test_training_moves_the_adapters_and_never_the_base(run):
    root, base_dir, _, _, summary, state = run
    assert summary["steps"] == 4
    base = hf_io.load_pretrained(base_dir)[1]
    frozen = _flat(state.frozen)
    assert frozen.keys() == _flat(base).keys()
    for k, v in _flat(base).items():  # bit for bit
        np.testing.assert_array_equal(frozen[k], v, err_msg=k)
    adapters = _flat(state.params["encoder"])
    assert adapters and all(k.endswith(("lora_a", "lora_b")) for k in adapters)
    assert len(adapters) == 2 * 2 * 5  # query, value and the three dense layers, in 2 layers
    assert all(np.abs(v).max() > 0 for k, v in adapters.items() if k.endswith("lora_b"))  # B left zero
    # No optimiser state for the base: Adam's moments mirror the adapters and t, b only.
    sizes = sorted(x.size for x in jax.tree.leaves(state.opt_state) if x.size > 1)
    assert sum(sizes) == 2 * sum(v.size for v in adapters.values())
    assert state.params["log_temperature"] != base_config().loss.init_log_temperature  # t, b still train
    restored = checkpoint.restore_model(root / "run")
    assert restored.source["lora_base"]["sha256"] == lora.fingerprint(base)
    # The checkpoint holds no base weights: a LoRA step is the adapters, t, b and optimiser state.
    size = sum(f.stat().st_size for f in (root / "run" / "checkpoints" / "4").rglob("*") if f.is_file())
    assert size < sum(v.nbytes for v in _flat(base).values()) / 4


def test_resume_is_bit_identical(run, tmp_path):
    root, base_dir, data, config, _, straight = run
    workdir = tmp_path / "resumed"
    shutil.copytree(root / "run", workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")  # back to step 2, then steps 3 and 4 again
    (workdir / "summary.jsonl").unlink()
    summary, state = train(config, workdir, show_progress=False)
    assert summary["resumed_from_step"] == 2
    state = jax.device_get(state)
    for a, b in zip(jax.tree.leaves((straight.params, straight.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_resume_and_export_on_another_base_are_refused(run, tmp_path, tiny_model_dir):
    root, base_dir, data, _, _, _ = run
    other = tmp_path / "other_base"
    shutil.copytree(base_dir, other)
    config = bert.EncoderConfig(**TINY_BERT)
    hf_io.save_pretrained(other, config, jax.device_get(bert.init_params(config, jax.random.key(7))))
    workdir = tmp_path / "run"
    shutil.copytree(root / "run", workdir)
    saved = json.loads((workdir / "config.json").read_text())
    saved["model"]["name_or_path"] = str(other)  # as if the base folder's weights had been replaced
    (workdir / "config.json").write_text(json.dumps(saved, indent=2))
    want = lora.fingerprint(hf_io.load_pretrained(base_dir)[1])
    got = lora.fingerprint(hf_io.load_pretrained(other)[1])
    pattern = rf"trained on {base_dir} \(sha256 {want}\), but the run now has {other} \(sha256 {got}\)"
    with pytest.raises(checkpoint.CheckpointError, match=pattern):
        train(_config(other, data, num_steps=6), workdir, show_progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.restore_model(workdir)


def test_merged_and_peft_exports_embed_like_bixse(run, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    st = pytest.importorskip("sentence_transformers")
    root, base_dir, *_ = run
    model = checkpoint.restore_model(root / "run")
    want = bixse_jax.encode(model, TEXTS)
    folder = export.export_checkpoint(root / "run", tmp_path / "st", "sentence-transformers")
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, want, atol=1e-5)
    assert not [k for k in _flat(bixse_jax.load_encoder(folder).params) if "lora" in k]  # merged: plain weights
    assert "LoRA: rank 4, alpha 8, dropout 0 on query, value, dense; the base frozen" in (folder / "README.md").read_text()
    base = bixse_jax.load_encoder(base_dir)
    assert np.abs(bixse_jax.encode(base, TEXTS) - want).max() > 1e-4  # the adapters changed the model

    def mean_pooled(auto_model):
        tok = transformers.AutoTokenizer.from_pretrained(str(base_dir))
        batch = tok(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = auto_model(**batch).last_hidden_state
        m = batch["attention_mask"][..., None].to(hidden.dtype)
        out = ((hidden * m).sum(1) / m.sum(1)).numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)
    hf = export.export_checkpoint(root / "run", tmp_path / "hf", "hf")
    np.testing.assert_allclose(mean_pooled(transformers.AutoModel.from_pretrained(str(hf)).eval()), want, atol=1e-5)

    adapter = export.export_checkpoint(root / "run", tmp_path / "peft", "peft")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["base_model_name_or_path"]) == (4, 8.0, str(base_dir))
    peft = _peft()
    on_base = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(str(base_dir)), str(adapter)).eval()
    adapted = [n for n, _ in on_base.named_modules() if n.endswith(".lora_A")]
    assert len(adapted) == 10, adapted  # exactly the adapted layers: no pooler, no intermediate
    np.testing.assert_allclose(mean_pooled(on_base), want, atol=1e-5)
    with pytest.raises(export.ExportError, match="has none"):
        export.export_model(base, tmp_path / "none", "peft")


def test_decoder_lora_on_an_fsdp_mesh_with_a_bfloat16_base(tmp_path):
    """Llama with LoRA on 8 fsdp devices, gradient caching on: adapters shard along their kernel's split axis, the base is
    stored in bfloat16 and stays as it was, and the PEFT folder names exactly the adapted layers."""
    pytest.importorskip("transformers")
    from test_decoder_export import _folder
    base_dir = _folder(tmp_path, "llama")
    c = tiny_config(base_dir, pairs_jsonl(tmp_path / "pairs.jsonl"), num_steps=2, checkpoint_every=2, log_every=1)
    c.model.lora.update({"rank": 2, "targets": ("q_proj", "o_proj", "down_proj"), "base_dtype": "bfloat16"})
    c.mesh.fsdp = 8
    c.train.grad_cache_chunk = 8  # the cached step: base shards gathered per sub-batch, never differentiated
    summary, state = train(c, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 2
    layer = state.params["encoder"]["model"]["layers"]["0"]
    frozen = state.frozen["model"]["layers"]["0"]
    q, o = layer["self_attn"]["q_proj"], layer["self_attn"]["o_proj"]
    assert frozen["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", None)  # embed: split
    assert q["lora_a"].sharding.spec == P("fsdp", None) and o["lora_b"].sharding.spec == P(None, "fsdp")
    assert frozen["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert frozen["input_layernorm"]["weight"].dtype == jnp.float32  # norms stay float32
    base = _flat(hf_io.load_pretrained(base_dir)[1])
    for k, v in _flat(jax.device_get(state.frozen)).items():  # unchanged: the base as stored at step 0
        np.testing.assert_array_equal(v, base[k] if v.ndim < 2 else jnp.asarray(base[k]).astype(jnp.bfloat16), err_msg=k)
    assert np.abs(np.asarray(layer["mlp"]["down_proj"]["lora_b"])).max() > 0
    model = checkpoint.restore_model(tmp_path / "run")  # the base rounded as the run stored it
    np.testing.assert_array_equal(model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"],
                                  np.asarray(jax.device_get(frozen["self_attn"]["q_proj"]["kernel"]), np.float32))
    adapter = export.export_model(model, tmp_path / "peft", "peft")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_modules"] == r"(?:layers\.\d+\.mlp\.down_proj|layers\.\d+\.self_attn\.o_proj|layers\.\d+\.self_attn\.q_proj)"


def test_gradient_caching_differentiates_the_adapters_alone():
    """The cached step's LoRA gradient (the base a fourth, undifferentiated argument) equals plain backprop's."""
    from bixse_jax import grad_cache, parallel, step
    config = architectures.with_lora(FAMILIES["bert"][0], lora.LoraSpec(2, 4.0, targets=("query", "value")))
    adapters, base = lora.split(jax.device_get(architectures.init_params(config, jax.random.key(3))))
    adapters = jax.tree.map(lambda x: x + 0.1 if x.shape[0] == 2 else x, adapters)  # B non-zero: A has a gradient
    params = {"encoder": adapters, "log_temperature": jnp.float32(2.3), "bias": jnp.float32(-3.0)}
    encoder, loss_cfg, mesh = SentenceEncoder(config), base_config().loss, parallel.make_mesh(-1, 1)
    loss_cfg.follow_logit_params = "adam"  # t, b's gradients compared too (a refit gives them none)
    rng = np.random.default_rng(0)
    batch = {"query_input_ids": rng.integers(1, 64, (16, 6)), "doc_input_ids": rng.integers(1, 64, (16, 10)),
             "query_ids": np.arange(16) % 5, "doc_ids": np.arange(16), "grades": rng.uniform(size=16).astype(np.float32)}
    batch.update(query_attention_mask=np.ones((16, 6), np.int32), doc_attention_mask=np.ones((16, 10), np.int32))
    batch = parallel.global_batch(batch, mesh)
    plain = step.make_loss_fn(encoder, loss_cfg, mesh, use_dropout=False)
    cached = grad_cache.make_cached_loss_fn(step.make_embed_fn(encoder, False), step.make_objective(loss_cfg, mesh),
                                            chunk=8, mesh=mesh)
    grad = lambda fn: jax.jit(jax.grad(lambda p, f: fn(p, batch, jax.random.key(0), f)[0]))(params, base)
    want, got = grad(plain), grad(cached)
    assert jax.tree.structure(got) == jax.tree.structure(params)  # the adapters and t, b: nothing of the base
    assert np.abs(np.asarray(want["encoder"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]["lora_a"])).max() > 0
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["qwen2", "modernbert"])
def test_peft_folder_loads_onto_decoder_and_modernbert_bases(case, tmp_path):
    """PEFT's module names for the other families: AutoModel's (LlamaModel / Qwen2Model have no `model.`)."""
    peft = _peft()
    import dataclasses
    import transformers
    from test_decoder_export import TEXTS as WORD_TEXTS, _folder
    from bixse_jax.models.sentence_model import with_adapters
    if case == "modernbert":
        from test_modernbert import _folder as modernbert_folder
        base_dir = modernbert_folder("masked_lm", tmp_path / case)
        targets = ("Wqkv", "mlp.Wo")
    else:
        base_dir, targets = _folder(tmp_path, case), ("q_proj", "v_proj", "up_proj")
    model = with_adapters(bixse_jax.load_encoder(base_dir), lora.LoraSpec(3, 5.0, targets=targets), seed=1)
    model = dataclasses.replace(model, params=jax.tree_util.tree_map_with_path(  # B non-zero, as after training
        lambda path, x: x + 0.03 if path[-1].key == "lora_b" else x, model.params))
    out = export.export_model(model, tmp_path / "peft", "peft")
    on_base = peft.PeftModel.from_pretrained(transformers.AutoModel.from_pretrained(str(base_dir)), str(out)).eval()
    assert len([n for n, _ in on_base.named_modules() if n.endswith(".lora_A")]) == model.config.num_hidden_layers * len(targets)
    want = bixse_jax.encode(model, WORD_TEXTS)
    assert np.abs(want - bixse_jax.encode(bixse_jax.load_encoder(base_dir), WORD_TEXTS)).max() > 1e-4
    np.testing.assert_allclose(_peft_embed(on_base, model, WORD_TEXTS), want, atol=1e-5)


def _peft_embed(peft_model, model, texts):
    """The PEFT model on bixse-jax's own token ids (right-padded), pooled and normalised as `model` is."""
    import torch
    ids = model.tokenizer.encode(texts, 64)
    n = max(len(x) for x in ids)
    mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids])
    batch = torch.tensor([list(x) + [model.tokenizer.pad_id] * (n - len(x)) for x in ids])
    with torch.no_grad():
        hidden = peft_model(input_ids=batch, attention_mask=mask).last_hidden_state
    if model.settings.pooling == "mean":
        m = mask[..., None].to(hidden.dtype)
        out = ((hidden * m).sum(1) / m.sum(1)).numpy()
    else:
        out = hidden[torch.arange(len(texts)), mask.sum(1) - 1].numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _peft():
    """peft, which the test extra installs: a skip on a developer's machine without it, a failure in CI."""
    try:
        import peft
    except ImportError:
        skip_unless_ci("peft is not installed (pip install peft)")
    return peft
