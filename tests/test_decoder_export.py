"""Decoder exports (llama, qwen2, qwen3) read by sentence-transformers and transformers' AutoModel (PyTorch,
float32) embed as bixse-jax does, within 1e-5; hf-flax and bidirectional decoders are refused."""

import json

import numpy as np
import pytest

import bixse_jax
from bixse_jax import export

from conftest import skip_unless_ci

try:
    import sentence_transformers
    import torch
    import transformers
except ImportError:
    skip_unless_ci("torch, transformers and sentence-transformers are needed (pip install -e .[test])")

from test_decoders import WORDS, _write_model  # noqa: E402

TOLERANCE = 1e-5
TEXTS = ["red cat runs fast", "blue dog", "a big slow cat sleeps and a small fast dog runs", "x",
         "question red blue cat dog runs sleeps"]


def _folder(root, case):
    """A tiny random decoder as transformers writes it. Llama: a word-level tokenizer that adds <s> and has
    no pad token. Qwen: a byte-level BPE with Qwen's split (trained here on a few words), because
    transformers 5 loads a qwen2/qwen3 folder's tokenizer.json as its own Qwen2Tokenizer."""
    import tokenizers
    out = root / case
    _write_model(case, out)
    if case.startswith("qwen"):
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        split = tokenizers.Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(split, behavior="isolated", invert=False),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=100, special_tokens=["<|endoftext|>", "<s>", "</s>"])
        tok.train_from_iterator([" ".join(WORDS)] * 4 + TEXTS, trainer)
    else:
        tok = word_tokenizer(["<unk>", "<s>", "</s>"], "<s> $A", "<unk>")
    tok.save(str(out / "tokenizer.json"))
    return out


def word_tokenizer(specials, template, unk):
    """A whitespace word-level tokenizer over WORDS: `specials` take the first ids, `template` is the
    post-processor's single-text template (e.g. "<s> $A"), `unk` (one of `specials`) stands for other words."""
    import tokenizers
    vocab = {**{t: i for i, t in enumerate(specials)}, **{w: i + len(specials) for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
    return tok


def _hf_embed(folder, texts, normalize, pooling="last"):
    """transformers' AutoModel + AutoTokenizer on right-padded texts: the last real token, or the mean."""
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(list(texts), padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 1).all()  # right padding
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if pooling == "mean":
        mask = batch["attention_mask"][..., None].to(hidden.dtype)
        out = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    else:
        out = hidden[torch.arange(len(texts)), batch["attention_mask"].sum(1) - 1].numpy()
    return out / np.linalg.norm(out, axis=1, keepdims=True) if normalize else out


def check_export(out, ours, normalize, name):
    """sentence-transformers and AutoModel on the exported folder embed TEXTS as bixse-jax does."""
    st = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    want = bixse_jax.encode(ours, TEXTS)
    theirs = np.asarray(st.encode(TEXTS, convert_to_numpy=True), np.float32)
    hf = _hf_embed(out, TEXTS, normalize, ours.settings.pooling)
    diffs = {"sentence-transformers": float(np.abs(theirs - want).max()), "AutoModel": float(np.abs(hf - want).max())}
    print(f"[export] {name}: max abs diff {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs
    return st


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3", "llama3_rope"])
def test_decoder_exports_embed_like_bixse(case, tmp_path):
    model = bixse_jax.load_encoder(_folder(tmp_path, case))
    st_out = export.export_model(model, tmp_path / "st", "sentence-transformers")
    pooling = json.loads((st_out / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] and not pooling["pooling_mode_mean_tokens"]
    config = json.loads((st_out / "config.json").read_text())
    arch = {"llama": "LlamaModel", "qwen2": "Qwen2Model", "qwen3": "Qwen3Model"}[config["model_type"]]
    assert config["architectures"] == [arch] and config["dtype"] == "float32"
    st = check_export(st_out, model, True, f"{case} sentence-transformers folder")
    assert type(st[0].auto_model).__name__ == arch
    hf_out = export.export_model(model, tmp_path / "hf", "hf")
    assert not (hf_out / "modules.json").exists()
    hf = _hf_embed(hf_out, TEXTS, True)
    np.testing.assert_allclose(hf, bixse_jax.encode(model, TEXTS), atol=TOLERANCE)
    from safetensors.numpy import load_file
    tensors = load_file(str(hf_out / "model.safetensors"))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, model.params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].T)
    again = bixse_jax.load_encoder(hf_out)  # and bixse-jax reads its own export back
    np.testing.assert_array_equal(bixse_jax.encode(again, TEXTS), bixse_jax.encode(model, TEXTS))


def test_trained_decoder_with_appended_eos_exports(tmp_path):
    from interop._trained import run_config, pairs_jsonl
    from bixse_jax import checkpoint, train
    folder = _folder(tmp_path, "qwen2")
    c = run_config(folder, pairs_jsonl(tmp_path / "pairs.jsonl"), devices=2, steps=2)
    c.model.append_eos = True
    workdir = tmp_path / "run"
    train.train(c, workdir, show_progress=False)
    trained = checkpoint.restore_model(workdir)
    assert trained.tokenizer.append_id == 2
    out = export.export_checkpoint(workdir, tmp_path / "st", "sentence-transformers")
    st = check_export(out, trained, True, "trained qwen2, eos appended")
    ids = st.tokenize(["red cat"])["input_ids"][0].tolist()
    assert ids[-1] == 2 and ids[:-1] == trained.tokenizer.encode(["red cat"], 16)[0][:-1].tolist()
    assert st.prompts.get("query") == trained.settings.query_prompt


def test_hf_flax_and_bidirectional_decoders_are_refused(tmp_path):
    folder = _folder(tmp_path, "llama")
    with pytest.raises(export.ExportError, match="Flax Llama exists in 4.x only"):
        export.export_model(bixse_jax.load_encoder(folder), tmp_path / "flax", "hf-flax")
    with pytest.raises(export.ExportError, match="bidirectional"):
        export.export_model(bixse_jax.load_encoder(folder, bidirectional=True), tmp_path / "bi", "hf")
    assert not (tmp_path / "flax").exists() and not (tmp_path / "bi").exists()


def test_bert_family_hf_format_is_an_automodel_folder(minilm_path, tmp_path):
    """The `hf` format serves BERT-family models too: AutoModel's masked mean equals bixse-jax's."""
    model = bixse_jax.load_encoder(minilm_path)
    out = export.export_model(model, tmp_path / "hf", "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    np.testing.assert_allclose(_hf_embed(out, TEXTS, True, "mean"), bixse_jax.encode(model, TEXTS), atol=TOLERANCE)
