"""Which Flax module a config.json describes: the BERT family (bert.py), ModernBERT (modernbert.py)
or a decoder LLM (decoder.py).

  config_from_hf(hf, **overrides)   config.json's dict -> EncoderConfig | ModernBertConfig | DecoderConfig
  module(config)                    the Flax module: token ids + mask -> last hidden states
  init_params / param_shapes        random parameters, or their shapes, for any family
  param_axes(config)                logical axis names per parameter (decoders, ModernBERT); None:
                                    parallel.py guesses BERT's from the parameter paths
  torch_to_flax(config)             the renaming of transformers' tensor names for the family
  with_lora(config, spec)           the config with LoRA adapters on the family's named projections
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bixse_jax.errors import ConfigError
from bixse_jax.models import bert, decoder, hf_decoder_io, lora, modernbert

ModelConfig = Union[bert.EncoderConfig, modernbert.ModernBertConfig, decoder.DecoderConfig]
SUPPORTED_MODEL_TYPES = bert.SUPPORTED_MODEL_TYPES + modernbert.MODERNBERT_MODEL_TYPES + decoder.DECODER_MODEL_TYPES
# Training-time options that only decoders have.
DECODER_ONLY_OPTIONS = ("bidirectional",)


def is_decoder(config: ModelConfig) -> bool:
    return isinstance(config, decoder.DecoderConfig)


def is_modernbert(config: ModelConfig) -> bool:
    return isinstance(config, modernbert.ModernBertConfig)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type in decoder.DECODER_MODEL_TYPES:
        return decoder.DecoderConfig.from_hf_dict(hf, **overrides)
    if model_type not in bert.SUPPORTED_MODEL_TYPES + modernbert.MODERNBERT_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    for key in DECODER_ONLY_OPTIONS:
        if overrides.pop(key, False):
            raise ConfigError(f"model.{key} is for decoder models {decoder.DECODER_MODEL_TYPES}, "
                              f"not {model_type} (already bidirectional)")
    if model_type in modernbert.MODERNBERT_MODEL_TYPES:
        return modernbert.ModernBertConfig.from_hf_dict(hf, **overrides)
    return bert.EncoderConfig.from_hf_dict(hf, **overrides)


def _family(config: ModelConfig):
    return decoder if is_decoder(config) else modernbert if is_modernbert(config) else bert


def module(config: ModelConfig) -> nn.Module:
    if is_decoder(config):
        return decoder.DecoderModel(config)
    return modernbert.ModernBertModel(config) if is_modernbert(config) else bert.BertModel(config)


def _init_boxed(config: ModelConfig, rng: jax.Array) -> dict:
    """Decoders' and ModernBERT's parameters, each in its nn.LogicallyPartitioned box."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return module(config).init(rng, ids, jnp.ones_like(ids))["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    """Random float32 parameters (tests, from-scratch runs), without the logical-axis boxes."""
    if _family(config) is bert:
        return bert.init_params(config, rng)
    return nn.unbox(_init_boxed(config, rng))


def param_shapes(config: ModelConfig) -> dict:
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def param_axes(config: ModelConfig) -> dict | None:
    """The parameter tree with each leaf replaced by its logical axis names, e.g. ("embed", "heads");
    None for the BERT family (parallel.py reads its axes from the parameter paths)."""
    if _family(config) is bert:
        return None
    boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))
    return jax.tree.map(lambda box: tuple(box.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def torch_to_flax(config: ModelConfig) -> Callable[[str, np.ndarray], tuple[tuple[str, ...], np.ndarray] | None] | None:
    """The family's renaming of PyTorch tensor names (decoders, ModernBERT); None: hf_io's BERT one."""
    if is_decoder(config):
        return hf_decoder_io.torch_to_flax
    return modernbert.torch_to_flax if is_modernbert(config) else None


def with_lora(config: ModelConfig, spec: lora.LoraSpec | None) -> ModelConfig:
    """`config` whose targeted projections carry adapters; the targets are checked against the family's
    (a ConfigError lists its valid names), none given: the family's attention projections. None: as it is."""
    if spec is None:
        return config
    family = _family(config)
    spec = lora.resolve_targets(spec, family.LORA_LINEARS, family.LORA_DEFAULT_TARGETS, config.model_type)
    return dataclasses.replace(config, lora=spec)
