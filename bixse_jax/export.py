"""Trained models out to the libraries people serve with, and such folders back in.

  export_checkpoint(workdir, out, fmt)   a training run's checkpoint -> a model folder
  export_model(model, out, fmt)          any loaded model (e.g. zero-shot MiniLM) -> a model folder
  load_encoder(path)                     HF / sentence-transformers / exported folder -> SentenceModel
  encode(model, texts, query=...)        -> [N, H] embeddings, as in training and evaluation
  predict_relevance(model, qs, ds)       -> calibrated sigmoid(exp(t) * cos + b) with the learned t, b

Formats (`fmt`):
  hf-flax                config.json, flax_model.msgpack (above `max_shard_size`: shards plus
                         flax_model.msgpack.index.json), tokenizer files: transformers 4.x
                         `FlaxBertModel.from_pretrained(out)` (also Roberta / XLMRoberta).
  sentence-transformers  config.json, model.safetensors (PyTorch names), tokenizer files, modules.json,
                         sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/,
                         2_Normalize/ (if normalised): `SentenceTransformer(out)`.
Both add bixse.json (pooling, normalisation, query prompt, lengths, learned t and b, provenance), so
`load_encoder` gets back everything `encode` and `predict_relevance` need.

A folder is written into a hidden sibling and renamed into place when complete: a failed export
leaves nothing half-written, and `overwrite` replaces an old export only once the new one is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil
import uuid
from typing import Any, Iterator, Sequence

import numpy as np

from bixse_jax.data.batching import Tokenizer
from bixse_jax.models import hf_io
from bixse_jax.models.bert import EncoderConfig, param_shapes
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.models.pooling import POOLING_MODES

FORMATS = ("hf-flax", "sentence-transformers")
SIDECAR_NAME = "bixse.json"
# Every file a HF tokenizer of the BERT / RoBERTa / XLM-R families may need; those present are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")
_ARCHITECTURES = {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}
# The pre-v3 module names: every sentence-transformers release (2.x to 6.x) resolves them.
_ST_MODULE = "sentence_transformers.models."
_POOLER_SEED = 0


class ExportError(ValueError):
    """An export that cannot be made: no checkpoint, a bad target folder, an unknown format."""


@dataclasses.dataclass
class SentenceModel:
    """A sentence encoder ready to use or export: weights, tokenizer, pooling, and the learned t, b.

    `settings` are the effective ones (pooling and normalisation match `encoder`); the lengths
    are a training run's (None for a model that was never trained here, which then uses
    `settings.max_seq_length`). `log_temperature` / `bias` are None without a bixse.json.
    """

    encoder: SentenceEncoder
    params: dict  # float32 numpy, HF Flax layout, no pooler
    tokenizer: Tokenizer
    model_dir: pathlib.Path  # where the tokenizer files (and the HF pooler head) come from
    settings: hf_io.SentenceSettings
    log_temperature: float | None = None
    bias: float | None = None
    query_max_len: int | None = None
    doc_max_len: int | None = None
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def config(self) -> EncoderConfig:
        return self.encoder.config


# --- import --------------------------------------------------------------------------------------

def load_encoder(name_or_path: str | os.PathLike, *, pooling: str | None = None, normalize: bool | None = None,
                 query_prompt: str | None = None, **config_overrides: Any) -> SentenceModel:
    """Any HF / sentence-transformers folder, a bixse-jax export (hf-flax or sentence-transformers),
    or a hub name (fetched only where a network is), as a SentenceModel.

    Pooling, normalisation and the query prompt come from, in this order: the arguments, the
    folder's bixse.json, its sentence-transformers modules, the defaults (mean, normalised, none).
    `config_overrides` (dtype, remat, attention_impl, hidden_dropout_prob) go to the EncoderConfig.
    """
    config, params, model_dir = hf_io.load_pretrained(name_or_path, **config_overrides)
    settings = hf_io.read_sentence_settings(model_dir)
    sidecar = read_sidecar(model_dir)
    if sidecar:
        settings = dataclasses.replace(settings, pooling=sidecar["pooling"], normalize=sidecar["normalize"],
                                       query_prompt=sidecar["query_prompt"],
                                       max_seq_length=settings.max_seq_length or sidecar["doc_max_len"])
    overrides = {"pooling": pooling, "normalize": normalize, "query_prompt": query_prompt}
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    tokenizer = Tokenizer.from_model_dir(model_dir)
    tokenizer.check_vocab(config.vocab_size, source=str(model_dir))
    return SentenceModel(
        encoder=SentenceEncoder(config, pooling=settings.pooling, normalize=bool(settings.normalize)),
        params=params, tokenizer=tokenizer, model_dir=model_dir, settings=settings,
        log_temperature=sidecar.get("log_temperature"), bias=sidecar.get("bias"),
        query_max_len=sidecar.get("query_max_len"), doc_max_len=sidecar.get("doc_max_len"),
        source={"model": str(name_or_path)})


def read_sidecar(model_dir: pathlib.Path) -> dict[str, Any]:
    """bixse.json of an exported folder, checked field by field; {} when the folder has none."""
    path = pathlib.Path(model_dir) / SIDECAR_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise hf_io.ModelLoadError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise hf_io.ModelLoadError(f"{path}: expected a JSON object")

    def field(name: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
        value = data.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
            raise hf_io.ModelLoadError(f"{path}: field {name!r} must be {'/'.join(k.__name__ for k in kinds)}"
                                       f"{' or null' if optional else ''}, got {value!r}")
        return value

    out = {"pooling": field("pooling", (str,)), "normalize": field("normalize", (bool,)),
           "query_prompt": field("query_prompt", (str,)),
           "query_max_len": field("query_max_len", (int,), optional=True),
           "doc_max_len": field("doc_max_len", (int,), optional=True),
           "log_temperature": field("log_temperature", (int, float), optional=True),
           "bias": field("bias", (int, float), optional=True)}
    if out["pooling"] not in POOLING_MODES:
        raise hf_io.ModelLoadError(f"{path}: field 'pooling' must be one of {POOLING_MODES}, got {out['pooling']!r}")
    return out


# --- use -----------------------------------------------------------------------------------------

def position_limit(model: SentenceModel) -> int:
    """Most tokens a text can have: the position table's size past its offset (RoBERTa's padding)."""
    return model.config.max_position_embeddings - model.config.position_offset


def max_length(model: SentenceModel, *, query: bool) -> int:
    """Token limit for queries or documents: the run's, else the folder's, else the position table's."""
    limit = position_limit(model)
    chosen = model.query_max_len if query else model.doc_max_len
    return min(chosen or model.settings.max_seq_length or limit, limit)


def encode(model: SentenceModel, texts: Sequence[str], *, query: bool = False, batch_size: int = 64,
           max_len: int | None = None, show_progress: bool = False) -> np.ndarray:
    """[N, H] float32 embeddings; `query=True` prepends the query prompt and uses the query length."""
    from bixse_jax.eval.encode import encode_texts
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    limit = model.config.max_position_embeddings - model.config.position_offset
    if max_len is not None and not 1 <= max_len <= limit:
        raise ValueError(f"max_len {max_len} must be between 1 and the model's {limit} positions")
    return encode_texts(model.encoder, model.params, model.tokenizer, list(texts),
                        max_len=max_len or max_length(model, query=query), batch_size=batch_size,
                        prefix=model.settings.query_prompt if query else "", show_progress=show_progress)


def predict_relevance(model: SentenceModel, queries: Sequence[str], docs: Sequence[str], *, matrix: bool = False,
                      batch_size: int = 64, log_temperature: float | None = None,
                      bias: float | None = None) -> np.ndarray:
    """Calibrated relevance probabilities sigmoid(exp(t) * score + b), score as in training.

    Pairwise ([N]: queries[i] with docs[i]) or, with `matrix=True`, every query against every
    document ([Q, D]). The score is the dot product of the embeddings, i.e. the cosine for a
    normalised model, which is what t and b were learned on; t and b are the model's own
    (from bixse.json) unless given.
    """
    t = model.log_temperature if log_temperature is None else log_temperature
    b = model.bias if bias is None else bias
    if t is None or b is None:
        raise ValueError(f"{model.model_dir}: the model has no learned t and b (no {SIDECAR_NAME}); "
                         "pass log_temperature= and bias=")
    if not matrix and len(queries) != len(docs):
        raise ValueError(f"pairwise relevance needs as many documents as queries, got {len(queries)} "
                         f"and {len(docs)}; pass matrix=True for every query against every document")
    q = encode(model, queries, query=True, batch_size=batch_size).astype(np.float64)
    d = encode(model, docs, batch_size=batch_size).astype(np.float64)
    scores = q @ d.T if matrix else np.sum(q * d, axis=1)
    logits = math.exp(t) * scores + b
    return (0.5 * (1.0 + np.tanh(0.5 * logits))).astype(np.float32)  # sigmoid, without overflow


# --- checkpoints ---------------------------------------------------------------------------------

def read_run_config(workdir: str | os.PathLike) -> dict[str, Any]:
    """WORKDIR/config.json, the run's config as written at its first start."""
    path = _workdir_path(workdir) / "config.json"
    if not path.exists():
        raise ExportError(f"{path}: not found; is {workdir} a bixse-jax training workdir?")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: cannot read JSON: {e}") from e
    for section, key in (("model", "name_or_path"), ("data", "query_max_len"), ("data", "doc_max_len")):
        if key not in (cfg.get(section) or {}):
            raise ExportError(f"{path}: field '{section}.{key}' is missing")
    return cfg


def restore_checkpoint(workdir: str | os.PathLike, step: int | None = None) -> SentenceModel:
    """The encoder, t and b of a run's checkpoint (newest, or `step`), with the run's settings.

    Only the "params" subtree of the saved TrainState is read (Orbax partial restore, to numpy):
    the optimiser state's layout never matters, and any device count can read any checkpoint.
    The target's shapes come from the run's base model (model.name_or_path), whose folder also
    provides the tokenizer and config.json of the export.
    """
    import orbax.checkpoint as ocp

    root = _workdir_path(workdir)
    cfg = read_run_config(root)
    model_cfg = cfg["model"]
    try:
        base = load_encoder(model_cfg["name_or_path"], pooling=model_cfg.get("pooling"),
                            normalize=model_cfg.get("normalize"), query_prompt=model_cfg.get("query_prefix") or "")
    except (hf_io.ModelLoadError, FileNotFoundError, ValueError) as e:
        raise ExportError(f"{root / 'config.json'}: the run's base model (model.name_or_path) cannot be "
                          f"loaded: {e}") from e
    if not (root / "checkpoints").exists():
        raise ExportError(f"{root / 'checkpoints'}: no checkpoint to export (has the run saved one yet?)")
    manager = ocp.CheckpointManager(
        root / "checkpoints",
        options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
    try:
        restored, step = _restore_params(manager, root, base, model_cfg["name_or_path"], step)
    finally:
        manager.close()
    params = restored.state["params"]
    encoder_params = {k: _float32_tree(v) for k, v in params["encoder"].items()}
    return dataclasses.replace(
        base, params=encoder_params,
        settings=dataclasses.replace(base.settings, max_seq_length=int(cfg["data"]["doc_max_len"])),
        log_temperature=float(np.float32(params["log_temperature"])), bias=float(np.float32(params["bias"])),
        query_max_len=int(cfg["data"]["query_max_len"]), doc_max_len=int(cfg["data"]["doc_max_len"]),
        source={"workdir": str(root), "step": int(step), "base_model": model_cfg["name_or_path"],
                "loss": (cfg.get("loss") or {}).get("name")})


def _restore_params(manager, root, base: SentenceModel, base_name: str, step: int | None):
    """(restored Composite with state.params only, step): metadata checked against the base model first."""
    import orbax.checkpoint as ocp
    from flax import traverse_util

    steps = sorted(manager.all_steps())
    if not steps:
        raise ExportError(f"{root / 'checkpoints'}: no checkpoint to export (has the run saved one yet?)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ExportError(f"{root / 'checkpoints'}: no checkpoint of step {step}; there are steps {steps}")
    where = root / "checkpoints" / str(step)

    expected = traverse_util.flatten_dict(param_shapes(base.config))
    try:
        saved = manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
        saved_encoder = traverse_util.flatten_dict(saved["encoder"])
        _ = saved["log_temperature"], saved["bias"]
    except Exception as e:
        raise ExportError(f"{where}: cannot read the checkpoint's parameter metadata "
                          f"({type(e).__name__}: {e}); is it a bixse-jax train state?") from e
    wrong = sorted(f"{'/'.join(k)}: checkpoint {tuple(saved_encoder[k].shape) if k in saved_encoder else 'absent'}, "
                   f"model {expected[k].shape}" for k in expected
                   if k not in saved_encoder or tuple(saved_encoder[k].shape) != expected[k].shape)
    extra = sorted("/".join(k) for k in saved_encoder.keys() - expected.keys())
    if wrong or extra:
        raise ExportError(f"{where}: the checkpoint's encoder does not match the base model "
                          f"{base_name} ({base.config.model_type}); " + "; ".join(wrong[:10] + extra[:10]))

    as_numpy = lambda tree: {k: as_numpy(v) if isinstance(v, dict) else ocp.RestoreArgs(restore_type=np.ndarray)
                             for k, v in tree.items()}
    item = {"params": {"encoder": _zeros(expected), "log_temperature": np.float32(0), "bias": np.float32(0)}}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=as_numpy(item), partial_restore=True)))
    except Exception as e:
        raise ExportError(f"{where}: cannot be restored ({type(e).__name__}: {e}); other steps: "
                          f"{[s for s in steps if s != step]}") from e
    return restored, step


def _zeros(flat_shapes: dict[tuple[str, ...], Any]) -> dict:
    """A nested tree of zero numpy arrays of the given shapes: an Orbax restore target."""
    from flax import traverse_util
    return traverse_util.unflatten_dict({k: np.zeros(v.shape, v.dtype) for k, v in flat_shapes.items()})


def _float32_tree(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _float32_tree(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float32)


def _workdir_path(workdir: str | os.PathLike):
    """A local folder as an absolute path; gs:// and other URLs through etils.epath, as train does."""
    text = os.fspath(workdir)
    if "://" in text:
        from etils import epath
        return epath.Path(text)
    return pathlib.Path(text).absolute()


# --- export --------------------------------------------------------------------------------------

def export_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike, fmt: str, *, step: int | None = None,
                      overwrite: bool = False, max_shard_size: int | str = "10GB") -> pathlib.Path:
    """Restores a run's checkpoint (newest or `step`) and exports it as `fmt` into `out`."""
    _check_format(fmt)
    _check_target(pathlib.Path(out), overwrite)  # before the (slow) restore
    model = restore_checkpoint(workdir, step)
    return export_model(model, out, fmt, overwrite=overwrite, max_shard_size=max_shard_size)


def export_model(model: SentenceModel, out: str | os.PathLike, fmt: str, *, overwrite: bool = False,
                 max_shard_size: int | str = "10GB") -> pathlib.Path:
    """Writes `model` as a `fmt` folder at `out` (see the module docstring for the files)."""
    _check_format(fmt)
    if model.config.model_type not in _ARCHITECTURES:
        raise ExportError(f"model_type {model.config.model_type!r} cannot be exported; "
                          f"supported: {sorted(_ARCHITECTURES)}")
    out = pathlib.Path(out).absolute()
    _check_target(out, overwrite)
    protected = [pathlib.Path(model.model_dir).absolute()]
    if model.source.get("workdir") and "://" not in model.source["workdir"]:
        protected.append(pathlib.Path(model.source["workdir"]))
    for path in protected:
        if out == path or out in path.parents:
            raise ExportError(f"{out}: would replace {path}, which the export reads from; choose another --out")
    hf_io.parse_size(max_shard_size)  # a bad size fails before anything is written
    pooler, pooler_origin = _pooler(model)
    with _staged_folder(out) as tmp:
        _write_json(tmp / "config.json", _hf_config(model))
        if fmt == "hf-flax":
            hf_io.save_flax_weights(tmp, {**model.params, "pooler": pooler}, max_shard_size)
        else:
            hf_io.save_torch_weights(tmp, {**model.params, "pooler": pooler})
            _write_sentence_transformers_files(tmp, model)
        _copy_tokenizer(model.model_dir, tmp)
        _write_json(tmp / SIDECAR_NAME, _sidecar(model, fmt, pooler_origin))
    return out


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_target(out: pathlib.Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out}: folder exists and is not empty; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def _staged_folder(out: pathlib.Path) -> Iterator[pathlib.Path]:
    """Yields a hidden sibling folder to write into; on success it becomes `out` (replacing it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pooler(model: SentenceModel) -> tuple[dict, str]:
    """HF's pooler head: the source folder's own if it has one, else a seeded random one (HF's init)."""
    hidden = model.config.hidden_size
    pooler = hf_io.read_pooler(pathlib.Path(model.model_dir))
    if pooler is not None and pooler["dense"]["kernel"].shape == (hidden, hidden):
        return pooler, "pretrained"
    std = float(_source_hf_config(model).get("initializer_range", 0.02))
    kernel = np.random.default_rng(_POOLER_SEED).normal(0.0, std, (hidden, hidden)).astype(np.float32)
    return ({"dense": {"kernel": kernel, "bias": np.zeros(hidden, np.float32)}},
            f"random: normal(0, {std}) with seed {_POOLER_SEED}; unused by sentence embeddings")


def _source_hf_config(model: SentenceModel) -> dict[str, Any]:
    path = pathlib.Path(model.model_dir) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read the source model's config: {e}") from e
    return data if isinstance(data, dict) else {}


def _hf_config(model: SentenceModel) -> dict[str, Any]:
    """The source config.json (keeping fields HF uses and we don't), with our architecture fields."""
    hf = {k: v for k, v in _source_hf_config(model).items() if k not in ("_name_or_path", "transformers_version")}
    hf.update(model.config.to_hf_dict())
    hf["architectures"] = [_ARCHITECTURES[model.config.model_type]]
    hf["torch_dtype"] = "float32"
    return dict(sorted(hf.items()))


def _write_sentence_transformers_files(tmp: pathlib.Path, model: SentenceModel) -> None:
    settings = model.settings
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_MODULE + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_MODULE + "Pooling"}]
    if settings.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_MODULE + "Normalize"})
    _write_json(tmp / "modules.json", modules)
    _write_json(tmp / "sentence_bert_config.json",
                {"max_seq_length": max_length(model, query=False), "do_lower_case": False})
    _write_json(tmp / "config_sentence_transformers.json", {
        "prompts": {"query": settings.query_prompt} if settings.query_prompt else {},
        "default_prompt_name": None,
        # What training scored with: the cosine when normalised, else the raw dot product.
        "similarity_fn_name": "cosine" if settings.normalize else "dot",
        "model_type": "SentenceTransformer"})
    (tmp / "1_Pooling").mkdir()
    _write_json(tmp / "1_Pooling" / "config.json", {
        "word_embedding_dimension": model.config.hidden_size,
        "pooling_mode_cls_token": settings.pooling == "cls",
        "pooling_mode_mean_tokens": settings.pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": settings.pooling == "last",
        "include_prompt": True})  # bixse-jax pools over the prompt's tokens too
    if settings.normalize:
        (tmp / "2_Normalize").mkdir()
        _write_json(tmp / "2_Normalize" / "config.json", {})


def _copy_tokenizer(source: pathlib.Path, tmp: pathlib.Path) -> list[str]:
    copied = [name for name in TOKENIZER_FILES if (pathlib.Path(source) / name).is_file()]
    if not {"tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model"} & set(copied):
        raise ExportError(f"{source}: no tokenizer files to copy (expected tokenizer.json or vocab.txt)")
    for name in copied:
        shutil.copyfile(pathlib.Path(source) / name, tmp / name)
    return copied


def _sidecar(model: SentenceModel, fmt: str, pooler_origin: str) -> dict[str, Any]:
    from bixse_jax import __version__
    t, b = model.log_temperature, model.bias
    return {
        "bixse_jax_version": __version__,
        "format": fmt,
        "pooling": model.settings.pooling,
        "normalize": bool(model.settings.normalize),
        "query_prompt": model.settings.query_prompt,
        "query_max_len": model.query_max_len if model.query_max_len else max_length(model, query=True),
        "doc_max_len": model.doc_max_len if model.doc_max_len else max_length(model, query=False),
        "log_temperature": t,
        "bias": b,
        "relevance": "sigmoid(exp(log_temperature) * cos(query, doc) + bias)" if t is not None else None,
        "pooler": pooler_origin,
        "source": model.source,
    }


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
