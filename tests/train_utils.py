"""Shared by the training tests: a small graded-pair file and a tiny-model config."""

import json
import pathlib

import numpy as np

from bixse_jax.default_config import base_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def pairs_jsonl(path: pathlib.Path, n: int = 48) -> pathlib.Path:
    """Graded pairs where queries and documents repeat, so duplicate ids meet in batches."""
    rng = np.random.default_rng(0)
    words = ["red", "blue", "cat", "dog", "runs", "sleeps", "fast", "slow", "big", "small"]
    with open(path, "w") as f:
        for i in range(n):
            q = i % 10
            d = int(rng.integers(0, 20))
            f.write(json.dumps({"query": f"{words[q]} {words[(q + 3) % 10]} question",
                                "document": " ".join(words[(d + k) % 10] for k in range(d % 5 + 2)),
                                "score": round(float(rng.uniform()), 3),
                                "query_id": f"q{q}", "doc_id": f"d{d}"}) + "\n")
    return path


def tiny_config(tiny_model_dir, data_path, **train_overrides):
    c = base_config()
    c.model.name_or_path = str(tiny_model_dir)
    c.model.dropout = 0.0
    c.data.kind = "jsonl"
    c.data.path = str(data_path)
    c.data.query_max_len = 16
    c.data.doc_max_len = 16
    c.train.global_batch_size = 16
    c.train.num_steps = 12
    c.train.warmup_steps = 2
    c.train.learning_rate = 1e-3
    c.train.log_every = 3
    c.train.checkpoint_every = 6
    c.update_from_flattened_dict({f"train.{k}": v for k, v in train_overrides.items()})
    return c


def cli_overrides(tiny_model_dir, data_path, **overrides) -> list[str]:
    """`bixse-jax train` flags for the same tiny run as `tiny_config`."""
    flat = {"model.name_or_path": tiny_model_dir, "model.dropout": 0.0, "data.kind": "jsonl",
            "data.path": data_path, "data.query_max_len": 16, "data.doc_max_len": 16,
            "train.global_batch_size": 16, "train.warmup_steps": 2, "train.learning_rate": 1e-3,
            "evals.demo.kind": "none", **overrides}
    return ["--config", str(REPO / "configs" / "demo.py")] + [f"--config.{k}={v}" for k, v in flat.items()]


def logged(workdir: pathlib.Path, key: str = "loss") -> list:
    """`key` of every metrics.jsonl row that has it (row 0 of a fresh start holds only the fitted t, b)."""
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return [r[key] for r in rows if key in r]


def flat_params(state) -> list[np.ndarray]:
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def adamw_reference(params, grads_seq, train_cfg, lrs):
    """The parameters after len(grads_seq) AdamW steps, in float64 numpy, written from the formula.

    Not optax: m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, mhat = m / (1 - b1^k),
    vhat = v / (1 - b2^k), p -= rate * (mhat / (sqrt(vhat) + eps) + wd * p [decayed leaves only]).
    The encoder's gradients are first scaled to at most `grad_clip_norm` by their own global norm;
    t and b (every top-level key but "encoder") are never clipped or decayed and step at
    `logit_params_lr` (constant: the tests' schedules have no warm-up). Decayed: the encoder's matrices and embedding
    tables (ndim >= 2), never its biases or LayerNorm. `lrs[k]` is the schedule's rate at step k.
    """
    import jax

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    encoder = [path[0].key == "encoder" for path, _ in flat]
    p = [np.asarray(x, np.float64) for _, x in flat]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    b1, b2, eps, wd = train_cfg.adam_b1, train_cfg.adam_b2, train_cfg.adam_eps, train_cfg.weight_decay
    for k, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
        if train_cfg.grad_clip_norm:
            norm = np.sqrt(sum(np.sum(gi ** 2) for gi, enc in zip(g, encoder) if enc))
            scale = min(1.0, train_cfg.grad_clip_norm / norm)
            g = [gi * scale if enc else gi for gi, enc in zip(g, encoder)]
        for i, enc in enumerate(encoder):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mhat, vhat = m[i] / (1 - b1 ** k), v[i] / (1 - b2 ** k)
            rate = lr if enc else train_cfg.logit_params_lr
            decay = wd * p[i] if enc and p[i].ndim >= 2 else 0.0
            p[i] = p[i] - rate * (mhat / (np.sqrt(vhat) + eps) + decay)
    return jax.tree.unflatten(treedef, p)
