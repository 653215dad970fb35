"""Which Flax module a config.json describes: the BERT family (bert.py) or a decoder LLM (decoder.py).

  config_from_hf(hf, **overrides)   config.json's dict -> EncoderConfig | DecoderConfig
  module(config)                    the Flax module: token ids + mask -> last hidden states
  init_params / param_shapes        random parameters, or their shapes, for either family
  param_axes(config)                logical axis names per parameter (decoders); None: parallel.py
                                    guesses BERT's from the parameter paths
"""

from __future__ import annotations

from typing import Any, Union

import jax
from flax import linen as nn

from bixse_jax.errors import ConfigError
from bixse_jax.models import bert, decoder

ModelConfig = Union[bert.EncoderConfig, decoder.DecoderConfig]
SUPPORTED_MODEL_TYPES = bert.SUPPORTED_MODEL_TYPES + decoder.DECODER_MODEL_TYPES
# Training-time options that only decoders have.
DECODER_ONLY_OPTIONS = ("bidirectional",)


def is_decoder(config: ModelConfig) -> bool:
    return isinstance(config, decoder.DecoderConfig)


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type in decoder.DECODER_MODEL_TYPES:
        return decoder.DecoderConfig.from_hf_dict(hf, **overrides)
    if model_type not in bert.SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    for key in DECODER_ONLY_OPTIONS:
        if overrides.pop(key, False):
            raise ConfigError(f"model.{key} is for decoder models {decoder.DECODER_MODEL_TYPES}, "
                              f"not {model_type} (already bidirectional)")
    return bert.EncoderConfig.from_hf_dict(hf, **overrides)


def module(config: ModelConfig) -> nn.Module:
    return decoder.DecoderModel(config) if is_decoder(config) else bert.BertModel(config)


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
    return decoder.init_params(config, rng) if is_decoder(config) else bert.init_params(config, rng)


def param_shapes(config: ModelConfig) -> dict:
    return decoder.param_shapes(config) if is_decoder(config) else bert.param_shapes(config)


def param_axes(config: ModelConfig) -> dict | None:
    return decoder.param_axes(config) if is_decoder(config) else None
