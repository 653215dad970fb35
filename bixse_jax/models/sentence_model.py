"""A sentence encoder loaded for use: weights, tokenizer, pooling, token limits and the learned t, b.

  load_encoder(path)   HF / sentence-transformers folder, a bixse-jax export, or a hub name -> SentenceModel
  position_limit(m)    the most tokens the position table allows (the one definition of that limit)
  max_length(m, ...)   the token limit for queries or documents
  with_adapters(m, spec, seed) / merged(m)   LoRA adapters attached (B zero), or merged into the weights

An exported folder carries bixse.json (written by bixse_jax.export): pooling, normalisation, the
query prompt, the training lengths, t, b and the Matryoshka dims; `read_sidecar` checks it field by field.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from bixse_jax.data.tokenizer import Tokenizer
from bixse_jax.models import architectures, families, hf_io, lora
from bixse_jax.models.encoder import SentenceEncoder
from bixse_jax.models.pooling import POOLING_MODES

SIDECAR_NAME = "bixse.json"


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
    matryoshka_dims: tuple[int, ...] = ()  # prefix sizes trained to work alone (loss.matryoshka_dims); (): none

    @property
    def config(self) -> architectures.ModelConfig:
        return self.encoder.config


def load_encoder(name_or_path: str | os.PathLike, *, pooling: str | None = None, normalize: bool | None = None,
                 query_prompt: str | None = None, append_eos: bool = False, **config_overrides: Any) -> SentenceModel:
    """Any HF / sentence-transformers folder, a bixse-jax export (hf-flax or sentence-transformers),
    or a hub name (fetched only where a network is), as a SentenceModel.

    Pooling, normalisation and the query prompt come from, in this order: the arguments, the
    folder's bixse.json, its sentence-transformers modules, the defaults (normalised, no prompt;
    the family's default pooling: mean for encoders, last-token for decoder LLMs).
    `config_overrides` (dtype, remat, attention_impl, hidden_dropout_prob; bidirectional for
    decoders) go to the model config. A causal family's model (a decoder) whose tokenizer has no pad
    token pads with its config's pad_token_id, else eos_token_id (padding is masked, so only a valid id matters);
    `append_eos` puts that eos after every text, for last-token pooling when the tokenizer adds none.
    """
    config, params, model_dir = hf_io.load_pretrained(name_or_path, **config_overrides)
    family = families.of(config)
    settings = hf_io.read_sentence_settings(model_dir, default_pooling=family.default_pooling)
    sidecar = read_sidecar(model_dir)
    if sidecar:
        settings = dataclasses.replace(settings, pooling=sidecar["pooling"], normalize=sidecar["normalize"],
                                       query_prompt=sidecar["query_prompt"],
                                       max_seq_length=settings.max_seq_length or sidecar["doc_max_len"])
    overrides = {"pooling": pooling, "normalize": normalize, "query_prompt": query_prompt}
    settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
    eos = getattr(config, "eos_token_id", None)
    if append_eos and eos is None:
        raise hf_io.ModelLoadError(f"{model_dir}: model.append_eos needs an eos_token_id in config.json "
                                   f"({config.model_type} models only)")
    fallback_pad = (config.pad_token_id if config.pad_token_id is not None else eos) if family.causal else None
    tokenizer = Tokenizer.from_model_dir(model_dir, fallback_pad_id=fallback_pad,
                                         append_id=eos if append_eos else None)
    tokenizer.check_vocab(config.vocab_size, source=str(model_dir))
    return SentenceModel(
        encoder=SentenceEncoder(config, pooling=settings.pooling, normalize=bool(settings.normalize)),
        params=params, tokenizer=tokenizer, model_dir=model_dir, settings=settings,
        log_temperature=sidecar.get("log_temperature"), bias=sidecar.get("bias"),
        query_max_len=sidecar.get("query_max_len"), doc_max_len=sidecar.get("doc_max_len"),
        source={"model": str(name_or_path)}, matryoshka_dims=sidecar.get("matryoshka_dims") or ())


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
    dims = data.get("matryoshka_dims")
    if dims is not None and not (isinstance(dims, list) and all(type(d) is int and d > 0 for d in dims)):
        raise hf_io.ModelLoadError(f"{path}: field 'matryoshka_dims' must be a list of positive ints or null, "
                                   f"got {dims!r}")
    out["matryoshka_dims"] = tuple(dims or ())
    if out["pooling"] not in POOLING_MODES:
        raise hf_io.ModelLoadError(f"{path}: field 'pooling' must be one of {POOLING_MODES}, got {out['pooling']!r}")
    return out


def position_limit(model: SentenceModel) -> int:
    """Most tokens a text can have: the position table's size past its offset (RoBERTa's padding)."""
    return model.config.max_position_embeddings - model.config.position_offset


def max_length(model: SentenceModel, *, query: bool) -> int:
    """Token limit for queries or documents: the run's, else the folder's, else the position table's."""
    limit = position_limit(model)
    chosen = model.query_max_len if query else model.doc_max_len
    return min(chosen or model.settings.max_seq_length or limit, limit)


def with_adapters(model: SentenceModel, spec: lora.LoraSpec | None, seed: int) -> SentenceModel:
    """`model` with fresh LoRA adapters on `spec`'s targets (A random, B zero: it embeds as before)."""
    config = architectures.with_lora(model.config, spec)
    if config is model.config:
        return model
    adapters = lora.init_adapters(architectures.param_shapes(config), seed)
    return _replace_encoder(model, config, lora.join(model.params, adapters))


def merged(model: SentenceModel) -> SentenceModel:
    """`model` with its adapters merged into the base weights (W + alpha / r A B): a plain model of the
    family, as transformers and sentence-transformers load it. A model without adapters is returned as is."""
    if model.config.lora is None:
        return model
    return _replace_encoder(model, dataclasses.replace(model.config, lora=None),
                            lora.merge(model.params, model.config.lora))


def _replace_encoder(model: SentenceModel, config: architectures.ModelConfig, params: dict) -> SentenceModel:
    encoder = SentenceEncoder(config, pooling=model.encoder.pooling, normalize=model.encoder.normalize)
    return dataclasses.replace(model, encoder=encoder, params=params)
