"""Trained models out to the libraries people serve with: this module only writes folders.

  export_checkpoint(workdir, out, fmt)   a training run's checkpoint -> a model folder
  export_model(model, out, fmt)          any loaded model (e.g. zero-shot MiniLM) -> a model folder

Formats (`fmt`):
  hf-flax                config.json, flax_model.msgpack (above `max_shard_size`: shards plus
                         flax_model.msgpack.index.json), tokenizer files: transformers 4.x
                         `FlaxBertModel.from_pretrained(out)` (also Roberta / XLMRoberta).
  sentence-transformers  config.json, model.safetensors (PyTorch names), tokenizer files, modules.json,
                         sentence_bert_config.json, config_sentence_transformers.json, 1_Pooling/,
                         2_Normalize/ (if normalised): `SentenceTransformer(out)`.
  hf                     config.json, model.safetensors, tokenizer files: `transformers.AutoModel
                         .from_pretrained(out)` (PyTorch); the sentence-transformers folder less its modules.
  peft                   a LoRA model's adapters alone (export_peft.py): adapter_config.json,
                         adapter_model.safetensors, bixse.json: `peft.PeftModel.from_pretrained(base, out)`.
A LoRA model (model.lora.rank > 0) exports to the other formats merged: each adapted kernel W + (alpha / r) A B.
ModernBERT exports as `hf` and `sentence-transformers` only (ModernBertModel, transformers' tensor
names, the source tokenizer, no pooler head: ModernBertModel has none; transformers has no Flax one).
Decoder LLMs (llama, qwen2, qwen3) export as `hf` and `sentence-transformers` (architectures
LlamaModel / Qwen2Model / Qwen3Model, transformers' tensor names, last-token pooling, a tokenizer
that pads on the right with a named pad token, and appends eos if the model was trained with
model.append_eos). `hf-flax` refuses them: transformers' Flax Llama exists in 4.x only (no Flax
Qwen2 / Qwen3; transformers 5 has no Flax). Nor is a model trained with model.bidirectional
exported: transformers would run it causally and embed differently.
All add bixse.json (pooling, normalisation, query prompt, lengths, t, b, Matryoshka dims, provenance) for
`load_encoder`, and README.md, a model card (bixse_jax/model_card.py): a folder the hub's upload command takes as it is.

A folder is written into a hidden sibling and renamed into place when complete (export_folder.py): a failed
export leaves nothing half-written, and `overwrite` replaces an old export only once the new one is done.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np

from bixse_jax import checkpoint, export_peft, model_card
from bixse_jax.export_folder import ExportError, check_target, staged_folder, write_json
from bixse_jax.models import families, hf_io
from bixse_jax.models.sentence_model import SIDECAR_NAME, SentenceModel, max_length, merged

FORMATS = ("hf-flax", "sentence-transformers", "hf", "peft")
# Every file a HF tokenizer of the BERT / RoBERTa / XLM-R families may need; those present are copied.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "sentencepiece.bpe.model", "spiece.model")
# The pre-v3 module names: every sentence-transformers release (2.x to 6.x) resolves them.
_ST_MODULE = "sentence_transformers.models."
_POOLER_SEED = 0


def export_checkpoint(workdir: str | os.PathLike, out: str | os.PathLike, fmt: str, *, step: int | None = None,
                      overwrite: bool = False, max_shard_size: int | str = "10GB") -> pathlib.Path:
    """Restores a run's checkpoint (newest or `step`) and exports it as `fmt` into `out`."""
    _check_format(fmt)
    check_target(pathlib.Path(out), overwrite)  # before the (slow) restore
    model = checkpoint.restore_model(workdir, step)
    return export_model(model, out, fmt, overwrite=overwrite, max_shard_size=max_shard_size)


def export_model(model: SentenceModel, out: str | os.PathLike, fmt: str, *, overwrite: bool = False,
                 max_shard_size: int | str = "10GB") -> pathlib.Path:
    """Writes `model` as a `fmt` folder at `out` (see the module docstring for the files)."""
    _check_format(fmt)
    family = families.of(model.config)
    if model.config.model_type not in family.hf_architectures:
        exportable = [t for f in families.registered() for t in f.hf_architectures]
        raise ExportError(f"model_type {model.config.model_type!r} cannot be exported; "
                          f"supported: {sorted(exportable)}")
    out = pathlib.Path(out).absolute()
    check_target(out, overwrite)
    protected = [pathlib.Path(model.model_dir).absolute()]
    if model.source.get("workdir") and "://" not in model.source["workdir"]:
        protected.append(pathlib.Path(model.source["workdir"]))
    for path in protected:
        if out == path or out in path.parents:
            raise ExportError(f"{out}: would replace {path}, which the export reads from; choose another --out")
    hf_io.parse_size(max_shard_size)  # a bad size fails before anything is written
    if fmt == "peft":  # the adapters alone, for peft over the base (export_peft.py), and bixse.json
        export_peft.check(model)
        with staged_folder(out) as tmp:
            export_peft.write(tmp, model)
            write_json(tmp / SIDECAR_NAME, _sidecar(model, fmt, "none (LoRA adapters)"))
        return out
    model = merged(model)  # LoRA: full weights W + (alpha / r) A B, as the libraries load them
    _check_family_export(model, family, fmt)
    if family.pooler_head:
        pooler, pooler_origin = _pooler(model)
        pooler = {"pooler": pooler}
    else:
        pooler, pooler_origin = {}, f"none ({family.name})"
    with staged_folder(out) as tmp:
        write_json(tmp / "config.json", _hf_config(model, family))
        if fmt == "hf-flax":
            hf_io.save_flax_weights(tmp, {**model.params, **pooler}, max_shard_size)
        else:
            hf_io.save_torch_weights(tmp, {**model.params, **pooler}, family.flax_to_torch)
        if fmt == "sentence-transformers":
            _write_sentence_transformers_files(tmp, model)
        if family.causal:
            _write_decoder_tokenizer(model, tmp)
        else:
            _copy_tokenizer(model.model_dir, tmp)
        write_json(tmp / SIDECAR_NAME, _sidecar(model, fmt, pooler_origin))
        model_card.write(tmp, model, fmt)  # README.md: huggingface_hub's model card
    return out


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _check_family_export(model: SentenceModel, family: families.Family, fmt: str) -> None:
    """hf-flax for families transformers has Flax classes for (BERT's); causal ones (decoders) exported
    causal and last-token pooled, as transformers and sentence-transformers run them."""
    if fmt == "hf-flax" and not family.hf_flax:
        raise ExportError(f"hf-flax export is for BERT-family models, not {model.config.model_type}: transformers' "
                          f"Flax Llama exists in 4.x only (no Flax Qwen2 / Qwen3, no Flax ModernBERT, and "
                          f"transformers 5 has no Flax); use --format hf or sentence-transformers (PyTorch safetensors)")
    if not family.causal:
        return
    if model.config.bidirectional:
        raise ExportError(f"{model.config.model_type} trained with model.bidirectional cannot be exported: "
                          f"transformers and sentence-transformers would run it with a causal mask")
    if model.settings.pooling != "last":
        raise ExportError(f"{model.config.model_type} exports need last-token pooling (sentence-transformers' "
                          f"lasttoken), got {model.settings.pooling!r}")


def _write_decoder_tokenizer(model: SentenceModel, tmp: pathlib.Path) -> None:
    """tokenizer.json as bixse-jax tokenises (eos appended when the run did so), and a tokenizer_config.json
    that names a pad token and pads on the right, where transformers' positions equal bixse-jax's."""
    import tokenizers
    source = pathlib.Path(model.model_dir)
    if not (source / "tokenizer.json").is_file():
        raise ExportError(f"{source}: no tokenizer.json to export with a {model.config.model_type} model")
    tok = tokenizers.Tokenizer.from_file(str(source / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    append = model.tokenizer.append_id
    if append is not None:
        eos = tok.id_to_token(append)
        appended = tokenizers.processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                            special_tokens=[(eos, append)])
        tok.post_processor = (appended if tok.post_processor is None
                              else tokenizers.processors.Sequence([tok.post_processor, appended]))
    tok.save(str(tmp / "tokenizer.json"))
    settings = {}
    if (source / "tokenizer_config.json").is_file():
        try:
            settings = json.loads((source / "tokenizer_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{source / 'tokenizer_config.json'}: cannot read: {e}") from e
    settings.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    pad = tok.id_to_token(model.tokenizer.pad_id)
    settings.update(pad_token=pad, padding_side="right", truncation_side="right",
                    model_max_length=max_length(model, query=False))
    if model.config.eos_token_id is not None and "eos_token" not in settings:
        settings["eos_token"] = tok.id_to_token(model.config.eos_token_id)
    write_json(tmp / "tokenizer_config.json", settings)
    for name in ("special_tokens_map.json", "added_tokens.json"):
        if (source / name).is_file():
            special = json.loads((source / name).read_text())
            if name == "special_tokens_map.json" and isinstance(special, dict):
                special["pad_token"] = pad
            write_json(tmp / name, special)


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


def _hf_config(model: SentenceModel, family: families.Family) -> dict[str, Any]:
    """The source config.json (keeping fields HF uses and we don't), with our architecture fields."""
    drop = ("_name_or_path", "transformers_version", "rope_scaling", "rope_parameters", "rope_theta",
            "dtype", "torch_dtype", "bidirectional")
    hf = {k: v for k, v in _source_hf_config(model).items() if k not in drop}
    hf.update(model.config.to_hf_dict())
    hf["architectures"] = [family.hf_architectures[model.config.model_type]]
    hf["torch_dtype"] = "float32"
    if family.dtype_field:
        hf["dtype"] = "float32"  # transformers 5's name; the weights are written in float32
    return dict(sorted(hf.items()))


def _write_sentence_transformers_files(tmp: pathlib.Path, model: SentenceModel) -> None:
    settings = model.settings
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_MODULE + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_MODULE + "Pooling"}]
    if settings.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_MODULE + "Normalize"})
    write_json(tmp / "modules.json", modules)
    write_json(tmp / "sentence_bert_config.json",
                {"max_seq_length": max_length(model, query=False), "do_lower_case": False})
    write_json(tmp / "config_sentence_transformers.json", {
        "prompts": {"query": settings.query_prompt} if settings.query_prompt else {},
        "default_prompt_name": None,
        # What training scored with: the cosine when normalised, else the raw dot product.
        "similarity_fn_name": "cosine" if settings.normalize else "dot",
        "model_type": "SentenceTransformer"})
    (tmp / "1_Pooling").mkdir()
    write_json(tmp / "1_Pooling" / "config.json", {
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
        write_json(tmp / "2_Normalize" / "config.json", {})


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
        "matryoshka_dims": list(model.matryoshka_dims) or None, "pooler": pooler_origin,
        "source": model.source,
    }
