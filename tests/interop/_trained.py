"""A tiny BiXSE run for the export tests: a few steps on a generated JSONL, eval off."""

from __future__ import annotations

import json
import pathlib

import numpy as np

QUERY_PREFIX = "query: "
TEXTS = ["red cat runs fast", "blue dog sleeps", "a much longer sentence about small dogs that sleep all day in the sun",
         "x", "Big slow cats, and fast small dogs!"]


def pairs_jsonl(path: pathlib.Path, n: int = 32) -> pathlib.Path:
    """Graded pairs over a small vocabulary, with repeated query and document ids."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "runs", "sleeps", "fast", "slow", "big", "small"]
    with open(path, "w") as f:
        for i in range(n):
            q, d = i % 8, int(rng.integers(0, 12))
            f.write(json.dumps({"query": f"{words[q]} {words[(q + 3) % 10]} question",
                                "document": " ".join(words[(d + k) % 10] for k in range(d % 5 + 2)),
                                "score": round(float(rng.uniform()), 3), "query_id": f"q{q}", "doc_id": f"d{d}"}) + "\n")
    return path


def run_config(model_dir: pathlib.Path, data: pathlib.Path, *, devices: int = -1, steps: int = 3):
    from bixse_jax.default_config import base_config
    c = base_config()
    c.model.name_or_path = str(model_dir)
    c.model.dropout = 0.0
    c.model.query_prefix = QUERY_PREFIX
    c.data.kind = "jsonl"
    c.data.path = str(data)
    c.data.query_max_len = 16
    c.data.doc_max_len = 24
    c.train.global_batch_size = 16
    c.train.num_steps = steps
    c.train.warmup_steps = 1
    c.train.learning_rate = 1e-3
    c.train.log_every = steps
    c.train.checkpoint_every = steps
    c.train.async_checkpoints = False
    c.mesh.data = devices
    return c


def train_tiny(model_dir: pathlib.Path, root: pathlib.Path, *, devices: int = -1, steps: int = 3):
    """(workdir, final TrainState) of a `steps`-step run on `devices` devices (-1: all)."""
    from bixse_jax import train
    root.mkdir(parents=True, exist_ok=True)
    data = pairs_jsonl(root / "pairs.jsonl")
    workdir = root / "run"
    _, state = train.train(run_config(model_dir, data, devices=devices, steps=steps), workdir, show_progress=False)
    return workdir, state


def tiny_folder(root: pathlib.Path, model_type: str, tokenizer_dir: pathlib.Path) -> pathlib.Path:
    """A tiny random BERT / RoBERTa / XLM-R HF folder, with the (WordPiece) tokenizer of `tokenizer_dir`.

    RoBERTa-style position ids (counted from pad_token_id + 1) are what such a folder exercises;
    the tokenizer only has to match the vocabulary size.
    """
    import shutil

    import jax

    from bixse_jax.models.bert import EncoderConfig, init_params
    from bixse_jax.models.hf_io import save_pretrained

    config = EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, type_vocab_size=1,
                           hidden_dropout_prob=0.0, model_type=model_type,
                           pad_token_id=0 if model_type == "bert" else 1, layer_norm_eps=1e-5)
    out = root / model_type
    save_pretrained(out, config, jax.device_get(init_params(config, jax.random.key(1))))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out
