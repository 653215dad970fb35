"""transformers' Llama / Qwen2 / Qwen3 tensor names <-> decoder.py's parameter tree.

`model.layers.0.self_attn.q_proj.weight` ([out, in]) becomes ("model", "layers", "0", "self_attn",
"q_proj", "kernel") ([in, out]); `model.embed_tokens.weight` the embedding table; RMSNorm weights keep
the name `weight`. The LM head (`lm_head.weight`, absent when tied) plays no part in an embedder.
"""

from __future__ import annotations

import numpy as np

_IGNORED = ("lm_head.", "model.rotary_emb.")


def torch_to_flax(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """One PyTorch tensor -> (parameter path, array), or None for tensors an embedder ignores."""
    if name.startswith(_IGNORED):
        return None
    *parents, leaf = name.split(".")
    if leaf == "weight" and parents and parents[-1] == "embed_tokens":
        leaf = "embedding"
    elif leaf == "weight" and parents and parents[-1].endswith("_proj"):
        leaf, array = "kernel", array.T
    return tuple(parents) + (leaf,), array


def flax_to_torch(params: dict) -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: the parameter tree -> transformers' names, [out, in] float32 kernels."""
    from flax import traverse_util
    out = {}
    for path, array in traverse_util.flatten_dict(params).items():
        *parents, leaf = path
        array = np.asarray(array, dtype=np.float32)
        if leaf == "kernel":
            leaf, array = "weight", array.T
        elif leaf == "embedding":
            leaf = "weight"
        out[".".join([*parents, leaf])] = np.ascontiguousarray(array)
    return out
