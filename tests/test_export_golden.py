"""Exported folders byte for byte: a fixed model of each family exports to the same bytes as recorded.

Why: the family records, the loader and the export are being reshaped (issue 24); whatever moves,
a folder users already load must come out the same. Each family's model is built here from a
hand-written config.json and weights on an exact grid (integers / 64, so no floating-point
operation of this CPU decides a bit), then exported in every format it supports. The recorded
digest of each file (GOLDEN) was taken from the code before the reshaping; the bixse-jax version
and this test's temporary paths are replaced by placeholders before hashing, so a release or a
checkout elsewhere does not change them.

To record new digests after a deliberate change of the format: BIXSE_RECORD_GOLDEN=FILE.jsonl pytest
this file appends them to FILE.jsonl instead of comparing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from bixse_jax import __version__, export
from bixse_jax.models import architectures, hf_io, sentence_model

from test_decoder_export import word_tokenizer

FAMILIES = {
    "bert": ({"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "max_position_embeddings": 128, "type_vocab_size": 2, "hidden_act": "gelu",
              "layer_norm_eps": 1e-12, "pad_token_id": 0}, ("sentence-transformers", "hf", "hf-flax")),
    "llama": ({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128, "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu",
               "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}, ("sentence-transformers", "hf")),
    "qwen3": ({"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128, "hidden_size": 32,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
               "intermediate_size": 64, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
               "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
               "tie_word_embeddings": True}, ("sentence-transformers", "hf")),
    "modernbert": ({"architectures": ["ModernBertModel"], "model_type": "modernbert", "vocab_size": 128,
                    "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
                    "max_position_embeddings": 256, "global_attn_every_n_layers": 3, "local_attention": 8,
                    "pad_token_id": 0, "cls_token_id": 1, "sep_token_id": 2}, ("sentence-transformers", "hf")),
}

GOLDEN: dict[str, dict[str, str]] = {  # "family/format" -> {file: sha256}, recorded 2026-12-03 (AMD EPYC)
    "bert/hf": {
        "README.md": "ce05ba9a20fee3a644240e36b4cc17dc65c375bf6760c6bef086263d09110efe",
        "bixse.json": "c7c961e1f358d3d69e015f3433349a36317a386671f917ccc13f1de3a784f5f5",
        "config.json": "db4a80c046bf228e75be10c82466aa0d2761cbbccaebf28bbd32e012410c444e",
        "model.safetensors": "09dab66f9e3cb5f5c29eb615ab0ec9eb99ed84c5464a480c4a7870765919b2a7",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
    "bert/hf-flax": {
        "README.md": "44c34a4f1707fade31af2a6a4c84bf5557eaa08e56b292f57305bcf87d54813c",
        "bixse.json": "0c6e4530e86d5a9dd1d7dde721eaee0fde5b0a8d99afbba905b973481f9b2d33",
        "config.json": "db4a80c046bf228e75be10c82466aa0d2761cbbccaebf28bbd32e012410c444e",
        "flax_model.msgpack": "f37b41eba23520738b7b8bb640f34cf8c15320ad25961cf7b274d7a67244fb91",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
    "bert/sentence-transformers": {
        "1_Pooling/config.json": "2f14ec28da83bb63d0deea07806d4d6dd8f2caa6701db67c506872ce0b3adb18",
        "2_Normalize/config.json": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356",
        "README.md": "8d3c24c28f253d4acec0a9b22776d1390fc4a5363141219a1a930a6f8326748b",
        "bixse.json": "c1ba28948170f15d2d5c0a2d343a6ab8b779b097767b343c8ad094da00301b51",
        "config.json": "db4a80c046bf228e75be10c82466aa0d2761cbbccaebf28bbd32e012410c444e",
        "config_sentence_transformers.json": "d508134025355be2265fe1c4c502d6a0a154803e2ff6d6a4f8dbd5bec19a2ee7",
        "model.safetensors": "09dab66f9e3cb5f5c29eb615ab0ec9eb99ed84c5464a480c4a7870765919b2a7",
        "modules.json": "21ddb3037a55ebf4549eb5c1dc44c3f28f10b56ec7f1335c92fd90e5b30d88ac",
        "sentence_bert_config.json": "306b181f83b12a6ff272c0f44939e7823d45948050a237ab8e03a989a601f417",
        "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
        "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    },
    "llama/hf": {
        "README.md": "144ea0005e835088500a5e86edaea1c7662759a2c669fd0a18576d90d126ce2a",
        "bixse.json": "ea10015dab6b8f8b2b56eb7a1d7247e08e34037c16a41f383b33b09ef87be77c",
        "config.json": "7b4c78e7c17ce7a5f892fb81b7a1031d745aea1cc4d245f719155a41fb2c5aa5",
        "model.safetensors": "afddb470480f96eb0d32fadd75a07fcf8bdf5dc64937478bdd0965ba78f3251a",
        "tokenizer.json": "e864258b3141a7cfe0083ca94436e324139419055927142c9734c4d769f87e0b",
        "tokenizer_config.json": "a99fbcc91e4d75db1743d1c2b8b16b3f718c8800979849d06bee0e93263d34cd",
    },
    "llama/sentence-transformers": {
        "1_Pooling/config.json": "6d1647f7690c5765eb100596cf3930a7e449385cc6a0e6eb521d8c51dfc8ff13",
        "2_Normalize/config.json": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356",
        "README.md": "408be19dfe71500d2fb4d787fa524e5496fa53b67fec551c36d6c899a3c20d6d",
        "bixse.json": "25e114f7af0aba423e69b71d81cd2464cc069bc24b4b6d5d48b5e82fc0907cdf",
        "config.json": "7b4c78e7c17ce7a5f892fb81b7a1031d745aea1cc4d245f719155a41fb2c5aa5",
        "config_sentence_transformers.json": "d508134025355be2265fe1c4c502d6a0a154803e2ff6d6a4f8dbd5bec19a2ee7",
        "model.safetensors": "afddb470480f96eb0d32fadd75a07fcf8bdf5dc64937478bdd0965ba78f3251a",
        "modules.json": "21ddb3037a55ebf4549eb5c1dc44c3f28f10b56ec7f1335c92fd90e5b30d88ac",
        "sentence_bert_config.json": "306b181f83b12a6ff272c0f44939e7823d45948050a237ab8e03a989a601f417",
        "tokenizer.json": "e864258b3141a7cfe0083ca94436e324139419055927142c9734c4d769f87e0b",
        "tokenizer_config.json": "a99fbcc91e4d75db1743d1c2b8b16b3f718c8800979849d06bee0e93263d34cd",
    },
    "modernbert/hf": {
        "README.md": "7dec4378513634a5aaa26e1503f105cdda30434d74b8fb828392bfdb552f0a4f",
        "bixse.json": "a0efc798cc430cc88c9accbc1f292cb4752bd0d6f2d938296327fe9fd77aefad",
        "config.json": "799d6c0592d8f7b6f78643334c34e49d307c6d987a8a51c9cd8a0ef32be8b494",
        "model.safetensors": "5cfd8bdccc4232296e45216331e1b18bd43deb6a128b85739d94ebc271cd8c08",
        "tokenizer.json": "54292e5788ec112ba28dff82fdb43ffca2662e2b11fa5a087444c72f866b8a6f",
    },
    "modernbert/sentence-transformers": {
        "1_Pooling/config.json": "2f14ec28da83bb63d0deea07806d4d6dd8f2caa6701db67c506872ce0b3adb18",
        "2_Normalize/config.json": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356",
        "README.md": "db0892d08ecd7b5bac5e4a660828f665c5dd0d19341dfb8480c2800843d7dff9",
        "bixse.json": "06fa7bdc67cf72bb99427ff54eeb43888fb6bc7469a77e2b15dcec3273a6484e",
        "config.json": "799d6c0592d8f7b6f78643334c34e49d307c6d987a8a51c9cd8a0ef32be8b494",
        "config_sentence_transformers.json": "d508134025355be2265fe1c4c502d6a0a154803e2ff6d6a4f8dbd5bec19a2ee7",
        "model.safetensors": "5cfd8bdccc4232296e45216331e1b18bd43deb6a128b85739d94ebc271cd8c08",
        "modules.json": "21ddb3037a55ebf4549eb5c1dc44c3f28f10b56ec7f1335c92fd90e5b30d88ac",
        "sentence_bert_config.json": "306b181f83b12a6ff272c0f44939e7823d45948050a237ab8e03a989a601f417",
        "tokenizer.json": "54292e5788ec112ba28dff82fdb43ffca2662e2b11fa5a087444c72f866b8a6f",
    },
    "qwen3/hf": {
        "README.md": "2e4b77d4a8cf9273974223f855e956372087c885052e247c56f1f3f6635320a2",
        "bixse.json": "4c24b4b7ae03a3e319d5dc31f9f71fa3af6fc92e1576004d1e2200644da4817a",
        "config.json": "57f3bda0ab74263ea8a3f07d5f9014149cb212cbdeabffc5cb721a945b9229c3",
        "model.safetensors": "9207da38265d9ccf3109f64489f8c21fc6e2e2a7494acc397efaadfc5b24a9dc",
        "tokenizer.json": "e864258b3141a7cfe0083ca94436e324139419055927142c9734c4d769f87e0b",
        "tokenizer_config.json": "a99fbcc91e4d75db1743d1c2b8b16b3f718c8800979849d06bee0e93263d34cd",
    },
    "qwen3/sentence-transformers": {
        "1_Pooling/config.json": "6d1647f7690c5765eb100596cf3930a7e449385cc6a0e6eb521d8c51dfc8ff13",
        "2_Normalize/config.json": "ca3d163bab055381827226140568f3bef7eaac187cebd76878e0b63e9e442356",
        "README.md": "efb39c703e37f367d4d7c39221bf05a8bdf67740deb71a5d8441922c4916eb80",
        "bixse.json": "e00577e129154c60d7e0fcc62fdebca65d5087ea324cb519103a823555683418",
        "config.json": "57f3bda0ab74263ea8a3f07d5f9014149cb212cbdeabffc5cb721a945b9229c3",
        "config_sentence_transformers.json": "d508134025355be2265fe1c4c502d6a0a154803e2ff6d6a4f8dbd5bec19a2ee7",
        "model.safetensors": "9207da38265d9ccf3109f64489f8c21fc6e2e2a7494acc397efaadfc5b24a9dc",
        "modules.json": "21ddb3037a55ebf4549eb5c1dc44c3f28f10b56ec7f1335c92fd90e5b30d88ac",
        "sentence_bert_config.json": "306b181f83b12a6ff272c0f44939e7823d45948050a237ab8e03a989a601f417",
        "tokenizer.json": "e864258b3141a7cfe0083ca94436e324139419055927142c9734c4d769f87e0b",
        "tokenizer_config.json": "a99fbcc91e4d75db1743d1c2b8b16b3f718c8800979849d06bee0e93263d34cd",
    },
}


def _grid(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return (rng.integers(-32, 33, size=shape) / 64.0).astype(np.float32)  # exact in float32


def _folder(family: str, out: pathlib.Path, minilm_path: pathlib.Path) -> pathlib.Path:
    hf, _ = FAMILIES[family]
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    config = architectures.config_from_hf(hf)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: _grid(s.shape, rng), architectures.param_shapes(config))
    if family == "bert":
        save_file(hf_io.flax_to_torch(params), str(out / "model.safetensors"))
        for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
            (out / name).write_bytes((minilm_path / name).read_bytes())
    else:
        hf_io.save_native_torch_weights(out, params)
        specials = (["[PAD]", "[CLS]", "[SEP]", "[UNK]"], "[CLS] $A [SEP]", "[UNK]") if family == "modernbert" \
            else (["<unk>", "<s>", "</s>"], "<s> $A", "<unk>")
        word_tokenizer(*specials).save(str(out / "tokenizer.json"))
    return out


def _digests(folder: pathlib.Path, placeholders: dict[str, str]) -> dict[str, str]:
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix in (".json", ".md", ".txt"):
            text = data.decode()
            for value, name in placeholders.items():
                text = text.replace(value, name)
            data = text.encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_exported_folders_are_byte_equal_to_the_recorded_ones(family, minilm_path, tmp_path):
    src = _folder(family, tmp_path / "src", minilm_path)
    model = sentence_model.load_encoder(src)
    model = dataclasses.replace(model, log_temperature=1.25, bias=-3.5, query_max_len=16, doc_max_len=24,
                                source={"model": "tiny-" + family})
    placeholders = {str(tmp_path): "<TMP>", json.dumps(str(tmp_path))[1:-1]: "<TMP>", __version__: "<VERSION>"}
    got = {}
    for fmt in FAMILIES[family][1]:
        got[f"{family}/{fmt}"] = _digests(export.export_model(model, tmp_path / fmt, fmt), placeholders)
    if os.environ.get("BIXSE_RECORD_GOLDEN"):
        with open(os.environ["BIXSE_RECORD_GOLDEN"], "a") as f:
            f.write(json.dumps(got, sort_keys=True) + "\n")
        return
    for key, files in got.items():
        assert files == GOLDEN[key], f"{key}: the exported files differ from the recorded ones"
