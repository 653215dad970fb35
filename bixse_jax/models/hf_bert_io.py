"""transformers' BERT / RoBERTa / XLM-R tensor names <-> bert.py's parameter tree (HF's Flax layout).

PyTorch checkpoints name tensors `encoder.layer.0.attention.self.query.weight` and store dense
kernels as [out, in]; HF's Flax layout names them `encoder/layer/0/attention/self/query/kernel`
as [in, out], LayerNorm weights `scale` and embedding tables `embedding`. Task models' prefixes
(`bert.`, `roberta.`, ...) are dropped, their heads and the pooler ignored.
"""

from __future__ import annotations

import numpy as np
from flax import traverse_util

# Tensors that exist in HF checkpoints but play no part in a sentence encoder.
_IGNORED_PREFIXES = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_MODEL_PREFIXES = ("bert.", "roberta.", "xlm-roberta.", "model.")


def torch_to_flax(name: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray] | None:
    """One PyTorch tensor -> (HF Flax path, array), or None for tensors a sentence encoder ignores."""
    for prefix in _MODEL_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith(_IGNORED_PREFIXES):
        return None
    *parents, leaf = name.split(".")
    if leaf in ("gamma", "beta"):  # very old BERT checkpoints
        leaf = "weight" if leaf == "gamma" else "bias"
    if leaf == "weight":
        if parents and parents[-1] == "LayerNorm":
            leaf = "scale"
        elif parents and parents[-1].endswith("_embeddings"):
            leaf = "embedding"
        else:
            leaf, array = "kernel", array.T
    return tuple(parents) + (leaf,), array


def flax_to_torch(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `torch_to_flax`: HF Flax tree -> PyTorch tensor names and [out, in] kernels."""
    out = {}
    for path, array in traverse_util.flatten_dict(params).items():
        *parents, leaf = path
        array = np.asarray(array, dtype=np.float32)
        if leaf == "kernel":
            leaf, array = "weight", array.T
        elif leaf in ("scale", "embedding"):
            leaf = "weight"
        out[prefix + ".".join([*parents, leaf])] = np.ascontiguousarray(array)
    return out
